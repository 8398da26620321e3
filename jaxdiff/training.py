"""The train state, the optimizer, and one jit-compiled, sharded train step.

``TrainState`` holds arrays only (step, params, EMA params, optimizer state and,
with importance-sampled t, the loss history): everything a resumed run needs to
continue bit-for-bit, together with the data iterator's position. The model's
structure (an NNX ``GraphDef``) stays outside it, static.

The step's randomness is ``fold_in(key, step)``, so a resumed run draws the
same t, noise and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxdiff import diffusion as diffusion_lib
from jaxdiff import losses, models, parallel
from jaxdiff import timestep_sampling as tsamp


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # nnx.State of the model's Params
  ema_params: Any
  opt_state: Any
  loss_history: tsamp.LossHistory | None = None


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
) -> tuple[nnx.GraphDef, Any, optax.GradientTransformation, diffusion_lib.Diffusion]:
  """The model's graphdef and abstract params, the optimizer, and the diffusion."""
  abstract = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  return (
    graphdef,
    abstract_params,
    make_optimizer(config.training),
    diffusion_lib.from_config(config.diffusion),
  )


def init_state(
  config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
  """A fresh state; EMA starts as a copy of the params (not shared buffers, for donation)."""
  model = models.build_model(config, rngs=nnx.Rngs(params=key))
  params = nnx.state(model)
  history = None
  if config.diffusion.t_sampler == "importance":
    history = tsamp.init(config.diffusion.num_timesteps)
  elif config.diffusion.t_sampler != "uniform":
    raise ValueError(
      f"unknown diffusion.t_sampler {config.diffusion.t_sampler!r}; allowed: uniform, importance"
    )
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


def make_model_fn(graphdef: nnx.GraphDef, params: Any, labels: jax.Array | None, key=None):
  """``model_fn(x_t, t)`` for the diffusion maths: params, labels and dropout key closed over."""
  model = nnx.merge(graphdef, params)
  return lambda x, t: model(x, t, labels, key=key)


def make_train_step(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  diffusion: diffusion_lib.Diffusion,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
  """The pure train step ``(state, batch, key) -> (state, metrics)``.

  ``batch`` holds the global batch: ``image`` ``[B, H, W, C]`` in [-1, 1] and
  ``label`` ``[B]``. With ``training.grad_accum_steps = k`` the batch is split
  into k micro-batches whose gradients are averaged in a ``lax.scan`` before
  one optimizer update, so memory scales with B / k.
  """
  tcfg, dcfg = config.training, config.diffusion
  accum = int(tcfg.grad_accum_steps)
  conditional = bool(config.model.class_conditional)
  lr_fn = learning_rate_schedule(tcfg)

  def loss_fn(params, images, labels, t, noise, weights, key):
    model_fn = make_model_fn(graphdef, params, labels if conditional else None, key)
    terms = losses.training_losses(
      diffusion,
      model_fn,
      images,
      key,  # unused: t and noise are given
      loss_type=dcfg.loss_type,
      t=t,
      noise=noise,
      min_snr_gamma=dcfg.min_snr_gamma,
    )
    return jnp.mean(terms["loss"] * weights), terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    key_t, key_noise, key_model = jax.random.split(jax.random.fold_in(key, state.step), 3)
    images, labels = batch["image"], batch.get("label")
    B = images.shape[0]
    if B % accum:
      raise ValueError(f"batch of {B} does not split into grad_accum_steps={accum} micro-batches")
    # t and the noise are drawn for the whole global batch, so splitting it
    # into micro-batches (or over devices) changes nothing but float rounding.
    if state.loss_history is None:
      t = jax.random.randint(key_t, (B,), 0, diffusion.num_timesteps)
      weights = jnp.ones((B,), jnp.float32)
    else:
      t, weights = tsamp.sample(state.loss_history, key_t, B)
    noise = jax.random.normal(key_noise, images.shape, images.dtype)
    inputs = (images, labels, t, noise, weights)

    if accum == 1:
      (loss, terms), grads = grad_fn(state.params, *inputs, key_model)
    else:

      def micro(carry, xs):
        i, *xs = xs
        (micro_loss, terms), g = grad_fn(state.params, *xs, jax.random.fold_in(key_model, i))
        return jax.tree.map(jnp.add, carry, (micro_loss, g)), terms

      def split(x):
        return None if x is None else x.reshape((accum, B // accum) + x.shape[1:])

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), terms = jax.lax.scan(micro, zeros, (jnp.arange(accum), *map(split, inputs)))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
      terms = jax.tree.map(lambda x: x.reshape((B,) + x.shape[2:]), terms)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(tcfg, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    history = state.loss_history
    if history is not None:
      history = tsamp.update(history, terms["t"], terms["unweighted_loss"])
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": lr_fn(state.step),
      "ema_decay": decay,
    }
    for name in ("simple", "vb"):
      if name in terms:
        metrics[name] = jnp.mean(terms[name])
    new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, loss_history=history
    )
    return new_state, metrics

  return train_step


def jit_train_step(
  step_fn: Callable, mesh: Mesh, state_shardings: Any
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
  """``jax.jit`` with explicit shardings: batch on ``data``, state as given, donated."""
  rep = parallel.replicated(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, parallel.batch_sharding(mesh), rep),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )
