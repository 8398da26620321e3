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

The solver takes fixed steps (Heun, classic RK4: one ``lax.scan``) or adapts them (``dopri5``:
Dormand & Prince's embedded 5(4) pair with error control, as Song et al.'s RK45 of scipy; one
``lax.while_loop`` in which every example keeps its own step size, so an example's result does
not depend on the batch it is solved in).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous.conversions import bcast, sum_flat

DriftFn = Callable[[jax.Array, jax.Array], jax.Array]  # f(x [B, ...], t [B]) -> like x
FIXED_METHODS = ("heun", "rk4")
METHODS = FIXED_METHODS + ("dopri5",)
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
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 1000,
) -> dict[str, jax.Array]:
  """``log p_t0(x)`` by integrating the augmented probability-flow ODE from t0 to t1.

  Fixed steps ``h = (t1 - t0) / num_steps`` of Heun's method or classic RK4 in one
  ``lax.scan`` (so jit compiles one loop body whatever num_steps is), or adaptive ``dopri5``
  steps (:func:`dopri5_solve`) to the tolerances ``rtol``/``atol``. Song et al. 2021 start at
  ``t0 = 1e-5`` to avoid the singular score at t = 0 and solve with RK45 at ``rtol = atol =
  1e-5``.

  Args:
    drift_fn: ``f(x, t)`` of the ODE, t as ``[B]`` (e.g. :func:`vp_drift` of a score model);
      with ``dopri5`` the examples of a batch are at different t.
    x: ``[B, ...]`` the points whose log-density at t0 is wanted.
    key: draws the Rademacher probe (``divergence="hutchinson"`` only).
    num_steps: fixed steps of ``heun`` and ``rk4`` (unused by ``dopri5``).
    t0, t1: start and end of the integration (``t0 < t1`` for ``dopri5``).
    method: ``heun`` (2 drift evaluations per step), ``rk4`` (4) or ``dopri5`` (6 per attempted
      step, and 2 to choose the first).
    divergence: ``hutchinson`` or ``exact``.
    prior_logp: ``log p_t1`` per example.
    probe: Hutchinson's z, like x (in place of one drawn from ``key``): e.g. drawn per example,
      so that an example's estimate does not depend on the batch it is in.
    rtol, atol: ``dopri5``'s tolerances on the augmented state ``[x, delta]``.
    max_steps: ``dopri5``'s most attempted steps; an example that has not reached t1 by then
      has ``solved`` False.

  Returns:
    dict of ``log_p`` (``[B]`` nats), ``prior_logp`` and ``delta_logp`` (its two parts, ``[B]``),
    ``z`` (``x(t1)``, like x), ``nfe`` (``[B]`` drift evaluations) and ``solved`` (``[B]``: the
    solve reached t1; always True for fixed steps).
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

  if method == "dopri5":
    z, delta, nfe, solved = dopri5_solve(
      field, x, t0, t1, rtol=rtol, atol=atol, max_steps=max_steps
    )
  else:
    z, delta = _fixed_solve(field, x, t0, t1, num_steps, method)
    nfe = jnp.full(batch, num_steps * (2 if method == "heun" else 4), jnp.int32)
    solved = jnp.ones(batch, bool)
  prior = prior_logp(z)
  return {"log_p": prior + delta, "prior_logp": prior, "delta_logp": delta, "z": z, "nfe": nfe,
          "solved": solved}  # fmt: skip


Field = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # (y, t [B]) -> (f, div f)


def _fixed_solve(
  field: Field, x: jax.Array, t0: float, t1: float, num_steps: int, method: str
) -> tuple[jax.Array, jax.Array]:
  """``num_steps`` even steps of Heun's method or classic RK4 on ``[x, delta]``."""
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

  init = (x, jnp.zeros(x.shape[:1], x.dtype))
  (z, delta), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  return z, delta


# Dormand & Prince 1980 (Hairer, Norsett & Wanner, Solving ODEs I, Table II.5.2): the stages'
# nodes and coefficients; the last row is the 5th-order solution, at which the 7th stage is
# evaluated (first same as last), and _DP_ERR the 5th- minus 4th-order weights.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
  (),
  (1 / 5,),
  (3 / 40, 9 / 40),
  (44 / 45, -56 / 15, 32 / 9),
  (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
  (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_ERR = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4, strict=True))
# Step-size control as scipy's RK45: h *= 0.9 err^(-1/5), within [0.2, 10], and not up right
# after a rejected step.
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _combine(base: jax.Array, h: jax.Array, weights: tuple[float, ...], ks: list) -> jax.Array:
  """``base + h sum_j w_j k_j`` with a per-example h (zero weights skipped)."""
  acc = None
  for w, k in zip(weights, ks, strict=True):
    if w:
      acc = w * k if acc is None else acc + w * k
  return base if acc is None else base + bcast(h, base.ndim) * acc


def _scaled_rms(ey: jax.Array, ed: jax.Array, sy: jax.Array, sd: jax.Array) -> jax.Array:
  """``[B]`` RMS over the ``D + 1`` components of ``[y, delta]`` of ``e / scale``: scipy's norm."""
  dims = math.prod(ey.shape[1:]) + 1
  return jnp.sqrt((sum_flat(jnp.square(ey / sy)) + jnp.square(ed / sd)) / dims)


