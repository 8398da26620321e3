"""One jit-compiled, sharded train step: ``(state, batch, key) -> (state, metrics)``.

The step's randomness is ``fold_in(key, step)``, so a resumed run draws the same t, noise
and dropout masks as an uninterrupted one; t and the noise are drawn for the global batch
(:func:`jaxdiff.core.timesteps.draw`), so the losses do not depend on the device count or
on gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxdiff import models, parallel
from jaxdiff.config import is_latent, is_text
from jaxdiff.core import process as process_lib
from jaxdiff.core import timesteps
from jaxdiff.training import autoencoder
from jaxdiff.training.state import TrainState, ema_decay, learning_rate_schedule

StepFn = Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]


def make_loss_fn(
  config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, diffusion: process_lib.Process
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """``loss_fn(params, images, y, t, noise, weights, key) -> (mean loss, terms)``, ``y`` the
  model's conditioning (:func:`conditioning`), the loss the process's
  (:func:`jaxdiff.core.process.training_losses`)."""
  dcfg = config.diffusion
  apply = models.Apply(graphdef)
  # Latents are continuous: the bound's L_0 is a density there, not 8-bit bins.
  decoder = "gaussian" if is_latent(config) else "discretized"
  vdm = isinstance(diffusion, process_lib.VDM)

  def loss_fn(params, images, y, t, noise, weights, key):
    # A vdm model carries its noise schedule (models.noise_schedule.ScheduledDenoiser).
    options = {"gamma_fn": lambda s: apply.gamma(params, s)} if vdm else {}
    terms = process_lib.training_losses(
      diffusion,
      lambda x, s: apply(params, x, s, y, key=key),
      images,
      t,
      noise,
      loss_type=dcfg.loss_type,
      min_snr_gamma=dcfg.min_snr_gamma,
      decoder=decoder,
      **options,
    )
    return jnp.mean(terms["loss"] * weights), terms

  return loss_fn


def _accumulated(grad_fn: Callable, accum: int) -> Callable:
  """``grad_fn`` over ``accum`` micro-batches in a ``lax.scan``, gradients averaged.

  Memory scales with B / accum; the result equals the full batch's up to float rounding.
  """
  if accum == 1:
    return grad_fn

  def accumulated(params, *inputs_and_key):
    *inputs, key = inputs_and_key
    B = inputs[0].shape[0]

    def split(x):  # any pytree of [B, ...] arrays (the conditioning may be a dict), or None
      return jax.tree.map(lambda a: a.reshape((accum, B // accum) + a.shape[1:]), x)

    def micro(carry, xs):
      i, *xs = xs
      (micro_loss, terms), g = grad_fn(params, *xs, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, carry, (micro_loss, g)), terms

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), terms = jax.lax.scan(micro, zeros, (jnp.arange(accum), *map(split, inputs)))
    terms = jax.tree.map(lambda x: x.reshape((B,) + x.shape[2:]), terms)
    return (loss / accum, terms), jax.tree.map(lambda g: g / accum, grads)

  return accumulated


def _diffusion_inputs(config, diffusion, graphdef) -> tuple[Callable, Callable]:
  """The diffusion loss and its inputs: t and the noise drawn for the global batch."""
  loss_fn = make_loss_fn(config, graphdef, diffusion)

  def inputs(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    key_t, key_noise, key_model = jax.random.split(key, 3)
    images = batch["image"]
    draw = process_lib.draw(diffusion, key_t, key_noise, images, state.loss_history)
    y = conditioning(config, batch)
    return (images, y, draw.t, draw.noise, draw.weights), key_model

  return loss_fn, inputs


def conditioning(config: ml_collections.ConfigDict, batch: dict[str, jax.Array]) -> Any:
  """What the denoiser is conditioned on in ``batch``: None, the class labels ``[B]``, or for a
  text run ``{"tokens", "mask", "pooled"}`` (``{"ids", "mask"}`` for the jointly trained
  transformer), and ``"label"`` if class-conditional."""
  labels = batch.get("label") if config.model.class_conditional else None
  if not is_text(config):
    return labels
  # The jointly trained transformer reads byte ids; a frozen encoder's output is in the batch.
  keys = ("ids", "mask") if config.text.encoder == "transformer" else ("tokens", "mask", "pooled")
  y = {k: batch[k] for k in keys}
  return y if labels is None else {**y, "label": labels}


def _autoencoder_inputs(config, graphdef) -> tuple[Callable, Callable]:
  """The autoencoder's loss and its inputs: the images and whether the adversary is on."""
  loss_fn = autoencoder.make_loss_fn(config, graphdef, autoencoder.perceptual_net(config))

  def inputs(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    images = batch["image"]
    return (images, autoencoder.disc_on(config, state.step, images.shape[0])), key

  return loss_fn, inputs


def make_train_step(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  diffusion: process_lib.Process,
) -> StepFn:
  """The pure train step ``(state, batch, key) -> (state, metrics)``.

  ``batch`` holds the global batch: ``image`` ``[B, H, W, C]`` in [-1, 1] and ``label``
  ``[B]``. With ``training.grad_accum_steps = k`` the batch is split into k micro-batches
  whose gradients are averaged before one optimizer update. An autoencoder run
  (``model.name = "autoencoder"``) takes the same step with its own loss
  (:mod:`jaxdiff.training.autoencoder`).
  """
  tcfg = config.training
  accum = int(tcfg.grad_accum_steps)
  lr_fn = learning_rate_schedule(tcfg)
  if config.model.name == "autoencoder":
    loss_fn, inputs_fn = _autoencoder_inputs(config, graphdef)
    logged = autoencoder.TERMS
  else:
    loss_fn, inputs_fn = _diffusion_inputs(config, diffusion, graphdef)
    logged = ("simple", "vb", "prior", "reconstruction", "diffusion")  # the last: vdm's
  grad_fn = _accumulated(jax.value_and_grad(loss_fn, has_aux=True), accum)

  def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    if batch["image"].shape[0] % accum:
      raise ValueError(
        f"batch of {batch['image'].shape[0]} does not split into grad_accum_steps={accum}"
        " micro-batches"
      )
    inputs, key_model = inputs_fn(state, batch, jax.random.fold_in(key, state.step))
    (loss, terms), grads = grad_fn(state.params, *inputs, key_model)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(tcfg, state.step)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    history = state.loss_history
    if history is not None:
      history = timesteps.update(history, terms["t"], terms["loss"])
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": lr_fn(state.step),
      "ema_decay": decay,
      **{name: jnp.mean(terms[name]) for name in logged if name in terms},
    }
    new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, loss_history=history
    )
    return new_state, metrics

  return train_step


def jit_train_step(step_fn: StepFn, mesh: Mesh, state_shardings: Any) -> StepFn:
  """``jax.jit`` with explicit shardings: batch on ``data``, state as given, donated."""
  rep = parallel.replicated(mesh)
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, parallel.batch_sharding(mesh), rep),
    out_shardings=(state_shardings, rep),
    donate_argnums=(0,),
  )
