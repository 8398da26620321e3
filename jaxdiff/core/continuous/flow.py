"""Flow matching / rectified flow: the straight path from data to noise and its ODE steps.

``x_t = (1 - t) x0 + t eps`` for t in [0, 1] (t = 0 data, t = 1 noise), and a network trained
to regress the velocity ``v = dx_t/dt = eps - x0``: rectified flow in the notation of Esser et
al. 2024, Sec. 2 and 3.1 (Liu et al. 2023, eq. 1, and Lipman et al. 2023's optimal-transport
path with sigma_min = 0 are the same with time reversed). This is the Gaussian
process of :mod:`.conversions` with ``alpha = 1 - t``, ``sigma = t``. Sampling integrates
``dx/dt = v(x, t)`` from t = 1 down to t = 0 with the steps below, whose signature is that of
:mod:`.edm`'s steps (``t`` in place of sigma), so one ``lax.scan`` driver runs either::

  step(x, t_cur, t_next, velocity_fn, key) -> x_next             # t: scalars
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous.conversions import bcast

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # v(x [B, H, W, C], t) -> like x


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """``x_t = (1 - t) x0 + t eps``; t a scalar or ``[B]``."""
  t = bcast(t, x0.ndim)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The conditional velocity ``d x_t / dt = eps - x0``, the regression target."""
  return noise - x0


def x0_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """``x0 = x_t - t v`` (the straight line followed back to t = 0)."""
  return x_t - bcast(t, x_t.ndim) * v


def eps_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """``eps = x_t + (1 - t) v`` (the straight line followed on to t = 1)."""
  return x_t + (1.0 - bcast(t, x_t.ndim)) * v


def euler_step(
  x: jax.Array,
  t_cur: jax.Array,
  t_next: jax.Array,
  velocity_fn: VelocityFn,
  key: jax.Array | None = None,
) -> jax.Array:
  """``x + (t_next - t_cur) v(x, t_cur)``: one explicit Euler step of ``dx/dt = v``.

  Args:
    x: ``[B, H, W, C]`` at ``t_cur``.
    t_cur, t_next: scalar times (decreasing when sampling).
    velocity_fn: ``v(x, t)`` with t passed as ``[B]``.
    key: unused (the signature is shared with the stochastic steps).
  """
  del key
  t_cur = jnp.asarray(t_cur, x.dtype)
  return x + (t_next - t_cur) * velocity_fn(x, jnp.broadcast_to(t_cur, x.shape[:1]))


def heun_step(
  x: jax.Array,
  t_cur: jax.Array,
  t_next: jax.Array,
  velocity_fn: VelocityFn,
  key: jax.Array | None = None,
) -> jax.Array:
  """One step of Heun's method (explicit trapezoidal rule) for ``dx/dt = v``; 2 evaluations.

  Unlike EDM's ODE, the velocity is finite at t = 0, so every step is corrected, the last too.
  """
  del key
  t_cur, t_next = jnp.asarray(t_cur, x.dtype), jnp.asarray(t_next, x.dtype)
  batch = x.shape[:1]
  v = velocity_fn(x, jnp.broadcast_to(t_cur, batch))
  x_euler = x + (t_next - t_cur) * v
  v_next = velocity_fn(x_euler, jnp.broadcast_to(t_next, batch))
  return x + (t_next - t_cur) * 0.5 * (v + v_next)
