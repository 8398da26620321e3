"""Variance-preserving schedules in continuous time: alpha(t), sigma(t) and logSNR for t in [0, 1].

Each schedule returns a :class:`VP` with ``alpha^2 + sigma^2 = 1``, t = 0 the data end and t = 1
the noise end. VDM (Kingma et al. 2021) writes a schedule as ``gamma(t) = -lambda(t)``, the
negative logSNR; :func:`vp_from_gamma` turns any such gamma (fixed or learned) into the
coefficients, and ``lambda t: -vp_linear(t).log_snr`` is the gamma of a named schedule.

Each formula is arranged so that neither end loses digits: sigma near t = 0 is computed from
``expm1`` or a product of sines, never as ``sqrt(1 - alpha^2)``.

Example::

  vp = vp_cosine(t)                                  # t: [B] in [0, 1]
  x_t = bcast(vp.alpha, 4) * x0 + bcast(vp.sigma, 4) * eps
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The VP SDE of DDPM's linear schedule (Song et al. 2021, Sec. 3.4 and their released configs).
BETA_MIN = 0.1
BETA_MAX = 20.0
# VDM's fixed and initial learned gamma endpoints (Kingma et al. 2021, the CIFAR-10 config of the
# official code): logSNR from 13.3 down to -5.
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


class VP(NamedTuple):
  """The marginal ``x_t = alpha x0 + sigma eps`` at some t, and lambda = log(alpha^2 / sigma^2)."""

  alpha: jax.Array
  sigma: jax.Array
  log_snr: jax.Array


def vp_from_gamma(gamma: jax.Array) -> VP:
  """``alpha^2 = sigmoid(-gamma)``, ``sigma^2 = sigmoid(gamma)``, lambda = -gamma.

  Kingma et al. 2021, Sec. 3: with gamma the negative logSNR, the variance-preserving marginal
  ``q(z_t | x) = N(alpha_t x, sigma_t^2 I)`` has ``sigma_t^2 = sigmoid(gamma(t))``. Works for
  gamma = +-inf (alpha or sigma 0).
  """
  gamma = jnp.asarray(gamma)
  return VP(
    alpha=jnp.sqrt(jax.nn.sigmoid(-gamma)), sigma=jnp.sqrt(jax.nn.sigmoid(gamma)), log_snr=-gamma
  )


def vp_linear(t: jax.Array, *, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX) -> VP:
  """The linear-beta VP SDE, ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` with ``beta(t) =
  beta_min + t (beta_max - beta_min)``; Song et al. 2021, eq. 11, marginal in App. B.

  With ``B(t) = int_0^t beta = beta_min t + 1/2 (beta_max - beta_min) t^2``:
  ``alpha = exp(-B / 2)``, ``sigma^2 = 1 - exp(-B) = -expm1(-B)`` and
  ``lambda = -log(expm1(B))``. At t = 0: alpha = 1, sigma = 0, lambda = +inf.
  """
  t = jnp.asarray(t)
  big_b = integrated_beta(t, beta_min=beta_min, beta_max=beta_max)
  return VP(
    alpha=jnp.exp(-0.5 * big_b),
    sigma=jnp.sqrt(-jnp.expm1(-big_b)),
    log_snr=-jnp.log(jnp.expm1(big_b)),
  )


def integrated_beta(
  t: jax.Array, *, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
) -> jax.Array:
  """``B(t) = int_0^t beta(s) ds`` of the linear-beta VP SDE (``alpha(t)^2 = exp(-B(t))``)."""
  return beta_min * t + 0.5 * (beta_max - beta_min) * jnp.square(t)


def beta_linear(
  t: jax.Array, *, beta_min: float = BETA_MIN, beta_max: float = BETA_MAX
) -> jax.Array:
  """``beta(t) = beta_min + t (beta_max - beta_min)``, the drift/diffusion rate of the VP SDE."""
  return beta_min + t * (beta_max - beta_min)


def vp_cosine(t: jax.Array, *, s: float = 0.008) -> VP:
  """Nichol & Dhariwal 2021, eq. 17, in continuous time: ``alpha^2 = f(t) / f(0)`` with
  ``f(t) = cos^2((t + s) / (1 + s) * pi / 2)``.

  Written without cancellation at either end: with ``u(t) = (t + s) / (1 + s) * pi / 2``,
  ``cos u = sin(pi / 2 - u)`` makes alpha(1) exactly 0, and ``cos^2 u0 - cos^2 u =
  sin(u - u0) sin(u + u0)`` gives sigma^2 without forming ``1 - alpha^2``. The discrete
  schedule's beta clip (0.999) has no counterpart here: alpha(1) = 0 and lambda(1) = -inf.
  """
  t = jnp.asarray(t)
  quarter = 0.5 * math.pi / (1.0 + s)
  cos_u0 = math.cos(quarter * s)
  alpha = jnp.sin(quarter * (1.0 - t)) / cos_u0
  sigma = jnp.sqrt(jnp.sin(quarter * t) * jnp.sin(quarter * (t + 2.0 * s))) / cos_u0
  return VP(alpha=alpha, sigma=sigma, log_snr=2.0 * (jnp.log(alpha) - jnp.log(sigma)))


def gamma_linear(
  t: jax.Array, *, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX
) -> jax.Array:
  """VDM's fixed schedule, linear in the negative logSNR: ``gamma(t) = gamma_min + (gamma_max -
  gamma_min) t`` (Kingma et al. 2021, ``NoiseSchedule_FixedLinear`` of the official code)."""
  return gamma_min + (gamma_max - gamma_min) * jnp.asarray(t)
