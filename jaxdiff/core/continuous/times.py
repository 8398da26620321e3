"""Drawing continuous training times (t in [0, 1]) and EDM noise levels: the one place they are
drawn, as :mod:`jaxdiff.core.timesteps` is for the discrete chain.

Every draw is for the global batch at once (``[B]`` from one key), so splitting the batch over
devices changes nothing; the low-discrepancy draw in particular is stratified over the whole
batch. :func:`shift` is a deterministic map applied after a draw (or to a sampling grid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# EDM's training distribution of sigma (Karras et al. 2022, Table 1, "Training": ln sigma ~
# N(P_mean, P_std^2)).
P_MEAN = -1.2
P_STD = 1.2


def uniform(key: jax.Array, batch_size: int) -> jax.Array:
  """``[B]`` times ``t ~ U(0, 1)``, independently."""
  return jax.random.uniform(key, (batch_size,))


def low_discrepancy(key: jax.Array, batch_size: int) -> jax.Array:
  """``t_i = mod(u + i / B, 1)``, ``u ~ U(0, 1)``: one uniform shifted over a regular grid.

  Kingma et al. 2021 (VDM), the low-discrepancy sampler of the appendix
  (``antithetic_time_sampling`` in the official code): each t_i is marginally U(0, 1), so the
  loss stays unbiased, while the batch covers [0, 1) evenly (exactly one t in each ``[i / B,
  (i + 1) / B)``), which lowers the variance of the batch-mean diffusion loss.
  """
  u = jax.random.uniform(key, ())
  return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def logit_normal(key: jax.Array, batch_size: int, *, m: float = 0.0, s: float = 1.0) -> jax.Array:
  """``t = sigmoid(m + s n)``, ``n ~ N(0, 1)``: Esser et al. 2024 (SD3), eq. 19.

  The density ``1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2))`` puts more
  of the training on intermediate t; m > 0 shifts it towards the noise end.
  """
  return jax.nn.sigmoid(m + s * jax.random.normal(key, (batch_size,)))


def shift(t: jax.Array, factor: float) -> jax.Array:
  """``t' = f t / (1 + (f - 1) t)``: the resolution-dependent shift of Esser et al. 2024, eq. 23.

  Keeps t = 0 and t = 1 fixed and, for f > 1, moves every other t towards the noise end. For a
  rectified flow (``sigma / alpha = t / (1 - t)``) it scales the noise-to-signal ratio by f:
  ``t' / (1 - t') = f t / (1 - t)``; eq. 23 takes ``f = sqrt(m / n)`` for m pixels against a
  reference resolution of n.
  """
  return factor * t / (1.0 + (factor - 1.0) * t)


def edm_sigma(
  key: jax.Array, batch_size: int, *, p_mean: float = P_MEAN, p_std: float = P_STD
) -> jax.Array:
  """``[B]`` noise levels ``sigma = exp(P_mean + P_std n)``, ``n ~ N(0, 1)``: EDM's training
  distribution (Karras et al. 2022, Table 1 and Sec. 5)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch_size,)))
