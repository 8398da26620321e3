"""What a model predicts, converted: eps, x0, v and the score of a Gaussian process.

Every continuous process here has the marginal ``x_t = alpha_t x0 + sigma_t eps`` with
``eps ~ N(0, I)``: VP (``alpha^2 + sigma^2 = 1``; Song et al. 2021, Kingma et al. 2021), EDM's
``alpha = 1`` (Karras et al. 2022) and flow matching's ``alpha = 1 - t, sigma = t`` (Lipman et al.
2023). Given ``(x_t, alpha, sigma)``, any one of the four predictions fixes the others:

- ``eps``: the noise;  ``x0``: the clean data;
- ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, Sec. 4 and App. D);
- ``score = grad log p(x_t | x0) = -eps / sigma`` (Song et al. 2021, eq. 7 for a Gaussian
  perturbation kernel).

``alpha`` and ``sigma`` are scalars or ``[B]`` (broadcast over ``[B, H, W, C]``). Nothing here
assumes ``alpha^2 + sigma^2 = 1``: the v formulas divide by ``alpha^2 + sigma^2``, which is 1 for
VP processes.

Example::

  x0_hat = convert(model_out, "v", "x0", x_t, alpha, sigma)     # [B, H, W, C]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "score")


def bcast(a: jax.Array | float, ndim: int) -> jax.Array:
  """A scalar or ``[B]`` per-example coefficient shaped ``[B, 1, ..., 1]`` for an ``ndim`` batch."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (ndim - a.ndim)) if a.ndim else a


def sum_flat(x: jax.Array) -> jax.Array:
  """Sum over all axes but the first: ``[B, ...] -> [B]`` (the per-example norms and densities
  here are sums over pixels; :func:`jaxdiff.core.likelihood.mean_flat` is the mean)."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def log_snr(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
  """lambda = log(alpha^2 / sigma^2), the logSNR (Kingma et al. 2021, Sec. 3: SNR = alpha^2 /
  sigma^2); ``+inf`` where sigma = 0, ``-inf`` where alpha = 0."""
  return 2.0 * (jnp.log(alpha) - jnp.log(sigma))


def to_x0_eps(
  kind: str, pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``(x0, eps)`` implied by a prediction of ``kind`` at ``x_t = alpha x0 + sigma eps``.

  From v (Salimans & Ho 2022, App. D, generalised to any alpha, sigma):
  ``alpha x_t - sigma v = (alpha^2 + sigma^2) x0`` and ``sigma x_t + alpha v = (alpha^2 +
  sigma^2) eps``. From eps or the score, x0 divides by alpha (undefined where alpha = 0); from
  x0, eps divides by sigma (undefined where sigma = 0).

  Args:
    kind: one of ``eps``, ``x0``, ``v``, ``score``.
    pred: the prediction, ``[B, H, W, C]``.
    x_t: ``[B, H, W, C]``.
    alpha, sigma: scalars or ``[B]``.

  Returns:
    ``(x0, eps)``, each shaped like ``x_t``.
  """
  a, s = bcast(alpha, x_t.ndim), bcast(sigma, x_t.ndim)
  if kind == "eps":
    return (x_t - s * pred) / a, pred
  if kind == "score":
    eps = -s * pred
    return (x_t - s * eps) / a, eps
  if kind == "x0":
    return pred, (x_t - a * pred) / s
  if kind == "v":
    norm = a * a + s * s
    return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
  raise ValueError(f"unknown prediction {kind!r}; allowed: {', '.join(PREDICTIONS)}")


def from_x0_eps(
  kind: str, x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> jax.Array:
  """The prediction of ``kind`` that ``(x0, eps)`` stand for: eps, x0, ``v = alpha eps - sigma
  x0`` or ``score = -eps / sigma``. Also the training target of a ``kind`` model."""
  a, s = bcast(alpha, x0.ndim), bcast(sigma, x0.ndim)
  if kind == "eps":
    return eps
  if kind == "x0":
    return x0
  if kind == "v":
    return a * eps - s * x0
  if kind == "score":
    return -eps / s
  raise ValueError(f"unknown prediction {kind!r}; allowed: {', '.join(PREDICTIONS)}")


def convert(
  pred: jax.Array, src: str, dst: str, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array
) -> jax.Array:
  """A ``src`` prediction at ``x_t`` as a ``dst`` prediction (any of :data:`PREDICTIONS`)."""
  if src == dst:
    return pred
  x0, eps = to_x0_eps(src, pred, x_t, alpha, sigma)
  return from_x0_eps(dst, x0, eps, alpha, sigma)
