"""Exact log-likelihood through the probability-flow ODE; Song et al. 2021 (score SDE), Sec. 4.3.

A diffusion's marginals p_t are also those of the deterministic ODE ``dx/dt = f(x, t)`` (eq. 13;
for the VP SDE ``f = -1/2 beta(t) (x + score(x, t))``, :func:`vp_drift`). Along its solution,
``d log p_t(x(t)) / dt = -div f(x(t), t)`` (the instantaneous change of variables; Chen et al.
2018, Theorem 1), so integrating the augmented state ``[x, delta]`` with ``d delta/dt = div f``
from t0 to t1 gives (App. D.2)

  log p_t0(x(t0)) = log p_t1(x(t1)) + int_t0^t1 div f(x(t), t) dt,

with ``p_t1`` taken to be the prior (N(0, I) for VP). The divergence is exact (D Jacobian-vector
products, for small D) or Hutchinson's unbiased estimate ``E_z[z^T J z]`` with one Rademacher z
held fixed over the whole solve (Grathwohl et al. 2019, Sec. 3; Song et al. 2021, App. D.2), one
``jax.jvp`` per evaluation. Results are in nats per example; images need the dequantisation
offset before they become bits/dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous.conversions import bcast, sum_flat

DriftFn = Callable[[jax.Array, jax.Array], jax.Array]  # f(x [B, ...], t [B]) -> like x
METHODS = ("heun", "rk4")
DIVERGENCES = ("hutchinson", "exact")


def vp_drift(x: jax.Array, score: jax.Array, beta_t: jax.Array) -> jax.Array:
  """The probability-flow drift of the VP SDE: ``-1/2 beta(t) (x + score)``; Song et al. 2021,
  eq. 13 with ``f(x, t) = -1/2 beta(t) x`` and ``g(t)^2 = beta(t)`` (eq. 11).

  Args:
    x: ``[B, ...]``.
    score: ``grad_x log p_t(x)``, like x (``-eps_hat / sigma_t`` for an eps model).
    beta_t: a scalar or ``[B]``.
  """
  return -0.5 * bcast(beta_t, x.ndim) * (x + score)


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Independent +-1 entries with probability 1/2 each (zero mean, identity covariance)."""
  return jax.random.rademacher(key, shape).astype(dtype)


def hutchinson_divergence(
  fn: Callable[[jax.Array], jax.Array], x: jax.Array, z: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(fn(x), z^T J_fn(x) z)`` per example: Hutchinson's estimate of ``div fn = tr J``.

  Unbiased for any z with ``E[z z^T] = I``; one ``jax.jvp``. ``fn`` must treat the examples
  of the batch independently (the per-example Jacobians are then the diagonal blocks).

  Args:
    fn: ``[B, ...] -> [B, ...]``.
    x: ``[B, ...]``.
    z: like x, e.g. :func:`rademacher`.

  Returns:
    ``fn(x)`` and the ``[B]`` estimates.
  """
  f, jz = jax.jvp(fn, (x,), (z,))
  return f, sum_flat(z * jz)


def exact_divergence(
  fn: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(fn(x), tr J_fn(x))`` per example, from one ``jax.jvp`` per dimension (D = size of one
  example): for small D only, e.g. to check :func:`hutchinson_divergence`."""
  dims = math.prod(x.shape[1:])
  basis = jnp.eye(dims, dtype=x.dtype).reshape((dims, 1) + x.shape[1:])  # [D, 1, ...]

  def diagonal_entry(e: jax.Array) -> jax.Array:  # e: [1, ...], the same for every example
    _, je = jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),))
    return sum_flat(e * je)  # [B]

  return fn(x), jnp.sum(jax.vmap(diagonal_entry)(basis), axis=0)


def std_normal_logp(x: jax.Array) -> jax.Array:
  """``log N(x; 0, I)`` per example, ``[B]`` nats: the VP prior."""
  dims = math.prod(x.shape[1:])
  return -0.5 * sum_flat(jnp.square(x)) - 0.5 * dims * math.log(2.0 * math.pi)


