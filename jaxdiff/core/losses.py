"""Training losses of the discrete chain, given t and the noise.

The model enters only as ``model_fn(x_t, t) -> output``, where ``t`` is the
original-schedule step (:func:`jaxdiff.core.diffusion.model_timesteps`); labels,
dropout keys and parameters are closed over by the caller. t and the noise are
arguments: they are drawn in one place, :func:`jaxdiff.core.timesteps.draw`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.core.diffusion import (
  Diffusion,
  model_timesteps,
  predict_v,
  q_sample,
  snr,
  split_model_output,
)
from jaxdiff.core.likelihood import mean_flat, vb_terms_bpd

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
LOSS_TYPES = ("mse", "l1", "huber", "kl", "hybrid")


def min_snr_weight(d: Diffusion, t: jax.Array, gamma: float) -> jax.Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023) for the model's target, ``[B]``.

  Expressed as a weight on the x_0 error, the weight is min(SNR, gamma); on the
  eps error that is min(SNR, gamma) / SNR, and on the v error
  min(SNR, gamma) / (SNR + 1).
  """
  s = snr(d, t)
  clipped = jnp.minimum(s, gamma)
  if d.mean_type == "eps":
    return clipped / s
  if d.mean_type == "x0":
    return clipped
  return clipped / (s + 1.0)


def check_loss_type(d: Diffusion, loss_type: str) -> None:
  """Raises ValueError for an unknown loss or one that cannot train ``d``'s variance."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
  if loss_type in ("mse", "l1", "huber") and d.learned_variance:
    raise ValueError(
      f"loss_type {loss_type!r} gives the learned variance (var_type {d.var_type!r}) no"
      " training signal; use loss_type 'hybrid' or 'kl', or a fixed var_type"
    )
  if loss_type == "hybrid" and not d.learned_variance:
    raise ValueError(
      f"loss_type 'hybrid' trains a learned variance, but var_type is {d.var_type!r};"
      " use var_type 'learned' or 'learned_range', or loss_type 'mse'"
    )


def target(d: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """What the model's mean part is trained to predict: eps, x_0 or v (``d.mean_type``)."""
  if d.mean_type == "eps":
    return noise
  if d.mean_type == "x0":
    return x0
  return predict_v(d, x0, t, noise)


def simple_loss(err: jax.Array, loss_type: str, huber_delta: float = 1.0) -> jax.Array:
  """The "simple" loss of Ho et al. (eq. 14) on the target error, ``[B]``: mse, l1 or huber."""
  if loss_type == "l1":
    return mean_flat(jnp.abs(err))
  if loss_type == "huber":
    # Huber (1964): quadratic within delta of 0, linear outside, continuous slope at delta.
    a = jnp.abs(err)
    return mean_flat(jnp.where(a <= huber_delta, 0.5 * a**2, huber_delta * (a - 0.5 * huber_delta)))
  return mean_flat(jnp.square(err))


def training_losses(
  d: Diffusion,
  model_fn: ModelFn,
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  loss_type: str = "mse",
  min_snr_gamma: float = 0.0,
  huber_delta: float = 1.0,
  decoder: str = "discretized",
) -> dict[str, jax.Array]:
  """Per-example training losses at ``t`` (Ho et al. Alg. 1; Nichol & Dhariwal Sec. 3).

  Args:
    d: the diffusion.
    model_fn: ``model_fn(x_t, t) -> output``.
    x0: ``[B, H, W, C]`` data in [-1, 1].
    t: ``[B]`` int indices into ``d``.
    noise: standard normal, shaped like ``x0``.
    loss_type: ``mse``, ``l1`` or ``huber`` (the simple loss on the model's
      target), ``kl`` (the variational bound term times T), or ``hybrid``
      (mse + T/1000 times the bound term with the mean's gradient stopped,
      which trains a learned variance; Nichol & Dhariwal eq. 16).
    min_snr_gamma: > 0 weights the simple loss by min-SNR-gamma.
    huber_delta: the Huber loss's quadratic-to-linear threshold.
    decoder: the bound's ``L_0`` likelihood for ``kl`` / ``hybrid``: "discretized" (8-bit
      pixels) or "gaussian" (continuous data, e.g. latents); see ``likelihood.vb_terms_bpd``.

  Returns:
    dict with ``loss`` ``[B]`` (to be importance-weighted and averaged by the
    caller), ``t``, and the terms that make it up (``simple`` and/or ``vb``).
  """
  check_loss_type(d, loss_type)
  T = d.num_timesteps
  x_t = q_sample(d, x0, t, noise)
  output = model_fn(x_t, model_timesteps(d, t))
  terms: dict[str, jax.Array] = {"t": t}
  if loss_type == "kl":
    terms["vb"] = terms["loss"] = (
      vb_terms_bpd(d, output, x0, x_t, t, clip_denoised=False, decoder=decoder) * T
    )
    return terms
  mean_out, var_out = split_model_output(d, output)
  simple = simple_loss(mean_out - target(d, x0, t, noise), loss_type, huber_delta)
  if min_snr_gamma > 0:
    simple = simple * min_snr_weight(d, t, min_snr_gamma)
  terms["simple"] = terms["loss"] = simple
  if loss_type == "hybrid":
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    terms["vb"] = vb_terms_bpd(d, frozen, x0, x_t, t, clip_denoised=False, decoder=decoder) * (
      T / 1000.0
    )
    terms["loss"] = simple + terms["vb"]
  return terms
