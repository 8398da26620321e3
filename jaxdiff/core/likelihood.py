"""The variational bound of the discrete chain, in bits per dimension.

The negative ELBO of Ho et al. 2020 (eq. 5) is
``L = L_T + sum_{t>1} L_{t-1} + L_0``: a prior term KL(q(x_T|x_0) || N(0, I)),
Gaussian KL terms between the posterior and the model's reverse step, and a
discretized-Gaussian decoder NLL at t = 0. Each term here is averaged over
dimensions and divided by log 2 (bits/dim).

The model enters only as ``model_fn(x_t, t) -> output``, where ``t`` is the
original-schedule step (:func:`jaxdiff.core.diffusion.model_timesteps`); class
labels, dropout keys and parameters are closed over by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from jaxdiff.core.diffusion import (
  Diffusion,
  model_timesteps,
  p_mean_variance,
  predict_eps_from_x0,
  q_mean_variance,
  q_posterior_mean_variance,
  q_sample,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
_LOG2 = math.log(2.0)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first: ``[B, ...] -> [B]``."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
  mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (
    -1.0
    + logvar2
    - logvar1
    + jnp.exp(logvar1 - logvar2)
    + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
  )


def discretized_gaussian_log_likelihood(
  x: jax.Array, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
  """log p(x) of 8-bit data under a Gaussian discretized to 256 bins (Ho et al. eq. 13).

  Pixels live at ``k / 127.5 - 1`` for ``k = 0..255``; each owns a bin of width
  2/255 around it, except that the bins of -1 and +1 extend to -inf and +inf,
  so the 256 probabilities sum to one. Log-probabilities are floored at
  ``log(1e-12)``.

  Args:
    x: ``[...]`` data scaled to [-1, 1].
    means: Gaussian means, broadcastable to ``x``.
    log_scales: log standard deviations, broadcastable to ``x``.

  Returns:
    Elementwise log-likelihoods in nats, shaped like ``x``.
  """
  inv_stdv = jnp.exp(-log_scales)
  centered = x - means
  upper = jnp.where(x > 0.999, jnp.inf, inv_stdv * (centered + 1.0 / 255.0))
  lower = jnp.where(x < -0.999, -jnp.inf, inv_stdv * (centered - 1.0 / 255.0))
  # Phi(upper) - Phi(lower) loses every digit when both sit in the right tail
  # (1 - 1 in float32); there the mirrored difference Phi(-lower) - Phi(-upper)
  # is computed from small numbers instead.
  flip = lower > 0.0
  prob = ndtr(jnp.where(flip, -lower, upper)) - ndtr(jnp.where(flip, -upper, lower))
  return jnp.log(jnp.maximum(prob, 1e-12))


def gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """log N(x; means, exp(log_scales)^2), elementwise, in nats: the decoder of continuous data
  (a latent run's latents), a density rather than a probability, so it may be positive."""
  z = (x - means) * jnp.exp(-log_scales)
  return -0.5 * jnp.square(z) - log_scales - 0.5 * jnp.log(2.0 * jnp.pi)


# The decoder p(x_0 | x_1) of the bound's L_0: 8-bit pixels, or continuous values (latents).
DECODERS = {
  "discretized": discretized_gaussian_log_likelihood,
  "gaussian": gaussian_log_likelihood,
}


def _vb_terms(
  d: Diffusion,
  model_output: jax.Array,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  clip_denoised: bool,
  decoder: str = "discretized",
) -> dict[str, jax.Array]:
  true_mean, _, true_log_var = q_posterior_mean_variance(d, x0, x_t, t)
  p = p_mean_variance(d, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / _LOG2
  log_likelihood = DECODERS[decoder](x0, p["mean"], 0.5 * p["log_variance"])
  decoder_nll = -mean_flat(log_likelihood) / _LOG2
  return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_x0": p["pred_x0"]}


def vb_terms_bpd(
  d: Diffusion,
  model_output: jax.Array,
  x0: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  clip_denoised: bool = True,
  decoder: str = "discretized",
) -> jax.Array:
  """One term of the variational bound, in bits/dim (Ho et al. eq. 5).

  ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and
  the decoder NLL ``L_0 = -log p(x_0 | x_1)`` where ``t == 0``.

  Args:
    d: the diffusion.
    model_output: the model's output at ``(x_t, t)``.
    x0: ``[B, H, W, C]`` data in [-1, 1] (on the 8-bit grid for ``L_0``).
    x_t: ``[B, H, W, C]`` a sample of q(x_t | x_0).
    t: ``[B]`` int indices.
    clip_denoised: clip the model's x_0 estimate to [-1, 1].
    decoder: ``L_0``'s likelihood: "discretized" (8-bit pixels, Ho et al. eq. 13) or
      "gaussian" (continuous data such as latents: a density, so ``L_0`` may be negative and
      the bound is not comparable with a discrete one).

  Returns:
    ``[B]`` bits/dim.
  """
  return _vb_terms(d, model_output, x0, x_t, t, clip_denoised, decoder)["output"]


def prior_bpd(d: Diffusion, x0: jax.Array) -> jax.Array:
  """``L_T = KL(q(x_T | x_0) || N(0, I))`` in bits/dim, ``[B]``; no parameters involved."""
  t = jnp.full((x0.shape[0],), d.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_var = q_mean_variance(d, x0, t)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2


def calc_bpd_loop(
  d: Diffusion,
  model_fn: ModelFn,
  x0: jax.Array,
  key: jax.Array,
  *,
  clip_denoised: bool = True,
  decoder: str = "discretized",
) -> dict[str, jax.Array]:
  """The full variational bound: every one of the T terms plus the prior.

  One ``lax.scan`` over t, so wrapping this in ``jax.jit`` compiles a single
  loop whatever T is. The noise for term t is drawn from ``fold_in(key, t)``.

  Args:
    d: the diffusion.
    model_fn: ``model_fn(x_t, t) -> output``.
    x0: ``[B, H, W, C]`` data in [-1, 1].
    key: PRNG key.
    clip_denoised: clip the model's x_0 estimates (True in the reference evaluations).
    decoder: ``L_0``'s likelihood (see :func:`vb_terms_bpd`).

  Returns:
    dict with ``total_bpd`` ``[B]``, ``prior_bpd`` ``[B]``, and ``vb``,
    ``xstart_mse``, ``mse`` (of the implied noise), each ``[B, T]`` indexed by t.
  """
  terms = _scan_terms(
    d,
    model_fn,
    x0,
    jnp.arange(d.num_timesteps),
    lambda t_index: jax.random.normal(jax.random.fold_in(key, t_index), x0.shape, x0.dtype),
    clip_denoised,
    decoder,
  )
  prior = prior_bpd(d, x0)
  return {"total_bpd": jnp.sum(terms["vb"], axis=1) + prior, "prior_bpd": prior, **terms}


def _scan_terms(
  d: Diffusion,
  model_fn: ModelFn,
  x0: jax.Array,
  t_indices: jax.Array,
  noise_at: Callable[[jax.Array], jax.Array],
  clip_denoised: bool,
  decoder: str = "discretized",
) -> dict[str, jax.Array]:
  """One ``lax.scan`` over ``t_indices``: term t of the bound with noise ``noise_at(t)``."""
  B = x0.shape[0]

  def term(carry: None, t_index: jax.Array) -> tuple[None, tuple[jax.Array, ...]]:
    t = jnp.full((B,), t_index, dtype=jnp.int32)
    noise = noise_at(t_index)
    x_t = q_sample(d, x0, t, noise)
    output = model_fn(x_t, model_timesteps(d, t))
    terms = _vb_terms(d, output, x0, x_t, t, clip_denoised, decoder)
    eps = predict_eps_from_x0(d, x_t, t, terms["pred_x0"])
    return carry, (
      terms["output"],
      mean_flat(jnp.square(terms["pred_x0"] - x0)),
      mean_flat(jnp.square(eps - noise)),
    )

  _, (vb, xstart_mse, mse) = jax.lax.scan(term, None, jnp.asarray(t_indices, jnp.int32))
  return {"vb": vb.T, "xstart_mse": xstart_mse.T, "mse": mse.T}  # [K, B] -> [B, K]


def calc_bpd_terms(
  d: Diffusion,
  model_fn: ModelFn,
  x0: jax.Array,
  keys: jax.Array,
  t_indices: jax.Array,
  *,
  clip_denoised: bool = True,
  decoder: str = "discretized",
) -> dict[str, jax.Array]:
  """The bound's terms at the timesteps ``t_indices`` only, with per-example noise.

  The building block of a chunked evaluation (``jaxdiff.evaluation.bits_per_dim``): summing
  the ``vb`` of chunks that cover ``0..T-1`` and adding ``prior_bpd`` gives the full bound.
  The noise of example i at term t is drawn from ``fold_in(keys[i], t)``, so an example's
  terms depend on neither its batch, the batch size, the device count nor how t is chunked.

  Args:
    d: the diffusion.
    model_fn: ``model_fn(x_t, t) -> output``.
    x0: ``[B, H, W, C]`` data in [-1, 1].
    keys: ``[B]`` PRNG keys, one per example.
    t_indices: ``[K]`` int timestep indices (one ``lax.scan`` over them).
    clip_denoised: clip the model's x_0 estimates (True in the reference evaluations).
    decoder: ``L_0``'s likelihood (see :func:`vb_terms_bpd`).

  Returns:
    dict of ``vb`` (bits/dim), ``xstart_mse`` and ``mse`` (of the implied noise), each ``[B, K]``.
  """

  def noise_at(t_index: jax.Array) -> jax.Array:
    return jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, t_index), x0.shape[1:], x0.dtype)
    )(keys)

  return _scan_terms(d, model_fn, x0, t_indices, noise_at, clip_denoised, decoder)
