"""DPM-Solver++(2M); Lu et al. 2022, Algorithm 2 (S model calls, deterministic).

On the discrete chain (:func:`dpmpp_2m_step`) and on the grids of the continuous processes
(:func:`path_dpmpp_2m_step`: flow's straight path, EDM's sigma grid, VDM's learned schedule): the
solver needs only the path's ``alpha``, ``sigma`` and ``lambda = log(alpha / sigma)`` at the two
ends of a step, and a data prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core import process as process_lib
from jaxdiff.core.continuous import flow
from jaxdiff.core.diffusion import Diffusion, extract, p_mean_variance
from jaxdiff.core.process import FlowGrid
from jaxdiff.sampling.base import Chain, Sampler, bcast


def _extrapolated_x0(
  pred_x0: jax.Array,
  prev_pred_x0: jax.Array,
  h: jax.Array,
  h_prev: jax.Array,
  first_order: jax.Array,
) -> jax.Array:
  """``D = (1 + 1 / (2r)) x0_hat - 1 / (2r) x0_hat_prev`` with ``r = h_prev / h`` (Lu et al.
  2022, Algorithm 2), or ``x0_hat`` itself with ``first_order``."""
  # The inner where keeps h / h_prev finite when there is no h_prev.
  half_inv_r = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))
  half_inv_r = bcast(half_inv_r, pred_x0.ndim)
  return (1.0 + half_inv_r) * pred_x0 - half_inv_r * prev_pred_x0


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
  D = _extrapolated_x0(pred_x0, prev_pred_x0, h, h_prev, first_order)
  ratio = extract(d.sqrt_one_minus_alphas_cumprod, tp, nd) / extract(
    d.sqrt_one_minus_alphas_cumprod, t, nd
  )
  x_next = ratio * x - extract(d.sqrt_alphas_cumprod, tp, nd) * bcast(jnp.expm1(-h), nd) * D
  return jnp.where(bcast(t, nd) == 0, pred_x0, x_next), h


class PathLevel(NamedTuple):
  """A continuous process's path ``x = alpha y + sigma eps`` at one level, each ``[B]``: what
  DPM-Solver++ needs of it, with ``lam = log(alpha / sigma)`` (+-inf at the ends)."""

  alpha: jax.Array
  sigma: jax.Array
  lam: jax.Array


def path_dpmpp_2m_step(
  pred_x0: jax.Array,
  x: jax.Array,
  cur: PathLevel,
  nxt: PathLevel,
  prev_pred_x0: jax.Array,
  h_prev: jax.Array,
  first_order: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step between two levels of any Gaussian path: :func:`dpmpp_2m_step`'s
  update, ``x_next = (sigma_n / sigma) x - alpha_n (exp(-h) - 1) D`` with ``h = lam_n - lam``.

  The ends of a path are limits: from pure noise (flow's t = 1: alpha = 0, lambda = -inf) h is
  +inf, ``exp(-h) = 0`` and the step is ``sigma_n x + alpha_n D``; the step after it has an
  infinite ``r = h_prev / h``, so its ``1 / (2r)`` is 0 and it is first order too. Into the data
  (sigma_n = 0, lambda = +inf) the step returns ``D``; the sampler takes it first order.

  Args:
    pred_x0: ``[B, H, W, C]`` the data prediction at ``(x, cur)``.
    x: ``[B, H, W, C]`` at ``cur``.
    cur, nxt: the two levels.
    prev_pred_x0, h_prev, first_order: as :func:`dpmpp_2m_step`'s.

  Returns:
    ``(x at nxt, h)``.
  """
  nd = x.ndim
  h = nxt.lam - cur.lam
  D = _extrapolated_x0(pred_x0, prev_pred_x0, h, h_prev, first_order)
  x_next = bcast(nxt.sigma / cur.sigma, nd) * x - bcast(nxt.alpha * jnp.expm1(-h), nd) * D
  return x_next, h


def _flow_level(t: jax.Array) -> PathLevel:  # alpha = 1 - t, sigma = t
  return PathLevel(1.0 - t, t, jnp.log1p(-t) - jnp.log(t))


