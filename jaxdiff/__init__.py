"""jaxdiff: denoising diffusion models as pure JAX functions.

The public pieces, for notebooks::

  import jaxdiff
  run = jaxdiff.load_run("runs/fashion_mnist")            # config + EMA and raw parameters
  images = run.sample(64, sampler="dpm++2m", steps=20)     # uint8 [64, 28, 28, 1]; writes nothing

  d = jaxdiff.make_diffusion(jaxdiff.get_betas("cosine", 1000), mean_type="eps")
  x0 = jaxdiff.sample(d, run.model_fn(), jax.random.key(0), (16, 28, 28, 1), sampler="ddim",
                      num_steps=50)

The layers, lowest first (a lower one never imports a higher one): ``core`` (the maths),
``models`` and ``parallel``, ``sampling``, ``data`` and ``io``, ``evaluation``, ``training``,
``run`` (``load_run``), ``cli`` (entry points). Subpackages are imported on first use, so
``import jaxdiff`` stays cheap.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute); resolved on first access (PEP 562).
_EXPORTS = {
  "load_run": ("jaxdiff.run", "load_run"),
  "Run": ("jaxdiff.run", "Run"),
  "Diffusion": ("jaxdiff.core.diffusion", "Diffusion"),
  "make_diffusion": ("jaxdiff.core.diffusion", "make_diffusion"),
  "respace": ("jaxdiff.core.diffusion", "respace"),
  "space_timesteps": ("jaxdiff.core.diffusion", "space_timesteps"),
  "q_sample": ("jaxdiff.core.diffusion", "q_sample"),
  "p_mean_variance": ("jaxdiff.core.diffusion", "p_mean_variance"),
  "get_betas": ("jaxdiff.core.schedules", "get_betas"),
  "training_losses": ("jaxdiff.core.losses", "training_losses"),
  "calc_bpd_loop": ("jaxdiff.core.likelihood", "calc_bpd_loop"),
  "sample": ("jaxdiff.sampling", "sample"),
  "sample_in_chunks": ("jaxdiff.sampling", "sample_in_chunks"),
  "build_model": ("jaxdiff.models", "build_model"),
  "bind": ("jaxdiff.models", "bind"),
  "train": ("jaxdiff.training", "train"),
}
_SUBPACKAGES = (
  "cli",
  "core",
  "data",
  "evaluation",
  "io",
  "latent",
  "models",
  "parallel",
  "prompts",
  "run",
  "sampling",
  "text",
  "training",
)

__all__ = [*_EXPORTS, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    module, attribute = _EXPORTS[name]
    return getattr(importlib.import_module(module), attribute)
  if name in _SUBPACKAGES:
    return importlib.import_module(f"jaxdiff.{name}")
  raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(__all__ + ["__version__"])
