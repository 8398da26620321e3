"""Drawing the training timesteps and noise: :func:`draw` is the one place they are drawn.

t is uniform over ``0..T-1`` or importance-sampled (Nichol & Dhariwal 2021, Sec. 3.3).

``L_vlb`` is dominated by a few early terms, so drawing t uniformly makes its
gradient noisy. Instead, draw t with probability proportional to
``sqrt(E[L_t^2])`` over a short history of each term's losses, and weight the
loss by ``1 / (T p_t)`` to keep it unbiased. Until every t has a full history,
t is drawn uniformly.

The history is a small pytree (part of the train state), updated functionally::

  hist = init(T)
  t, w = sample(hist, key, batch_size)
  ...                                             # losses [B] at t
  hist = update(hist, t, losses)
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LossHistory:
  losses: jax.Array  # [T, H] ring buffer of recent losses per t
  counts: jax.Array  # [T] int32, losses seen per t
  uniform_prob: float = flax.struct.field(pytree_node=False, default=0.001)

  @property
  def warmed_up(self) -> jax.Array:
    return jnp.all(self.counts >= self.losses.shape[1])


def init(
  num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001
) -> LossHistory:
  """An empty history: t is uniform until each t has ``history_per_term`` losses."""
  return LossHistory(
    losses=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
    counts=jnp.zeros((num_timesteps,), jnp.int32),
    uniform_prob=uniform_prob,
  )


def probabilities(hist: LossHistory) -> jax.Array:
  """p_t proportional to sqrt(E[L_t^2]), mixed with ``uniform_prob`` of uniform; ``[T]``."""
  T = hist.losses.shape[0]
  w = jnp.sqrt(jnp.mean(jnp.square(hist.losses), axis=1))
  p = w / jnp.maximum(jnp.sum(w), 1e-20)
  p = p * (1.0 - hist.uniform_prob) + hist.uniform_prob / T
  return jnp.where(hist.warmed_up, p, jnp.full((T,), 1.0 / T))


def sample(hist: LossHistory, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws ``t`` ``[B]`` and the importance weights ``1 / (T p_t)`` ``[B]``."""
  p = probabilities(hist)
  T = p.shape[0]
  t = jax.random.choice(key, T, (batch_size,), p=p)
  return t, 1.0 / (T * p[t])


def update(hist: LossHistory, t: jax.Array, losses: jax.Array) -> LossHistory:
  """Pushes each example's loss into the ring buffer of its t."""
  H = hist.losses.shape[1]
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  # Examples sharing a t in one batch go to consecutive slots: rank each
  # example among the earlier ones with the same t.
  same = t[:, None] == t[None, :]
  rank = jnp.sum(jnp.tril(same, k=-1), axis=1)
  slot = (hist.counts[t] + rank) % H
  return hist.replace(
    losses=hist.losses.at[t, slot].set(losses),
    counts=hist.counts.at[t].add(1),
  )


class Draw(NamedTuple):
  """One training draw: ``t`` ``[B]`` int32, importance ``weights`` ``[B]``, ``noise`` like x0."""

  t: jax.Array
  weights: jax.Array
  noise: jax.Array


def draw(
  key_t: jax.Array,
  key_noise: jax.Array,
  x0: jax.Array,
  num_timesteps: int,
  history: LossHistory | None = None,
) -> Draw:
  """t (uniform, or importance-sampled from ``history``) and standard-normal noise for ``x0``.

  Drawn for the whole (global) batch at once, so splitting the batch over devices or into
  micro-batches changes nothing. Without a history the weights are all 1.
  """
  B = x0.shape[0]
  if history is None:
    t = jax.random.randint(key_t, (B,), 0, num_timesteps)
    weights = jnp.ones((B,), jnp.float32)
  else:
    t, weights = sample(history, key_t, B)
  return Draw(t, weights, jax.random.normal(key_noise, x0.shape, x0.dtype))