def _sigma_level(sigma: jax.Array) -> PathLevel:  # EDM: alpha = 1
  return PathLevel(jnp.ones_like(sigma), sigma, -jnp.log(sigma))


def _vdm_level(gamma: jax.Array) -> PathLevel:  # alpha^2 = sigmoid(-gamma), lambda = -gamma / 2
  return PathLevel(jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma)), -gamma / 2)


def _path_step(chain: Chain, x: jax.Array, t_index: jax.Array) -> tuple:
  """The data prediction at step ``t_index`` of a continuous grid (one model call) and the
  step's two levels; a grid's level k + 1 is where step k starts."""
  g, B = chain.d, x.shape[:1]
  at = lambda values, k: jnp.broadcast_to(values[t_index + k], B)  # noqa: E731
  if isinstance(g, FlowGrid):
    out, _ = chain.model(x, t_index)
    return flow.x0_from_velocity(x, out, at(g.times, 1)), _flow_level(at(g.times, 1)), \
      _flow_level(at(g.times, 0))  # fmt: skip
  if isinstance(g, process_lib.SigmaGrid):
    sigma = at(g.sigmas, 1)
    x0 = process_lib.denoise(g, chain.model_at, x, sigma)
    return x0, _sigma_level(sigma), _sigma_level(at(g.sigmas, 0))
  eps, _ = chain.model(x, t_index)  # a VDMGrid
  cur = _vdm_level(at(g.gammas, 1))
  x0 = (x - bcast(cur.sigma, x.ndim) * eps) / bcast(cur.alpha, x.ndim)
  return x0, cur, _vdm_level(at(g.gammas, 0))


CONTINUOUS_GRIDS = (FlowGrid, process_lib.SigmaGrid, process_lib.VDMGrid)


class DPMState(NamedTuple):
  """The multistep history DPM-Solver++(2M) extrapolates from."""

  x: jax.Array  # [B, H, W, C]
  prev_pred_x0: jax.Array  # [B, H, W, C] the previous step's x0_hat
  h_prev: jax.Array  # [B] the previous step's logSNR gap


def dpmpp_2m_sampler(*, clip_denoised: bool = True) -> Sampler:
  """DPM-Solver++(2M) with :func:`dpmpp_2m_step`; first order where it has no history."""

  def init(x_T: jax.Array, chain: Chain) -> DPMState:
    if isinstance(chain.d, process_lib.SigmaGrid):  # EDM starts at sigma_max x_T
      x_T = process_lib.sigma_start(chain.d, x_T)
    return DPMState(x_T, jnp.zeros_like(x_T), jnp.zeros(x_T.shape[:1], x_T.dtype))

  def step(carry: DPMState, i: jax.Array, t_index: jax.Array, chain: Chain) -> DPMState:
    history = (carry.prev_pred_x0, carry.h_prev)
    if isinstance(chain.d, CONTINUOUS_GRIDS):
      x0, cur, nxt = _path_step(chain, carry.x, t_index)
      x0 = jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0
      # First order on the first step (no history) and into the grid's last level (the data,
      # an infinite logSNR gap; VDM's t = 0).
      first_order = (i == 0) | (t_index == 0)
      x, h = path_dpmpp_2m_step(x0, carry.x, cur, nxt, *history, first_order)
      if isinstance(chain.d, process_lib.VDMGrid):  # the vdm samplers' end: z_0 / alpha_0
        x_0 = x / bcast(nxt.alpha, x.ndim)
        x = jnp.where(t_index == 0, jnp.clip(x_0, -1.0, 1.0) if clip_denoised else x_0, x)
      return DPMState(x, x0, h)
    out, t = chain.model(carry.x, t_index)
    x0 = p_mean_variance(chain.d, out, carry.x, t, clip_denoised=clip_denoised)["pred_x0"]
    # First order on the first step (no history) and into index 0, where the
    # logSNR gap is the widest and extrapolating x0_hat overshoots.
    first_order = (i == 0) | (t_index == 1)
    x, h = dpmpp_2m_step(chain.d, x0, carry.x, t, *history, first_order)
    return DPMState(x, x0, h)

  return Sampler(init, step)
