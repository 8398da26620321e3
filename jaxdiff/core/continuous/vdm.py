"""The variational bound of a continuous-time VP diffusion: Kingma et al. 2021 (VDM).

For data x, the negative ELBO splits into three terms, each returned here in nats per example
(``[B]``, summed over pixels); :func:`nats_to_bpd` divides by ``D log 2``:

- prior: ``KL(q(z_1 | x) || N(0, I))`` (:func:`prior_kl`);
- reconstruction: ``-log p(x | z_0)`` under VDM's per-pixel categorical decoder
  (:func:`reconstruction_nll`);
- diffusion: the continuous-time loss ``1/2 gamma'(t) ||eps - eps_hat||^2`` at t ~ U(0, 1)
  (:func:`diffusion_loss`), or its T-step form (:func:`diffusion_loss_discrete`).

gamma is the negative logSNR, ``sigma_t^2 = sigmoid(gamma(t))`` (:mod:`.vp`). A gamma function
``gamma_fn(t) -> [B]`` may close over learned parameters (:mod:`jaxdiff.models.noise_schedule`):
:func:`gamma_and_derivative` forms gamma'(t) with one ``jax.jvp``, which ``jax.grad`` then
differentiates through to the schedule's parameters, as VDM's learned schedule needs.

Example::

  t = times.low_discrepancy(key, B)                      # [B]
  g_t, dg_t = gamma_and_derivative(gamma_fn, t)
  m = vp_from_gamma(g_t)
  z_t = bcast(m.alpha, 4) * x + bcast(m.sigma, 4) * eps
  loss = diffusion_loss(eps, eps_fn(z_t, g_t), dg_t)     # [B] nats
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core.continuous.conversions import bcast, sum_flat

VOCAB_SIZE = 256  # 8-bit pixels


def nats_to_bpd(nats: jax.Array, num_dims: int) -> jax.Array:
  """Nats per example to bits per dimension: ``nats / (D log 2)``; D = H W C of one example."""
  return nats / (num_dims * math.log(2.0))


def gamma_and_derivative(
  gamma_fn: Callable[[jax.Array], jax.Array], t: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(gamma(t), gamma'(t))``, each ``[B]``, from one forward-mode pass (``jax.jvp``).

  ``gamma_fn`` must map ``[B]`` times to ``[B]`` values elementwise (each output depends only on
  its own t), so the tangent of ones gives every example's own derivative.
  """
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


def diffusion_loss(eps: jax.Array, eps_hat: jax.Array, dgamma_dt: jax.Array) -> jax.Array:
  """The continuous-time diffusion loss ``1/2 gamma'(t) ||eps - eps_hat||^2``, ``[B]`` nats.

  Kingma et al. 2021, the continuous-time (``T -> inf``) diffusion loss ``L_inf = 1/2 E_{eps,
  t ~ U(0,1)}[gamma'(t) ||eps - eps_hat(z_t; t)||^2]``: a one-sample estimate per example.

  Args:
    eps: ``[B, H, W, C]`` the noise in ``z_t = alpha_t x + sigma_t eps``.
    eps_hat: ``[B, H, W, C]`` the model's prediction of it.
    dgamma_dt: ``[B]`` gamma'(t) (:func:`gamma_and_derivative`).
  """
  return 0.5 * dgamma_dt * sum_flat(jnp.square(eps - eps_hat))


def discretize_time(t: jax.Array, num_steps: int) -> jax.Array:
  """``ceil(t T) / T``: a time in ``(0, 1]`` on the grid ``i / T``, as VDM does for finite T
  (so that ``s = t - 1/T`` is the grid point before it)."""
  return jnp.ceil(t * num_steps) / num_steps


def diffusion_loss_discrete(
  eps: jax.Array,
  eps_hat: jax.Array,
  gamma_t: jax.Array,
  gamma_s: jax.Array,
  num_steps: int,
) -> jax.Array:
  """The T-step diffusion loss ``T/2 (exp(gamma(t) - gamma(s)) - 1) ||eps - eps_hat||^2``.

  Kingma et al. 2021, the discrete-time diffusion loss ``L_T`` in terms of eps: with ``t = i /
  T``, i uniform on ``1..T``, and ``s = t - 1/T``, ``L_T = T/2 E[(SNR(s) / SNR(t) - 1) ||eps -
  eps_hat||^2]``, where ``SNR(s) / SNR(t) = exp(gamma(t) - gamma(s))``; ``expm1`` keeps the
  digits of a small gap. As T grows this tends to :func:`diffusion_loss` (the gap is
  ``gamma'(t) / T``).

  Args:
    eps, eps_hat: ``[B, H, W, C]``.
    gamma_t, gamma_s: ``[B]`` gamma at t and at ``s = t - 1/T``.
    num_steps: T.

  Returns:
    ``[B]`` nats.
  """
  return 0.5 * num_steps * jnp.expm1(gamma_t - gamma_s) * sum_flat(jnp.square(eps - eps_hat))


