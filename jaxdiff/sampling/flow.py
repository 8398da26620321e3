"""Euler and Heun ODE samplers of the flow process: ``dx/dt = v(x, t)`` from t = 1 to t = 0 on
the process's grid (:class:`jaxdiff.core.process.FlowGrid`), with the steps of
:mod:`jaxdiff.core.continuous.flow` (1 and 2 model calls per step); deterministic, so they draw
no noise and take no temperature. With ``clip_denoised`` the sample that reaches t = 0 is
clipped to [-1, 1], as the ddpm samplers clip their x0 estimates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous import flow
from jaxdiff.sampling.base import Chain, Sampler, State, init_state


def _ode_sampler(ode_step, clip_denoised: bool) -> Sampler:
  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    del i
    t_cur, t_next = chain.d.times[t_index + 1], chain.d.times[t_index]
    x = ode_step(carry.x, t_cur, t_next, chain.model_at)  # model_at: the guided velocity
    if clip_denoised:
      x = jnp.where(t_index == 0, jnp.clip(x, -1.0, 1.0), x)
    return State(x)

  return Sampler(init_state, step)


def euler_sampler(*, clip_denoised: bool = True) -> Sampler:
  """Explicit Euler, :func:`jaxdiff.core.continuous.flow.euler_step`: one model call per step."""
  return _ode_sampler(flow.euler_step, clip_denoised)


def heun_sampler(*, clip_denoised: bool = True) -> Sampler:
  """Heun's method, :func:`jaxdiff.core.continuous.flow.heun_step`: two model calls per step
  (the velocity at the Euler guess corrects every step, the last too)."""
  return _ode_sampler(flow.heun_step, clip_denoised)
