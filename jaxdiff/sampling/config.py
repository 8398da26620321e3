"""A run config as :func:`~jaxdiff.sampling.sample` arguments: the one place that reads it.

The training loop's sample grids, ``jaxdiff sample`` and the sample-quality
evaluation all call :func:`sampler_kwargs` (and :func:`class_labels` for a
class-conditional model), so they sample the same way from the same config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff import parallel
from jaxdiff.checks import is_number
from jaxdiff.config import is_latent, is_text, sample_shape
from jaxdiff.core import process as process_lib
from jaxdiff.core.diffusion import Diffusion
from jaxdiff.sampling.driver import sample_in_chunks
from jaxdiff.sampling.registry import (
  SAMPLERS,
  SIGMA_GRID,
  check_process,
  check_temperature,
  get_sampler,
  samplers_for,
)
from jaxdiff.sampling.spacing import SPACINGS

# sampling.s_* (Karras et al. 2022, Alg. 2) and their schema defaults (s_tmax 0: no upper bound).
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
CHURN_OPTIONS = tuple(CHURN_DEFAULTS)


def _pick(value: Any, default: Any) -> Any:
  return default if value is None else value


def sampler_kwargs(
  config: Any,
  *,
  sampler: str | None = None,
  num_steps: int | None = None,
  eta: float | None = None,
  temperature: float | None = None,
  guidance_scale: float | None = None,
  spacing: str | None = None,
) -> dict[str, Any]:
  """Keyword arguments for ``sample()`` / ``sample_in_chunks()`` from a run config.

  Reads ``config.sampling`` (``sampler``, ``num_steps``, ``spacing``, ``eta``,
  ``clip_denoised``, ``guidance_scale``, ``temperature``); an argument given
  here (not None) overrides the config's value. An empty ``spacing`` is the
  sampler's own (None). The null label of
  classifier-free guidance (Ho & Salimans 2022) is ``config.data.num_classes``,
  the id a class-conditional model is trained with for "no class", and None
  for an unconditional model.

  Args:
    config: a run config (``ml_collections.ConfigDict``) with ``sampling``,
      ``model.class_conditional`` and ``data.num_classes``.
    sampler, num_steps, eta, temperature, guidance_scale, spacing: overrides, or None.

  Returns:
    dict with ``sampler``, ``num_steps``, ``spacing``, ``eta``, ``clip_denoised``,
    ``guidance_scale``, ``null_label`` and ``temperature``, and for a sampler that takes them
    (``edm_stochastic``) ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise``. Labels, the mesh
    and the shape are the caller's (see :func:`class_labels`).

  Raises:
    ValueError: an unknown sampler, one of another process (``diffusion.process``), or
      guidance (``guidance_scale != 1``) for an unconditional model.
  """
  scfg = config.sampling
  conditional = bool(config.model.class_conditional)
  kwargs = {
    "sampler": _pick(sampler, scfg.sampler),
    "num_steps": _pick(num_steps, scfg.num_steps),
    "spacing": _pick(spacing, scfg.get("spacing", "")) or None,
    "eta": _pick(eta, scfg.eta),
    "clip_denoised": scfg.clip_denoised,
    "guidance_scale": _pick(guidance_scale, scfg.guidance_scale),
    "null_label": config.data.num_classes if conditional else None,
    "temperature": _pick(temperature, scfg.temperature),
  }
  # Fail before loading a checkpoint, not after.
  check_process(kwargs["sampler"], process_lib.kind(config.diffusion))
  # The churn options of edm_stochastic, passed only to a sampler that takes them.
  for key in CHURN_OPTIONS:
    if key in get_sampler(kwargs["sampler"]).options:
      kwargs[key] = float(scfg.get(key, CHURN_DEFAULTS[key]))
  if not (conditional or is_text(config)) and kwargs["guidance_scale"] != 1.0:
    raise ValueError(
      f"guidance_scale={kwargs['guidance_scale']} needs a class-conditional model"
      " (classifier-free guidance), and this run's config has model.class_conditional=False;"
      " use guidance_scale=1.0"
    )
  return kwargs


def check(config: Any, class_label: int | None = None) -> list[str]:
  """Every problem with ``config.sampling`` (and ``class_label``) for this run, one line each,
  naming the field, its value and what is allowed; empty when all is well. Cheap: callers check
  before loading a checkpoint or compiling anything.
  """
  scfg, problems = config.sampling, []

  def need(ok: bool, key: str, allowed: str) -> None:
    if not ok:
      problems.append(f"sampling.{key}={scfg[key]!r}: {allowed}")

  process = process_lib.kind(config.diffusion)
  own = samplers_for(process)  # none: an unknown process, which the diffusion check names
  if own and (scfg.sampler not in SAMPLERS or process not in get_sampler(scfg.sampler).processes):
    of = "" if process == "ddpm" else f" for diffusion.process={process!r}"
    need(False, "sampler", f"allowed{of}: {', '.join(own)}")
  steps_ok = isinstance(scfg.num_steps, int) and scfg.num_steps >= 1
  on_sigma = scfg.sampler in SAMPLERS and get_sampler(scfg.sampler).spacing == SIGMA_GRID
  if process == "ddpm" and on_sigma:  # the chain seen on a sigma grid: any number of steps
    need(steps_ok, "num_steps", "an integer >= 1")
    need(scfg.spacing == "", "spacing",
         f"'' for sampler {scfg.sampler!r} (it steps on the chain's sigma grid)")  # fmt: skip
  elif process == "ddpm":
    num_timesteps = config.diffusion.num_timesteps
    steps_ok = steps_ok and scfg.num_steps <= num_timesteps
    need(steps_ok, "num_steps", f"an integer in 1..{num_timesteps} (diffusion.num_timesteps)")
    need(scfg.spacing in ("", *SPACINGS), "spacing",
         f"allowed: '' (the sampler's own), {', '.join(SPACINGS)}")  # fmt: skip
  else:  # a continuous process: any number of steps on its own grid
    need(steps_ok, "num_steps", "an integer >= 1")
    need(scfg.spacing == "", "spacing", f"'' for diffusion.process={process!r} (its own grid)")
  for key in ("num_samples", "batch_size"):
    need(isinstance(scfg[key], int) and scfg[key] >= 1, key, "an integer >= 1")
  for key in ("eta", "temperature", "guidance_scale"):
    need(scfg[key] >= 0, key, "a number >= 0")
  switches = {"eta": scfg.eta, "s_churn": scfg.get("s_churn", CHURN_DEFAULTS["s_churn"])}
  if scfg.sampler in SAMPLERS and all(is_number(v) for v in (scfg.temperature, *switches.values())):
    problem = check_temperature(scfg.sampler, scfg.temperature, switches)
    if problem:
      problems.append(f"sampling.{problem}")
  problems += _churn_problems(scfg)
  conditional = bool(config.model.class_conditional)
  need(
    conditional or is_text(config) or scfg.guidance_scale == 1.0, "guidance_scale",
    "1.0 for this unconditional model (classifier-free guidance needs model.class_conditional)",
  )  # fmt: skip
  if class_label is not None and not conditional:
    problems.append(f"class_label={class_label}: this run's model is not class-conditional")
  elif class_label is not None and not 0 <= class_label < config.data.num_classes:
    problems.append(f"class_label={class_label}: allowed 0..{config.data.num_classes - 1}")
  return problems


def _churn_problems(scfg: Any) -> list[str]:
  """``sampling.s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` (read by ``edm_stochastic``)."""
  values = {key: scfg.get(key, default) for key, default in CHURN_DEFAULTS.items()}
  problems = []
  for key, value in values.items():
    number = is_number(value)
    low_ok = number and (value > 0 if key == "s_noise" else value >= 0)
    if not low_ok:
      allowed = "a number > 0" if key == "s_noise" else "a number >= 0"
      if key == "s_tmax":
        allowed += " (0: no upper bound)"
      problems.append(f"sampling.{key}={value!r}: {allowed}")
  s_tmin, s_tmax = values["s_tmin"], values["s_tmax"]
  if not problems and s_tmax != 0 and s_tmax < s_tmin:
    problems.append(
      f"sampling.s_tmax={s_tmax!r}: must be >= sampling.s_tmin ({s_tmin!r}), or 0 for no upper"
      " bound"
    )
  return problems


def class_labels(config: Any, n: int, class_label: int | None = None) -> np.ndarray | None:
  """The ``[n]`` labels to sample a class-conditional model with, or None if it is unconditional.

  Every class in turn (``arange(n) % num_classes``), or ``class_label`` throughout.

  Raises:
    ValueError: ``class_label`` outside ``0..num_classes - 1``, or given for an
      unconditional model.
  """
  if not config.model.class_conditional:
    if class_label is not None:
      raise ValueError(
        f"class_label={class_label} needs a class-conditional model, and this run's config"
        " has model.class_conditional=False; drop it"
      )
    return None
  num_classes = config.data.num_classes
  if class_label is None:
    return np.arange(n) % num_classes
  if not 0 <= class_label < num_classes:
    raise ValueError(f"class_label={class_label} must be in 0..{num_classes - 1}")
  return np.full(n, class_label)


def sample_from_config(
  config: Any,
  diffusion: Diffusion,
  model_fn: Any,
  key: jax.Array,
  num_samples: int,
  *,
  mesh: Mesh | None,
  batch_size: int | None = None,
  class_label: int | None = None,
  return_trajectory: bool = False,
  progress: bool = False,
  decode: Callable[[jax.Array], jax.Array] | None = None,
  conditioning: tuple[Any, Any] | None = None,
  **overrides: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """``num_samples`` images ``[N, H, W, C]`` in [-1, 1] (NumPy), drawn as ``config.sampling`` says.

  In a latent run the sampler draws latents (``config.sample_shape``) and ``decode`` (e.g.
  ``Run.decode``) turns them, and every frame of a trajectory, into images.

  A text run samples from ``conditioning = (cond, uncond)``: ``[N]`` rows of encoded prompts
  and of the empty or negative prompt (:func:`jaxdiff.prompts.conditioning`), the two branches
  of classifier-free guidance.

  ``overrides`` (``sampler``, ``num_steps``, ``spacing``, ``eta``, ``temperature``,
  ``guidance_scale``) replace the config's values where not None. Chunks of ``batch_size``
  (default ``config.sampling.batch_size``, at most N) rounded up to the mesh's device count;
  chunk c uses ``fold_in(key, c)`` (see :func:`jaxdiff.sampling.sample_in_chunks`).

  Raises:
    ValueError: an option the model cannot honour (a label or guidance for an unconditional
      model, a label out of range, an unknown sampler, a bad step count).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  kwargs = sampler_kwargs(config, **overrides)
  labels, uncond = class_labels(config, num_samples, class_label), None
  if is_text(config):
    if conditioning is None:
      raise ValueError("a text run samples from prompts: pass conditioning=(cond, uncond)")
    labels, uncond = conditioning
  elif conditioning is not None:
    raise ValueError("conditioning is for a text run (config.text.encoder); this run has none")
  batch = min(batch_size or config.sampling.batch_size, num_samples)
  if mesh is not None:
    batch = parallel.round_up(batch, mesh.size)
  image_shape: Sequence[int] = sample_shape(config)
  if is_latent(config) and decode is None:
    raise ValueError("a latent run's samples are latents: pass decode (e.g. Run.decode)")
  out = sample_in_chunks(
    diffusion,
    model_fn,
    key,
    num_samples,
    image_shape,
    batch_size=batch,
    labels=labels,
    uncond=uncond,
    return_trajectory=return_trajectory,
    progress=progress,
    mesh=mesh,
    **kwargs,
  )
  if decode is None:
    return out
  return (
    _decoded(out, decode, batch)
    if not return_trajectory
    else tuple(_decoded(x, decode, batch) for x in out)
  )


def _decoded(latents: np.ndarray, decode: Callable, batch: int) -> np.ndarray:
  """``decode`` over ``latents [..., h, w, c]`` in chunks of ``batch``, back to NumPy images
  clipped to [-1, 1] (a decoder may overshoot; images leave here as pixels do)."""
  lead, flat = latents.shape[:-3], latents.reshape((-1, *latents.shape[-3:]))
  n, chunks = len(flat), []
  for start in range(0, n, batch):
    chunk = flat[start : start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    chunks.append(np.asarray(jax.device_get(decode(padded)))[: len(chunk)])
  images = np.clip(np.concatenate(chunks), -1.0, 1.0)
  return images.reshape((*lead, *images.shape[1:]))