def prior_kl(x: jax.Array, gamma_1: jax.Array) -> jax.Array:
  """``KL(q(z_1 | x) || N(0, I))`` in nats, ``[B]``; Kingma et al. 2021 (the prior loss).

  Per dimension, ``KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) = 1/2 (alpha_1^2 x^2 + sigma_1^2 -
  log sigma_1^2 - 1)`` with ``alpha_1^2 = sigmoid(-gamma_1)``, ``sigma_1^2 = sigmoid(gamma_1)``.

  Args:
    x: ``[B, H, W, C]`` data in [-1, 1].
    gamma_1: gamma(1), a scalar or ``[B]``.
  """
  g = bcast(gamma_1, x.ndim)
  var_1 = jax.nn.sigmoid(g)
  kl = 0.5 * (jax.nn.sigmoid(-g) * jnp.square(x) + var_1 - jax.nn.log_sigmoid(g) - 1.0)
  return sum_flat(jnp.broadcast_to(kl, x.shape))


def pixel_values(vocab_size: int = VOCAB_SIZE, *, centered: bool = False) -> jax.Array:
  """The ``[V]`` data values of the pixel levels ``k = 0..V-1``.

  ``centered=False``: ``k / ((V - 1) / 2) - 1``, jaxdiff's grid (``k / 127.5 - 1`` for 8 bits,
  :mod:`jaxdiff.io.images`), with both ends at -1 and +1. ``centered=True``: ``2 (k + 1/2) / V -
  1``, the grid of the official VDM code (``EncDec.encode``), a factor 255/256 narrower.
  """
  # A NumPy float32 constant, divided as jaxdiff.io.images divides (XLA would multiply by a
  # rounded reciprocal and miss the data's values by an ulp).
  k = np.arange(vocab_size, dtype=np.float32)
  if centered:
    values = np.float32(2.0) * (k + np.float32(0.5)) / np.float32(vocab_size) - np.float32(1.0)
  else:
    values = k / np.float32((vocab_size - 1) / 2.0) - np.float32(1.0)
  return jnp.asarray(values)


def pixel_indices(
  x: jax.Array, vocab_size: int = VOCAB_SIZE, *, centered: bool = False
) -> jax.Array:
  """The level ``k`` of data values ``x`` on :func:`pixel_values`'s grid, int32, clipped."""
  k = (x + 1.0) * (vocab_size / 2.0) - 0.5 if centered else (x + 1.0) * ((vocab_size - 1) / 2.0)
  return jnp.clip(jnp.round(k), 0, vocab_size - 1).astype(jnp.int32)


def decoder_logprobs(
  z_0: jax.Array,
  gamma_0: jax.Array,
  *,
  vocab_size: int = VOCAB_SIZE,
  centered: bool = False,
) -> jax.Array:
  """``log p(x = k | z_0)`` for every level k: VDM's factorised categorical decoder.

  Kingma et al. 2021 (the reconstruction loss) and ``EncDec.decode`` of the official code:
  each pixel independently, ``p(x = k | z_0) = softmax_k(-1/2 ((z_0 / alpha_0 - x_k) /
  (sigma_0 / alpha_0))^2)``, i.e. ``q(z_0 | x)`` normalised over the V candidate values ``x_k``
  of :func:`pixel_values`. ``sigma_0 / alpha_0 = exp(gamma_0 / 2)`` exactly.

  Args:
    z_0: ``[B, H, W, C]`` the latent at t = 0, ``alpha_0 x + sigma_0 eps``.
    gamma_0: gamma(0), a scalar or ``[B]``.
    vocab_size: V.
    centered: the grid of the data (see :func:`pixel_values`).

  Returns:
    ``[B, H, W, C, V]`` log-probabilities in nats.
  """
  g = bcast(gamma_0, z_0.ndim)
  z_rescaled = z_0 * jnp.sqrt(1.0 + jnp.exp(g))  # z_0 / alpha_0, as 1 / alpha^2 = 1 + e^gamma
  inv_scale = jnp.exp(-0.5 * g)[..., None]  # alpha_0 / sigma_0
  values = pixel_values(vocab_size, centered=centered).astype(z_0.dtype)
  logits = -0.5 * jnp.square((z_rescaled[..., None] - values) * inv_scale)  # [B, H, W, C, V]
  return jax.nn.log_softmax(logits, axis=-1)


