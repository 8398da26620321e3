"""EDM (Karras et al. 2022): preconditioning, training weight, the sigma grid and Heun steps.

EDM writes every diffusion as ``x = y + sigma n`` (data y, ``n ~ N(0, I)``) and a denoiser
``D(x; sigma) ~ E[y | x]``. The network F is wrapped so its inputs and targets have unit
variance (:func:`denoise`, Table 1), trained with :func:`loss_weight` at log-normal sigmas
(:func:`jaxdiff.core.continuous.times.edm_sigma`), and sampled by solving the probability-flow
ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` on the grid of :func:`sigma_steps`.

The step functions share one signature, so a ``lax.scan`` driver can use either::

  step(x, sigma_cur, sigma_next, denoise_fn, key) -> x_next        # sigmas: scalars
  denoise_fn = functools.partial(denoise, model_fn)                 # D(x; sigma)
  sigmas = sigma_steps(18)                                          # [19], last 0

A VP model runs on the same grid through :func:`sigma_from_vp` / :func:`vp_from_sigma`:
``sigma = sigma_t / alpha_t`` and ``x_sigma = x_t / alpha_t`` (Karras et al. 2022, eq. 4 with
``s(t) = alpha_t``), see :func:`denoise_from_vp_eps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous.conversions import bcast
from jaxdiff.core.continuous.vp import BETA_MAX, BETA_MIN
from jaxdiff.core.likelihood import mean_flat

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # F(c_in x, c_noise [B]) -> [B, H, W, C]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # D(x, sigma) -> [B, H, W, C]


class Preconditioning(NamedTuple):
  """EDM's ``c_skip, c_out, c_in, c_noise``, each shaped like sigma."""

  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def preconditioning(sigma: jax.Array, *, sigma_data: float = SIGMA_DATA) -> Preconditioning:
  """Karras et al. 2022, Table 1 (derived in App. B.6):

  ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = sigma sigma_data /
  sqrt(sigma^2 + sigma_data^2)``, ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, ``c_noise =
  ln(sigma) / 4``. They make F's input ``c_in (y + sigma n)`` and its effective target
  ``(y - c_skip (y + sigma n)) / c_out`` unit-variance for data of standard deviation
  sigma_data. c_noise is -inf at sigma = 0: never call the network there.
  """
  sigma = jnp.asarray(sigma)
  total = jnp.square(sigma) + sigma_data**2
  return Preconditioning(
    c_skip=sigma_data**2 / total,
    c_out=sigma * sigma_data * jax.lax.rsqrt(total),
    c_in=jax.lax.rsqrt(total),
    c_noise=0.25 * jnp.log(sigma),
  )


def denoise(
  model_fn: ModelFn, x: jax.Array, sigma: jax.Array, *, sigma_data: float = SIGMA_DATA
) -> jax.Array:
  """``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``; Karras et al. 2022, eq. 7.

  Args:
    model_fn: the raw network ``F(x_in, c_noise) -> [B, H, W, C]``, ``c_noise`` ``[B]``.
    x: ``[B, H, W, C]`` noisy data ``y + sigma n``.
    sigma: a scalar or ``[B]`` noise level > 0.
    sigma_data: the data's standard deviation.

  Returns:
    ``[B, H, W, C]``, the estimate of y.
  """
  c = preconditioning(sigma, sigma_data=sigma_data)
  c_noise = jnp.broadcast_to(c.c_noise, x.shape[:1])
  out = model_fn(bcast(c.c_in, x.ndim) * x, c_noise)
  return bcast(c.c_skip, x.ndim) * x + bcast(c.c_out, x.ndim) * out


def loss_weight(sigma: jax.Array, *, sigma_data: float = SIGMA_DATA) -> jax.Array:
  """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``; Karras et al. 2022,
  Table 1. Equal to ``1 / c_out^2``: the loss on F's effective target has unit weight."""
  return (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)


def training_loss(
  denoise_fn: DenoiseFn,
  y: jax.Array,
  sigma: jax.Array,
  noise: jax.Array,
  *,
  sigma_data: float = SIGMA_DATA,
) -> jax.Array:
  """``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``, averaged over pixels; ``[B]``.

  Karras et al. 2022, eq. 2 weighted as eq. 8, at one draw of sigma (``times.edm_sigma``) and n.

  Args:
    denoise_fn: ``D(x, sigma)``, e.g. ``functools.partial(denoise, model_fn)``.
    y: ``[B, H, W, C]`` data.
    sigma: ``[B]`` noise levels.
    noise: standard normal, shaped like y.
  """
  x = y + bcast(sigma, y.ndim) * noise
  return loss_weight(sigma, sigma_data=sigma_data) * mean_flat(jnp.square(denoise_fn(x, sigma) - y))