def _first_step(
  field: Field, x: jax.Array, f: jax.Array, df: jax.Array, t0: jax.Array, span: jax.Array,
  rtol: float, atol: float,
) -> jax.Array:  # fmt: skip
  """``[B]`` first step sizes (Hairer, Norsett & Wanner II.4, as scipy's RK45 chooses them):
  from the sizes of y and f at t0 and of f's change over one trial Euler step."""
  sy, sd = atol + rtol * jnp.abs(x), jnp.full(df.shape, atol, x.dtype)
  d0, d1 = _scaled_rms(x, jnp.zeros_like(df), sy, sd), _scaled_rms(f, df, sy, sd)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
  h0 = jnp.minimum(h0, span)
  f_trial, df_trial = field(_combine(x, h0, (1.0,), [f]), t0 + h0)
  d2 = _scaled_rms(f_trial - f, df_trial - df, sy, sd) / h0
  big = jnp.maximum(d1, d2)
  h1 = jnp.where(
    big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(big, 1e-30)) ** 0.2
  )
  return jnp.minimum(jnp.minimum(100.0 * h0, h1), span)


def _dopri5_attempt(field: Field, t1: jax.Array, rtol: float, atol: float, carry: tuple) -> tuple:
  """One attempted step of every example still short of t1: accepted where the scaled error
  is at most 1; the step size changes either way."""
  i, t, h, y, delta, f, df, nfe, rejected = carry
  active = t < t1
  last = h >= t1 - t
  h = jnp.where(last, t1 - t, h)
  ks, dks = [f], [df]
  for c, row in zip(_DP_C[1:], _DP_A[1:], strict=True):
    k, dk = field(_combine(y, h, row, ks), t + c * h)  # (delta never feeds back into f)
    ks.append(k)
    dks.append(dk)
  y_new, delta_new = _combine(y, h, _DP_B5[:6], ks), _combine(delta, h, _DP_B5[:6], dks)
  k7, dk7 = field(y_new, t + h)
  ks.append(k7)
  dks.append(dk7)
  err = _scaled_rms(
    _combine(jnp.zeros_like(y), h, _DP_ERR, ks),
    _combine(jnp.zeros_like(delta), h, _DP_ERR, dks),
    atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new)),
    atol + rtol * jnp.maximum(jnp.abs(delta), jnp.abs(delta_new)),
  )
  accept = active & (err <= 1.0)
  grow = jnp.where(err == 0, _MAX_FACTOR, _SAFETY * jnp.maximum(err, 1e-30) ** -0.2)
  factor = jnp.clip(grow, _MIN_FACTOR, jnp.where(rejected, 1.0, _MAX_FACTOR))
  keep = lambda new, old: jnp.where(bcast(accept, new.ndim), new, old)  # noqa: E731
  t_new = jnp.where(last, t1, t + h)
  return (
    i + 1,
    jnp.where(accept, t_new, t),
    jnp.where(active, h * factor, h),
    keep(y_new, y),
    keep(delta_new, delta),
    keep(k7, f),
    keep(dk7, df),
    nfe + 6 * active.astype(jnp.int32),
    jnp.where(active, ~accept, rejected),
  )


def dopri5_solve(
  field: Field,
  x: jax.Array,
  t0: float,
  t1: float,
  *,
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 1000,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Solve ``d[y, delta]/dt = field(y, t)`` from t0 to t1 with adaptive Dormand-Prince 5(4)
  steps, each example with its own step size, in one ``lax.while_loop``.

  An attempted step is accepted where the error estimate's RMS over the ``D + 1`` components of
  ``[y, delta]``, each scaled by ``atol + rtol max(|old|, |new|)``, is at most 1 (scipy's RK45
  rule); the first step size is Hairer, Norsett & Wanner's (II.4) from one Euler step. The loop
  runs until every example has reached t1 or ``max_steps`` steps were attempted; examples that
  are done ride along unchanged.

  Args:
    field: ``(y [B, ...], t [B]) -> (dy/dt, d delta/dt [B])``, each example independent.
    x: ``[B, ...]`` the start ``y(t0)`` (``delta(t0) = 0``).
    t0, t1: floats, ``t0 < t1``.
    rtol, atol: positive tolerances.
    max_steps: the most attempted steps per example.

  Returns:
    ``(y(t1), delta(t1), nfe [B] int32, solved [B] bool)``.
  """
  if not t0 < t1:
    raise ValueError(f"dopri5 integrates forward: need t0 < t1, got {t0} and {t1}")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol={rtol}, atol={atol}: the tolerances must be positive")
  if max_steps < 1:
    raise ValueError(f"max_steps={max_steps}: need >= 1")
  b, dtype = x.shape[0], x.dtype
  t0_, t1_ = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  delta = jnp.zeros((b,), dtype)
  f, df = field(x, jnp.full((b,), t0_))
  h = _first_step(field, x, f, df, t0_, t1_ - t0_, rtol, atol)

  attempt = functools.partial(_dopri5_attempt, field, t1_, rtol, atol)

  def running(carry: tuple) -> jax.Array:
    i, t = carry[:2]
    return (i < max_steps) & jnp.any(t < t1_)

  init = (jnp.int32(0), jnp.full((b,), t0_), h, x, delta, f, df, jnp.full((b,), 2, jnp.int32),
          jnp.zeros((b,), bool))  # fmt: skip
  _, t, _, y, delta, _, _, nfe, _ = jax.lax.while_loop(running, attempt, init)
  return y, delta, nfe, t >= t1_


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
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 1000,
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
    rtol=rtol,
    atol=atol,
    max_steps=max_steps,
  )
