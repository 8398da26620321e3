"""Euler, Heun and EDM's stochastic sampler on a sigma grid: the probability-flow ODE
``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 1 with s = 1, sigma(t) = t)
from the grid's sigma_max down to 0, with the steps of :mod:`jaxdiff.core.continuous.edm`.

The grid is an EDM process's :class:`~jaxdiff.core.process.SigmaGrid` or, for a ddpm model, the
chain seen through ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``
(:class:`~jaxdiff.core.process.VPSigmaGrid`); :func:`jaxdiff.core.process.denoise` forms D from
the guided model either way, so classifier-free guidance applies as for every sampler (to F for
EDM, to the ddpm model's output, both affine in D). ``euler`` and ``heun`` take a flow grid too,
where they are :mod:`.flow`'s. The state starts at ``x_T`` scaled to the grid's sigma_max
(:func:`jaxdiff.core.process.sigma_start`) and ends at sigma = 0, the data; with
``clip_denoised`` that last sample is clipped to [-1, 1], as the flow samplers do (the ODE
itself is left unclipped). A trajectory's frames after x_T are the sigma-scale states x_sigma
(for ddpm ``x_t / alpha_t``), not the chain's x_t. Only ``edm_stochastic`` adds noise, scaled by
``s_noise`` times ``temperature``; ``euler`` and ``heun`` are deterministic.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxdiff.core import process as process_lib
from jaxdiff.core.continuous import edm, flow
from jaxdiff.core.process import FlowGrid
from jaxdiff.sampling import flow as flow_samplers
from jaxdiff.sampling.base import Chain, Sampler, State, bcast, step_key


def _euler(x, sigma_cur, sigma_next, denoise_fn, key=None):
  """One Euler step of ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022, Alg. 1 lines 4-5):
  :func:`jaxdiff.core.continuous.flow.euler_step` with that slope as the velocity."""
  slope = lambda x, sigma: (x - denoise_fn(x, sigma)) / bcast(sigma, x.ndim)  # noqa: E731
  return flow.euler_step(x, sigma_cur, sigma_next, slope, key)


def _init(x_T: jax.Array, chain: Chain) -> State:
  return State(process_lib.sigma_start(chain.d, x_T))


def _sigma_sampler(ode_step, clip_denoised: bool) -> Sampler:
  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    sigma_cur, sigma_next = chain.d.sigmas[t_index + 1], chain.d.sigmas[t_index]
    denoise_fn = functools.partial(process_lib.denoise, chain.d, chain.model_at)
    x = ode_step(carry.x, sigma_cur, sigma_next, denoise_fn, step_key(chain, i))
    if clip_denoised:
      x = jnp.where(t_index == 0, jnp.clip(x, -1.0, 1.0), x)
    return State(x)

  return Sampler(_init, step)


def _by_grid(on_flow: Sampler, on_sigma: Sampler) -> Sampler:
  """One sampler name for both kinds of grid; the grid's type is known when the scan is traced."""

  def pick(chain: Chain) -> Sampler:
    return on_flow if isinstance(chain.d, FlowGrid) else on_sigma

  return Sampler(
    lambda x_T, chain: pick(chain).init(x_T, chain),
    lambda carry, i, t, chain: pick(chain).step(carry, i, t, chain),
  )


def euler_sampler(*, clip_denoised: bool = True) -> Sampler:
  """Explicit Euler, one model call per step: in sigma on a sigma grid, in t on a flow grid."""
  return _by_grid(
    flow_samplers.euler_sampler(clip_denoised=clip_denoised), _sigma_sampler(_euler, clip_denoised)
  )


def heun_sampler(*, clip_denoised: bool = True) -> Sampler:
  """Heun's method, two model calls per step: on a sigma grid Karras et al. 2022, Alg. 1
  (:func:`jaxdiff.core.continuous.edm.heun_step`, plain Euler on the last step into sigma = 0);
  on a flow grid :func:`jaxdiff.sampling.flow.heun_sampler`."""
  return _by_grid(
    flow_samplers.heun_sampler(clip_denoised=clip_denoised),
    _sigma_sampler(edm.heun_step, clip_denoised),
  )


# sampling.s_tmax's "no upper bound": 0 (JSON has no infinity, and a churn window that ends at 0
# would be empty, which s_churn = 0 says already).
NO_S_TMAX = 0.0


def stochastic_sampler(
  *,
  clip_denoised: bool = True,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = NO_S_TMAX,
  s_noise: float = 1.0,
  temperature: float = 1.0,
) -> Sampler:
  """Karras et al. 2022, Alg. 2 (:func:`jaxdiff.core.continuous.edm.stochastic_step`): each step
  first raises sigma by ``gamma = min(s_churn / S, sqrt(2) - 1)`` (for ``s_tmin <= sigma <=
  s_tmax``) with fresh noise scaled by ``s_noise``, then takes a Heun step down; ``s_churn = 0``
  is the deterministic :func:`heun_sampler` exactly. Step i draws from ``fold_in(key, i)``.

  Args:
    clip_denoised: clip the final sample to [-1, 1].
    s_churn: the total churn, spread over the S steps (>= 0).
    s_tmin, s_tmax: the sigma window that is churned; ``s_tmax = 0`` (:data:`NO_S_TMAX`): no
      upper bound.
    s_noise: the scale of the added noise (EDM: slightly above 1 offsets the denoiser's loss of
      detail).
    temperature: scales the added noise too, as every sampler's ``temperature`` scales what it
      injects (0: no noise, the Heun steps alone on the raised sigmas).
  """
  if min(s_churn, s_tmin, s_tmax) < 0 or s_noise <= 0:
    raise ValueError(
      f"need s_churn >= 0, s_tmin >= 0, s_tmax >= 0 (0: no upper bound) and s_noise > 0; got"
      f" s_churn={s_churn}, s_tmin={s_tmin}, s_tmax={s_tmax}, s_noise={s_noise}"
    )
  if s_tmax != NO_S_TMAX and s_tmax < s_tmin:
    raise ValueError(f"s_tmax={s_tmax} is below s_tmin={s_tmin}; use s_tmax >= s_tmin or 0")
  upper = math.inf if s_tmax == NO_S_TMAX else float(s_tmax)
  noise = float(s_noise) * float(temperature)
  churn = dict(s_churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=upper, s_noise=noise)

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    ode_step = functools.partial(edm.stochastic_step, num_steps=chain.d.num_timesteps, **churn)
    return _sigma_sampler(ode_step, clip_denoised).step(carry, i, t_index, chain)

  return Sampler(_init, step)