def sigma_steps(
  num_steps: int,
  *,
  sigma_min: float = SIGMA_MIN,
  sigma_max: float = SIGMA_MAX,
  rho: float = RHO,
) -> jax.Array:
  """``[N + 1]`` noise levels, decreasing: Karras et al. 2022, eq. 5, with ``sigma_N = 0``.

  ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
  for ``i = 0..N-1`` (sigma_0 = sigma_max, sigma_{N-1} = sigma_min), then 0. rho = 7 spends the
  steps near sigma_min, where the ODE's curvature is. ``N = 1`` keeps sigma_max only.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  i = jnp.arange(num_steps, dtype=jnp.float32)
  frac = i / max(num_steps - 1, 1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigmas = (hi + frac * (lo - hi)) ** rho
  return jnp.append(sigmas, 0.0)


def _heun_from(
  x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, denoise_fn: DenoiseFn
) -> jax.Array:
  """Lines 4-8 of Alg. 1 / 5-10 of Alg. 2: an Euler step of ``dx/dsigma = (x - D) / sigma``,
  corrected by the trapezoidal rule unless sigma_next = 0 (where D is never evaluated)."""
  d = (x - denoise_fn(x, sigma)) / sigma
  x_euler = x + (sigma_next - sigma) * d

  def correct() -> jax.Array:
    d_next = (x_euler - denoise_fn(x_euler, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next)

  return jax.lax.cond(sigma_next > 0, correct, lambda: x_euler)


def heun_step(
  x: jax.Array,
  sigma_cur: jax.Array,
  sigma_next: jax.Array,
  denoise_fn: DenoiseFn,
  key: jax.Array | None = None,
) -> jax.Array:
  """One deterministic step of Karras et al. 2022, Alg. 1 (Heun's 2nd order method).

  Args:
    x: ``[B, H, W, C]`` at noise level ``sigma_cur``.
    sigma_cur, sigma_next: scalar noise levels, ``sigma_cur > 0``; ``sigma_next = 0`` takes a
      plain Euler step (the last step of the grid).
    denoise_fn: ``D(x, sigma)``.
    key: unused (the signature is shared with :func:`stochastic_step`).

  Returns:
    ``[B, H, W, C]`` at ``sigma_next``.
  """
  del key
  return _heun_from(x, jnp.asarray(sigma_cur), jnp.asarray(sigma_next), denoise_fn)


def stochastic_step(
  x: jax.Array,
  sigma_cur: jax.Array,
  sigma_next: jax.Array,
  denoise_fn: DenoiseFn,
  key: jax.Array,
  *,
  num_steps: int,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = math.inf,
  s_noise: float = 1.0,
) -> jax.Array:
  """One step of Karras et al. 2022, Alg. 2: add noise to raise sigma, then a Heun step down.

  ``gamma = min(S_churn / N, sqrt(2) - 1)`` if ``S_tmin <= sigma_cur <= S_tmax`` else 0;
  ``sigma_hat = (1 + gamma) sigma_cur``; ``x_hat = x + sqrt(sigma_hat^2 - sigma_cur^2) S_noise
  z``; then :func:`heun_step` from ``(x_hat, sigma_hat)`` to sigma_next. ``S_churn = 0`` is
  Alg. 1 exactly. Bind the options with ``functools.partial`` for the shared step signature.

  Args:
    x: ``[B, H, W, C]`` at ``sigma_cur``.
    sigma_cur, sigma_next: scalar noise levels, ``sigma_cur > 0``.
    denoise_fn: ``D(x, sigma)``.
    key: draws z.
    num_steps: N, the number of steps of the whole grid (S_churn is spread over them).
    s_churn, s_tmin, s_tmax, s_noise: Alg. 2's S_churn, S_tmin, S_tmax, S_noise.
  """
  sigma_cur = jnp.asarray(sigma_cur)
  in_range = (sigma_cur >= s_tmin) & (sigma_cur <= s_tmax)
  gamma = jnp.where(in_range, min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
  sigma_hat = sigma_cur * (1.0 + gamma)
  z = s_noise * jax.random.normal(key, x.shape, x.dtype)
  # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (2 + gamma)): exactly 0 at gamma = 0, where the
  # difference of squares, fused into an FMA by XLA, can come out below 0 and give NaN.
  x_hat = x + sigma_cur * jnp.sqrt(gamma * (2.0 + gamma)) * z
  return _heun_from(x_hat, sigma_hat, jnp.asarray(sigma_next), denoise_fn)


# ----------------------------------------------------------------------------- VP <-> sigma


def sigma_from_vp(alpha: jax.Array, sigma_vp: jax.Array) -> jax.Array:
  """EDM's noise level of a VP marginal: ``sigma = sigma_t / alpha_t`` (Karras et al. 2022,
  eq. 4 with scale ``s(t) = alpha_t``); the state maps as ``x_sigma = x_t / alpha_t``."""
  return sigma_vp / alpha


def vp_from_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(alpha_t, sigma_t)`` of the VP marginal at EDM level sigma: ``alpha = 1 / sqrt(1 +
  sigma^2)``, ``sigma_t = sigma alpha``; ``x_t = alpha x_sigma``."""
  alpha = jax.lax.rsqrt(1.0 + jnp.square(sigma))
  return alpha, sigma * alpha


def denoise_from_vp_eps(
  eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, sigma: jax.Array
) -> jax.Array:
  """``D(x; sigma)`` of a VP eps-prediction model, for the steps above.

  With ``x_sigma = y + sigma n``, the VP state is ``x_t = alpha x_sigma`` (``alpha = 1 /
  sqrt(1 + sigma^2)``) and ``D = x_sigma - sigma eps_hat(x_t)``.

  Args:
    eps_fn: ``eps_fn(x_t, sigma) -> eps_hat`` with x_t the VP state and sigma EDM's level (scalar
      or ``[B]``); the caller maps sigma to its model's time, e.g. :func:`vp_linear_time`.
    x: ``[B, H, W, C]`` at EDM level sigma.
    sigma: a scalar or ``[B]`` level > 0.
  """
  alpha, _ = vp_from_sigma(sigma)
  return x - bcast(sigma, x.ndim) * eps_fn(bcast(alpha, x.ndim) * x, sigma)


def vp_linear_time(
  sigma: jax.Array, *, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
) -> jax.Array:
  """The t at which the linear-beta VP SDE has EDM level sigma; Karras et al. 2022, Table 1
  (VP's ``sigma^-1``): ``t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) /
  beta_d``, ``beta_d = beta_max - beta_min``."""
  beta_d = beta_max - beta_min
  return (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(jnp.square(sigma))) - beta_min) / beta_d