def reconstruction_nll(
  x: jax.Array,
  z_0: jax.Array,
  gamma_0: jax.Array,
  *,
  vocab_size: int = VOCAB_SIZE,
  centered: bool = False,
) -> jax.Array:
  """``-log p(x | z_0)`` in nats, ``[B]``, under :func:`decoder_logprobs`.

  Args:
    x: ``[B, H, W, C]`` data on the grid of :func:`pixel_values` (``k / 127.5 - 1`` by default).
    z_0: ``[B, H, W, C]`` a draw of ``q(z_0 | x) = N(alpha_0 x, sigma_0^2 I)``.
    gamma_0: gamma(0), a scalar or ``[B]``.
    vocab_size, centered: the pixel grid.
  """
  logp = decoder_logprobs(z_0, gamma_0, vocab_size=vocab_size, centered=centered)
  k = pixel_indices(x, vocab_size, centered=centered)
  return -sum_flat(jnp.take_along_axis(logp, k[..., None], axis=-1)[..., 0])


# ----------------------------------------------------------------------------- the schedule's
# variance-minimising gradient


@jax.custom_vjp
def variance_tap(gammas: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """``(gammas, carrier)``: gammas unchanged and a ``[B]`` zero carrier for :func:`variance_close`.

  Kingma et al. 2021, App. I.2 (the variance-minimising schedule): the schedule's parameters
  eta should follow ``d E[L_diff^2] / d eta = E[2 L_diff dL_diff / d eta]`` rather than the
  bound's gradient, which for the shape between the endpoints is zero in expectation. Every path
  from eta to the diffusion loss goes through its gamma values (``z_t``'s alpha and sigma, the
  weight gamma'(t), the gap ``gamma(t) - gamma(s)``); tapping them here and closing the loss with
  :func:`variance_close` multiplies the cotangent that reaches them, per example, by
  ``2 L_diff``, while everything else (the denoiser, behind eps_hat) gets the plain gradient.
  The forward pass is the identity. Each ``gammas`` entry is ``[B]``.
  """
  return gammas, jnp.zeros_like(gammas[0])


def _tap_fwd(gammas):
  return variance_tap(gammas), None


def _tap_bwd(_, cotangents):
  ct_gammas, ct_carrier = cotangents  # ct_carrier: the loss itself, from variance_close
  return (tuple(2.0 * ct_carrier * ct for ct in ct_gammas),)


variance_tap.defvjp(_tap_fwd, _tap_bwd)


@jax.custom_vjp
def variance_close(loss: jax.Array, carrier: jax.Array) -> jax.Array:
  """``loss`` ``[B]`` unchanged; its backward pass hands ``loss`` (not a gradient) to the
  carrier of :func:`variance_tap`, which scales the gamma cotangents by ``2 loss``."""
  del carrier
  return loss


def _close_fwd(loss, carrier):
  del carrier
  return loss, loss


def _close_bwd(loss, ct):
  return ct, jax.lax.stop_gradient(loss)


variance_close.defvjp(_close_fwd, _close_bwd)


# ----------------------------------------------------------------------------- sampling


def ancestral_step(
  z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array, gamma_s: jax.Array, noise: jax.Array
) -> jax.Array:
  """One draw of ``p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))``, s < t.

  Kingma et al. 2021, Sec. 3.3, in terms of eps (the official code's ``VDM.sample``): with
  ``c = -expm1(gamma_s - gamma_t) = 1 - SNR(t) / SNR(s)``,
  ``z_s = alpha_s / alpha_t (z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) noise``.

  Args:
    z_t, eps_hat, noise: ``[B, H, W, C]``.
    gamma_t, gamma_s: gamma at t and s, scalars or ``[B]``.
  """
  g_t, g_s = bcast(gamma_t, z_t.ndim), bcast(gamma_s, z_t.ndim)
  c = -jnp.expm1(g_s - g_t)
  mean = jnp.sqrt(jax.nn.sigmoid(-g_s) / jax.nn.sigmoid(-g_t)) * (
    z_t - jnp.sqrt(jax.nn.sigmoid(g_t)) * c * eps_hat
  )
  return mean + jnp.sqrt(jax.nn.sigmoid(g_s) * c) * noise


def ddim_step(
  z_t: jax.Array, eps_hat: jax.Array, gamma_t: jax.Array, gamma_s: jax.Array
) -> jax.Array:
  """The deterministic step ``z_s = alpha_s x_hat + sigma_s eps_hat``, ``x_hat = (z_t - sigma_t
  eps_hat) / alpha_t``: Song et al. 2021 (DDIM), eq. 12 with sigma = 0, on VDM's gamma."""
  g_t, g_s = bcast(gamma_t, z_t.ndim), bcast(gamma_s, z_t.ndim)
  x_hat = (z_t - jnp.sqrt(jax.nn.sigmoid(g_t)) * eps_hat) / jnp.sqrt(jax.nn.sigmoid(-g_t))
  return jnp.sqrt(jax.nn.sigmoid(-g_s)) * x_hat + jnp.sqrt(jax.nn.sigmoid(g_s)) * eps_hat
