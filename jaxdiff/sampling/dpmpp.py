"""DPM-Solver++(2M); Lu et al. 2022, Algorithm 2 (S model calls, deterministic)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core.diffusion import Diffusion, extract, p_mean_variance
from jaxdiff.sampling.base import Chain, Sampler, bcast


def dpmpp_2m_step(
  d: Diffusion,
  pred_x0: jax.Array,
  x: jax.Array,
  t: jax.Array,
  prev_pred_x0: jax.Array,
  h_prev: jax.Array,
  first_order: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step from index t to t - 1; Lu et al. 2022, Algorithm 2.

  With ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``, ``lambda = log(alpha / sigma)``
  and ``h = lambda_{t-1} - lambda_t``::

    D = (1 + 1 / (2r)) x0_hat_t - 1 / (2r) x0_hat_prev,   r = h_prev / h
    x_{t-1} = (sigma_{t-1} / sigma_t) x_t - alpha_{t-1} (exp(-h) - 1) D

  With ``first_order`` it uses ``D = x0_hat_t`` (DPM-Solver++(1), i.e. DDIM).
  From index 0 the step goes to ``alpha = 1, sigma = 0`` (lambda = +inf):
  first order, it returns ``x0_hat_0`` itself, the final denoising.

  Args:
    d: the (possibly respaced) diffusion.
    pred_x0: ``[B, H, W, C]`` the data prediction at ``(x, t)``.
    x: ``[B, H, W, C]`` x_t.
    t: ``[B]`` int indices into ``d``.
    prev_pred_x0: the previous step's data prediction (unused if ``first_order``).
    h_prev: ``[B]`` the previous step's h (unused if ``first_order``).
    first_order: scalar bool: take the first-order step.

  Returns:
    ``(x_{t-1}, h)``.
  """
  nd = x.ndim
  tp = jnp.maximum(t - 1, 0)
  lam = 0.5 * (jnp.log(d.alphas_cumprod[t]) - d.log_one_minus_alphas_cumprod[t])  # [B]
  lam_next = 0.5 * (jnp.log(d.alphas_cumprod[tp]) - d.log_one_minus_alphas_cumprod[tp])
  h = lam_next - lam
  # 1 / (2r); the inner where keeps h / h_prev finite when there is no h_prev.
  half_inv_r = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))
  half_inv_r = bcast(half_inv_r, nd)
  D = (1.0 + half_inv_r) * pred_x0 - half_inv_r * prev_pred_x0
  ratio = extract(d.sqrt_one_minus_alphas_cumprod, tp, nd) / extract(
    d.sqrt_one_minus_alphas_cumprod, t, nd
  )
  x_next = ratio * x - extract(d.sqrt_alphas_cumprod, tp, nd) * bcast(jnp.expm1(-h), nd) * D
  return jnp.where(bcast(t, nd) == 0, pred_x0, x_next), h


class DPMState(NamedTuple):
  """The multistep history DPM-Solver++(2M) extrapolates from."""

  x: jax.Array  # [B, H, W, C]
  prev_pred_x0: jax.Array  # [B, H, W, C] the previous step's x0_hat
  h_prev: jax.Array  # [B] the previous step's logSNR gap


def dpmpp_2m_sampler(*, clip_denoised: bool = True) -> Sampler:
  """DPM-Solver++(2M) with :func:`dpmpp_2m_step`; first order where it has no history."""

  def init(x_T: jax.Array, chain: Chain) -> DPMState:
    del chain
    return DPMState(x_T, jnp.zeros_like(x_T), jnp.zeros(x_T.shape[:1], x_T.dtype))

  def step(carry: DPMState, i: jax.Array, t_index: jax.Array, chain: Chain) -> DPMState:
    out, t = chain.model(carry.x, t_index)
    x0 = p_mean_variance(chain.d, out, carry.x, t, clip_denoised=clip_denoised)["pred_x0"]
    # First order on the first step (no history) and into index 0, where the
    # logSNR gap is the widest and extrapolating x0_hat overshoots.
    first_order = (i == 0) | (t_index == 1)
    x, h = dpmpp_2m_step(chain.d, x0, carry.x, t, carry.prev_pred_x0, carry.h_prev, first_order)
    return DPMState(x, x0, h)

  return Sampler(init, step)
