"""A trained run as Python objects: ``load_run(workdir)`` for notebooks, CLIs and evaluators.

Reading a run needs no training machinery beyond the state's shape: the config comes from
``config.json``, the parameters from the newest (or a chosen, or the best) orbax checkpoint,
restored replicated over the devices. Nothing is written.

Example::

  import jaxdiff
  run = jaxdiff.load_run("runs/fashion_mnist")
  images = run.sample(64, sampler="dpm++2m", steps=20)   # uint8 [64, 28, 28, 1]
  model_fn = run.model_fn()                              # EMA: model_fn(x_t, t, y=None)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from jaxdiff import models, parallel, prompts
from jaxdiff.config import is_latent, is_text, read_config
from jaxdiff.core import process as process_lib
from jaxdiff.io import checkpoints, files, images
from jaxdiff.models import autoencoder as autoencoder_lib
from jaxdiff.sampling import sample_from_config
from jaxdiff.training.evaluator import best_metric_key
from jaxdiff.training.state import build, restore

PARAMS = ("ema", "raw")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run's config, model structure and both parameter sets at one checkpoint.

  Attributes:
    workdir: the run's directory (absolute if local; a ``gs://`` URI stays one).
    config: its ``config.json``, as a ConfigDict.
    step: the checkpoint's step.
    graphdef: the model's structure (NNX ``GraphDef``).
    params: the EMA parameters (what samples and evaluations use).
    raw_params: the optimiser's parameters at that step.
    mesh: the devices the parameters are replicated over.
    stats: what the checkpoint stores beside the state; an autoencoder run's latent scale
      (``scale_factor``).
    autoencoder: a latent run's autoencoder (a ``Run``), which :meth:`decode` uses.
  """

  workdir: epath.Path
  config: ml_collections.ConfigDict
  step: int
  graphdef: nnx.GraphDef
  params: Any
  raw_params: Any
  mesh: Mesh
  stats: dict = dataclasses.field(default_factory=dict)
  autoencoder: Run | None = None

  @property
  def is_autoencoder(self) -> bool:
    return self.config.model.name == "autoencoder"

  @property
  def diffusion(self) -> process_lib.Process:
    """The run's noise process: a ``Diffusion`` (ddpm) or a ``FlowMatching`` (flow)."""
    return process_lib.from_config(self.config.diffusion)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  @functools.cached_property
  def _coder(self) -> tuple[Any, Any]:
    """Jitted ``encode(params, images, key)`` and ``decode(params, latents)`` of an autoencoder."""
    if not self.is_autoencoder:
      raise ValueError(
        f"{self.workdir} is not an autoencoder run (model.name={self.config.model.name!r})"
      )
    return jax.jit(autoencoder_lib.Coder(self.graphdef).encode), jax.jit(
      autoencoder_lib.Coder(self.graphdef).decode
    )

  @property
  def scale_factor(self) -> float:
    """An autoencoder's latent scale: ``1 / std`` of its latents over training images."""
    if "scale_factor" not in self.stats:
      raise ValueError(f"checkpoint {self.step} of {self.workdir} stores no latent scale factor")
    return float(self.stats["scale_factor"])

  def encode(self, images: Any, key: jax.Array | None = None) -> jax.Array:
    """An autoencoder's scaled latents of ``images`` (float ``[B, H, W, C]`` in [-1, 1]): the
    posterior mean times :attr:`scale_factor`, or with ``key`` a draw from the posterior."""
    encode, _ = self._coder
    return encode(self.params, images, key) * self.scale_factor

  def decode(self, latents: Any) -> jax.Array:
    """Images ``[B, H, W, C]`` (float, ~[-1, 1]) from scaled latents: an autoencoder's own, or
    a latent run's through its autoencoder."""
    if self.autoencoder is not None:
      return self.autoencoder.decode(latents)
    _, decode = self._coder
    return decode(self.params, latents / self.scale_factor)

  def reconstruct(self, images: Any, params: str = "ema") -> jax.Array:
    """An autoencoder's decoding of its posterior mean for ``images`` (float, [-1, 1])."""
    if params not in PARAMS:
      raise ValueError(f"params={params!r}; allowed: {', '.join(PARAMS)}")
    encode, decode = self._coder
    p = self.params if params == "ema" else self.raw_params
    return decode(p, encode(p, images))

  def model_fn(self, which: str = "ema") -> jax.tree_util.Partial:
    """``model_fn(x_t, t, y=None, *, key=None)`` with the EMA or the raw parameters."""
    if which not in PARAMS:
      raise ValueError(f"params={which!r}; allowed: {', '.join(PARAMS)}")
    return models.bind(self.graphdef, self.params if which == "ema" else self.raw_params)

  def _sampling_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` for ``sample_from_config`` (``steps`` is ``num_steps``), refused for an
    autoencoder run, which has nothing to sample."""
    if self.is_autoencoder:
      raise ValueError(f"{self.workdir} is an autoencoder run: it encodes and decodes, not samples")
    if "steps" in overrides:
      overrides["num_steps"] = overrides.pop("steps")
    return overrides

  @property
  def _decoder(self) -> Callable[[Any], jax.Array] | None:
    """A latent run's decoding of its samples to images; None for a pixel run."""
    return self.decode if self.autoencoder is not None else None

  def sample_fn(
    self, params: str = "ema", *, progress: bool = False, **overrides: Any
  ) -> Callable[[jax.Array, int], jax.Array]:
    """``sample_fn(key, n)``: ``n`` float images ``[n, H, W, C]`` (~[-1, 1], decoded for a
    latent run), drawn as the run's ``config.sampling`` says: what
    :func:`jaxdiff.evaluation.sample_quality` scores.

    A text run draws from its training split's own captions, in order, as the data is drawn (so
    a Fréchet distance compares like with like). ``overrides`` as for :meth:`sample`.
    """
    overrides = self._sampling_overrides(overrides)
    model_fn = self.model_fn(params)
    table = prompts.caption_table(self.config) if is_text(self.config) else None

    def sample_fn(key: jax.Array, n: int) -> jax.Array:
      return sample_from_config(
        self.config, self.diffusion, model_fn, key, n, mesh=self.mesh, progress=progress,
        decode=self._decoder, conditioning=None if table is None else table.first(n),
        **overrides,
      )  # fmt: skip

    return sample_fn

  def sample(
    self,
    num_samples: int,
    *,
    seed: int = 0,
    class_label: int | None = None,
    batch_size: int | None = None,
    params: str = "ema",
    progress: bool = False,
    return_trajectory: bool = False,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | None = None,
    **overrides: Any,
  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``num_samples`` uint8 images ``[N, H, W, C]``, drawn as the run's ``config.sampling`` says.

    A text run draws ``num_samples`` images of each ``prompt`` (a string, or a list: prompt-major,
    so a grid ``num_samples`` wide has one row per prompt), guided against ``negative_prompt``
    (default: the empty prompt) with ``guidance_scale``; without a prompt, unconditional samples
    (the empty prompt).

    ``overrides``: ``sampler``, ``steps`` (or ``num_steps``), ``eta``, ``temperature``,
    ``guidance_scale``; None keeps the config's value. Writes nothing. With
    ``return_trajectory``, also the chain ``[S + 1, N, H, W, C]`` (uint8, x_T first).
    """
    overrides = self._sampling_overrides(overrides)
    conditioning = None
    if is_text(self.config):
      texts = prompts.check_prompts("" if prompt is None else prompt)
      conditioning = prompts.conditioning(
        self.config, texts, negative_prompt, per_prompt=num_samples, label=class_label
      )
      num_samples, class_label = num_samples * len(texts), None
    elif prompt is not None or negative_prompt is not None:
      raise ValueError(
        f"prompt / negative_prompt: {self.workdir} is not a text-conditioned run"
        " (its config.text.encoder is empty)"
      )
    out = sample_from_config(
      self.config,
      self.diffusion,
      self.model_fn(params),
      jax.random.key(seed),
      num_samples,
      conditioning=conditioning,
      mesh=self.mesh,
      batch_size=batch_size,
      class_label=class_label,
      return_trajectory=return_trajectory,
      progress=progress,
      decode=self._decoder,
      **overrides,
    )
    if return_trajectory:
      return images.to_uint8(out[0]), images.to_uint8(out[1])
    return images.to_uint8(out)


def _pick_step(ckpt: checkpoints.Checkpointer, step: int | None, best: bool) -> int | None:
  """The step asked for (checked to exist), the best one, or None for the newest good one."""
  available = ckpt.all_steps()
  if not available:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (jaxdiff train)")
  if best:
    step = ckpt.best_step()
    if step is None:
      raise FileNotFoundError(
        f"no checkpoint in {ckpt.directory} carries evaluation metrics; train with"
        " eval.every > 0 and eval.best_metric set, or load the newest"
      )
  if step is not None and step not in available:
    raise FileNotFoundError(f"no checkpoint {step} in {ckpt.directory}; available: {available}")
  return step


def load_run(
  workdir: str | os.PathLike,
  step: int | None = None,
  *,
  best: bool = False,
  mesh: Mesh | None = None,
) -> Run:
  """Loads a training run's config and both parameter sets from one checkpoint.

  Args:
    workdir: the run's directory (``config.json``, ``checkpoints/``).
    step: which checkpoint (default: the newest that restores; one that does not is skipped
      with a ``CheckpointWarning`` naming it and the step used instead).
    best: the checkpoint kept as the best by ``eval.best_metric`` instead.
    mesh: replicate the parameters over this mesh (default: all devices).

  Raises:
    FileNotFoundError: not a run, no checkpoint, or no such step.
    jaxdiff.io.checkpoints.CheckpointError: the checkpoint asked for (or every one) cannot be
      restored.
  """
  workdir = files.as_path(workdir)
  config = read_config(workdir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  graphdef = build(config)[0]
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first (jaxdiff train)")
  ckpt = checkpoints.Checkpointer(directory, best_metric=best_metric_key(config), read_only=True)
  try:
    step = _pick_step(ckpt, step, best)
  finally:
    ckpt.close()
  step, state, stats = restore(config, directory, mesh, step)
  ae = _latent_autoencoder(config, mesh) if is_latent(config) else None
  return Run(
    workdir, config, int(state.step), graphdef, state.ema_params, state.params, mesh, stats, ae
  )


def _latent_autoencoder(config: ml_collections.ConfigDict, mesh: Mesh) -> Run:
  """The autoencoder a latent run was trained on, checked to be the very checkpoint."""
  latent = config.latent
  ae = load_run(latent.autoencoder_workdir, latent.autoencoder_step, mesh=mesh)
  reader = checkpoints.Checkpointer(ae.workdir / "checkpoints", read_only=True)
  try:
    digest = reader.digest(ae.step)
  finally:
    reader.close()
  if latent.digest and digest != latent.digest:
    raise checkpoints.CheckpointError(
      f"checkpoint {ae.step} of the autoencoder run {ae.workdir} is not the one this latent run"
      f" was trained on (its digest is {digest[:12]}, the run's latent.digest {latent.digest[:12]})"
    )
  return ae
