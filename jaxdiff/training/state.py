"""The train state and the optimizer.

``TrainState`` holds arrays only (step, params, EMA params, optimizer state and,
with importance-sampled t, the loss history): everything a resumed run needs to
continue bit-for-bit, together with the data iterator's position. The model's
structure (an NNX ``GraphDef``) stays outside it, static.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxdiff import models, parallel
from jaxdiff.core import process as process_lib
from jaxdiff.core import timesteps
from jaxdiff.io import checkpoints, files


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # nnx.State of the model's Params
  ema_params: Any
  opt_state: Any
  loss_history: timesteps.LossHistory | None = None


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to ``learning_rate``, then constant or cosine decay to 0."""
  warmup = max(int(cfg.warmup_steps), 0)
  if cfg.lr_schedule == "constant":
    after = optax.constant_schedule(cfg.learning_rate)
  elif cfg.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.num_steps - warmup, 1))
  else:
    raise ValueError(f"unknown training.lr_schedule {cfg.lr_schedule!r}; allowed: constant, cosine")
  if warmup == 0:
    return after
  ramp = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
  return optax.join_schedules([ramp, after], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam or AdamW with global-norm clipping and the learning-rate schedule."""
  lr = learning_rate_schedule(cfg)
  if cfg.optimizer == "adam":
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.optimizer == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"unknown training.optimizer {cfg.optimizer!r}; allowed: adam, adamw")
  if cfg.grad_clip and cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def ema_decay(cfg: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """EMA decay at ``step``; with warm-up min(decay, (1 + n) / (10 + n)) as in score_sde."""
  decay = jnp.asarray(cfg.ema_decay, jnp.float32)
  if cfg.ema_warmup:
    n = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return decay


def build(
  config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, Any, optax.GradientTransformation, process_lib.Process]:
  """The model's graphdef and abstract params, the optimizer, and the noise process (a
  ``Diffusion`` for ddpm; :func:`jaxdiff.core.process.from_config`)."""
  abstract = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  return (
    graphdef,
    abstract_params,
    make_optimizer(config.training),
    process_lib.from_config(config.diffusion),
  )


def init_state(
  config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
  """A fresh state; EMA starts as a copy of the params (not shared buffers, for donation)."""
  model = models.build_model(config, rngs=nnx.Rngs(params=key))
  params = nnx.state(model)
  dcfg, history = config.diffusion, None
  allowed = process_lib.T_SAMPLERS.get(process_lib.kind(dcfg), ())
  if process_lib.t_sampler(dcfg) not in allowed:
    raise ValueError(
      f"unknown diffusion.t_sampler {dcfg.t_sampler!r}; allowed: '', {', '.join(allowed)}"
    )
  if process_lib.t_sampler(dcfg) == "importance":  # ddpm's only
    history = timesteps.init(dcfg.num_timesteps)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=optimizer.init(params),
    loss_history=history,
  )


def abstract_state(
  config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> TrainState:
  """The state's structure, shapes and dtypes as ``jax.ShapeDtypeStruct`` leaves; no memory."""
  return jax.eval_shape(lambda k: init_state(config, optimizer, k), jax.random.key(0))


def create_state(
  config: ml_collections.ConfigDict,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
  shardings: Any,
) -> TrainState:
  """:func:`init_state` compiled to write each array straight into its sharding."""
  return jax.jit(lambda k: init_state(config, optimizer, k), out_shardings=shardings)(key)


def restore(
  config: ml_collections.ConfigDict,
  directory: Any,
  mesh: Any,
  step: int | None = None,
) -> tuple[int, TrainState, dict]:
  """A run's train state from checkpoint ``step`` of ``directory`` (default: the newest that
  restores), replicated over ``mesh``, and the checkpoint's ``stats``; reads, never writes.

  Raises:
    FileNotFoundError: no checkpoint directory.
    jaxdiff.io.checkpoints.CheckpointError: no such step, or none restores.
  """
  directory = files.as_path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}: train first (jaxdiff train)")
  _, _, optimizer, _ = build(config)
  abstract = abstract_state(config, optimizer)
  reader = checkpoints.Checkpointer(directory, read_only=True)
  try:
    step, state, _, _ = reader.restore_newest_good(
      abstract, parallel.state_sharding(mesh, abstract), step
    )
    stats = reader.read_json(step, "stats") or {}
  finally:
    reader.close()
  return step, state, stats