def ode_log_likelihood(
  drift_fn: DriftFn,
  x: jax.Array,
  key: jax.Array | None = None,
  *,
  num_steps: int = 100,
  t0: float = 1e-5,
  t1: float = 1.0,
  method: str = "rk4",
  divergence: str = "hutchinson",
  prior_logp: Callable[[jax.Array], jax.Array] = std_normal_logp,
  probe: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """``log p_t0(x)`` by integrating the augmented probability-flow ODE from t0 to t1.

  Fixed steps ``h = (t1 - t0) / num_steps`` of Heun's method or classic RK4 in one
  ``lax.scan`` (so jit compiles one loop body whatever num_steps is). Song et al. 2021 start at
  ``t0 = 1e-5`` to avoid the singular score at t = 0.

  Args:
    drift_fn: ``f(x, t)`` of the ODE, t as ``[B]`` (e.g. :func:`vp_drift` of a score model).
    x: ``[B, ...]`` the points whose log-density at t0 is wanted.
    key: draws the Rademacher probe (``divergence="hutchinson"`` only).
    num_steps: fixed steps of the solver.
    t0, t1: start and end of the integration.
    method: ``heun`` (2 drift evaluations per step) or ``rk4`` (4).
    divergence: ``hutchinson`` or ``exact``.
    prior_logp: ``log p_t1`` per example.
    probe: Hutchinson's z, like x (in place of one drawn from ``key``): e.g. drawn per example,
      so that an example's estimate does not depend on the batch it is in.

  Returns:
    dict of ``log_p`` (``[B]`` nats), ``prior_logp`` and ``delta_logp`` (its two parts, ``[B]``)
    and ``z`` (``x(t1)``, like x).
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
  if divergence not in DIVERGENCES:
    raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
  if divergence == "hutchinson" and probe is None:
    if key is None:
      raise ValueError("divergence='hutchinson' needs a key (or a probe) for its Rademacher probe")
    probe = rademacher(key, x.shape, x.dtype)
  batch = x.shape[:1]

  def field(y: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    fn = lambda u: drift_fn(u, jnp.broadcast_to(t, batch))  # noqa: E731
    if divergence == "exact":
      return exact_divergence(fn, y)
    return hutchinson_divergence(fn, y, probe)

  h = (t1 - t0) / num_steps

  def step(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple, None]:
    y, delta = carry
    t = jnp.asarray(t0, x.dtype) + i.astype(x.dtype) * h
    if method == "heun":
      f1, d1 = field(y, t)
      f2, d2 = field(y + h * f1, t + h)
      return (y + 0.5 * h * (f1 + f2), delta + 0.5 * h * (d1 + d2)), None
    f1, d1 = field(y, t)
    f2, d2 = field(y + 0.5 * h * f1, t + 0.5 * h)
    f3, d3 = field(y + 0.5 * h * f2, t + 0.5 * h)
    f4, d4 = field(y + h * f3, t + h)
    y = y + h / 6.0 * (f1 + 2.0 * f2 + 2.0 * f3 + f4)
    return (y, delta + h / 6.0 * (d1 + 2.0 * d2 + 2.0 * d3 + d4)), None

  init = (x, jnp.zeros(batch, x.dtype))
  (z, delta), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  prior = prior_logp(z)
  return {"log_p": prior + delta, "prior_logp": prior, "delta_logp": delta, "z": z}


def denoiser_drift(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> DriftFn:
  """The probability-flow ODE of ``x = y + sigma n`` in ``u = ln sigma``: ``dx/du = x - D(x;
  sigma)``, Karras et al. 2022, eq. 3 (``dx/dsigma = (x - D) / sigma`` with ``sigma(t) = t``,
  ``s(t) = 1``) times ``dsigma/du = sigma``. Every process is this ODE in its own scaled
  coordinates (``x_t / alpha_t``, ``sigma_t / alpha_t``), so one solver serves all; in ``ln
  sigma`` the steps are even across the noise levels, where sigma itself spans five decades.

  Args:
    denoise_fn: ``D(x, sigma) -> [B, ...]``, sigma as ``[B]``.

  Returns:
    ``f(x, u)`` for :func:`ode_log_likelihood`, u as ``[B]``.
  """
  return lambda x, u: x - denoise_fn(x, jnp.exp(u))


class SigmaView(NamedTuple):
  """A model seen as ``x = y + sigma n`` (Karras et al. 2022, eq. 4): what
  :func:`sigma_log_likelihood` needs of any process (``jaxdiff.core.process.sigma_view``).

  Attributes:
    denoise: ``D(x, sigma) -> x0 estimate``, sigma as ``[B]``.
    sigma_min, sigma_max: the levels the ODE runs between.
    prior_var: the variance of the Gaussian prior at sigma_max.
  """

  denoise: Callable[[jax.Array, jax.Array], jax.Array]
  sigma_min: float
  sigma_max: float
  prior_var: float


def gaussian_logp(x: jax.Array, var: float | jax.Array) -> jax.Array:
  """``log N(x; 0, var I)`` per example, ``[B]`` nats: the prior at a finite largest sigma."""
  dims = math.prod(x.shape[1:])
  return -0.5 * sum_flat(jnp.square(x)) / var - 0.5 * dims * jnp.log(2.0 * math.pi * var)


def sigma_log_likelihood(
  denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
  x: jax.Array,
  key: jax.Array | None = None,
  *,
  sigma_min: float,
  sigma_max: float,
  prior_var: float,
  num_steps: int = 100,
  method: str = "rk4",
  divergence: str = "hutchinson",
  probe: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """``log p_{sigma_min}(x)`` of the denoiser's probability-flow ODE (:func:`denoiser_drift`),
  solved by :func:`ode_log_likelihood` from ``ln sigma_min`` to ``ln sigma_max`` with the prior
  ``N(0, prior_var I)`` at sigma_max (``sigma_max^2 + Var[y]`` for data y; the variance-preserving
  prior N(0, I) of ``x_t`` is ``1 + sigma^2`` in these coordinates).

  Returns:
    :func:`ode_log_likelihood`'s dict, in nats per example of ``x`` in these coordinates.
  """
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
  return ode_log_likelihood(
    denoiser_drift(denoise_fn),
    x,
    key,
    num_steps=num_steps,
    t0=math.log(sigma_min),
    t1=math.log(sigma_max),
    method=method,
    divergence=divergence,
    prior_logp=lambda z: gaussian_logp(z, prior_var),
    probe=probe,
  )
