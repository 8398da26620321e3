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
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from jaxdiff import models, parallel
from jaxdiff.config import get_config
from jaxdiff.core import diffusion as diffusion_lib
from jaxdiff.io import checkpoints, files, images
from jaxdiff.sampling import sample_from_config
from jaxdiff.training.evaluator import best_metric_key
from jaxdiff.training.state import abstract_state, build

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
  """

  workdir: epath.Path
  config: ml_collections.ConfigDict
  step: int
  graphdef: nnx.GraphDef
  params: Any
  raw_params: Any
  mesh: Mesh

  @property
  def diffusion(self) -> diffusion_lib.Diffusion:
    return diffusion_lib.from_config(self.config.diffusion)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    d = self.config.data
    return (d.image_size, d.image_size, d.channels)

  def model_fn(self, which: str = "ema") -> jax.tree_util.Partial:
    """``model_fn(x_t, t, y=None, *, key=None)`` with the EMA or the raw parameters."""
    if which not in PARAMS:
      raise ValueError(f"params={which!r}; allowed: {', '.join(PARAMS)}")
    return models.bind(self.graphdef, self.params if which == "ema" else self.raw_params)

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
    **overrides: Any,
  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``num_samples`` uint8 images ``[N, H, W, C]``, drawn as the run's ``config.sampling`` says.

    ``overrides``: ``sampler``, ``steps`` (or ``num_steps``), ``eta``, ``temperature``,
    ``guidance_scale``; None keeps the config's value. Writes nothing. With
    ``return_trajectory``, also the chain ``[S + 1, N, H, W, C]`` (uint8, x_T first).
    """
    if "steps" in overrides:
      overrides["num_steps"] = overrides.pop("steps")
    out = sample_from_config(
      self.config,
      self.diffusion,
      self.model_fn(params),
      jax.random.key(seed),
      num_samples,
      mesh=self.mesh,
      batch_size=batch_size,
      class_label=class_label,
      return_trajectory=return_trajectory,
      progress=progress,
      **overrides,
    )
    if return_trajectory:
      return images.to_uint8(out[0]), images.to_uint8(out[1])
    return images.to_uint8(out)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """A run's ``config.json`` (``workdir`` local or ``gs://``), with the schema's defaults for any
  field the run's jaxdiff version did not have yet.

  Raises:
    FileNotFoundError: ``workdir`` has no ``config.json``.
  """
  path = files.as_path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training run's workdir?")
  return _with_defaults(ml_collections.ConfigDict(json.loads(path.read_text())), get_config())


def _with_defaults(
  config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """``config`` plus every field of ``defaults`` it lacks (recursively); its own values kept."""
  for key, default in defaults.items():
    if key not in config:
      config[key] = default
    elif isinstance(default, ml_collections.ConfigDict):
      _with_defaults(config[key], default)
  return config


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
  graphdef, _, optimizer, _ = build(config)
  abstract = abstract_state(config, optimizer)
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first (jaxdiff train)")
  ckpt = checkpoints.Checkpointer(directory, best_metric=best_metric_key(config), read_only=True)
  try:
    step = _pick_step(ckpt, step, best)
    shardings = parallel.state_sharding(mesh, abstract)
    _, state, _, _ = ckpt.restore_newest_good(abstract, shardings, step)
  finally:
    ckpt.close()
  return Run(workdir, config, int(state.step), graphdef, state.ema_params, state.params, mesh)
