"""The contract between the scan driver and a sampler: a chain, an init/step pair, a carry.

A sampler factory (one per file: :mod:`.ddpm`, :mod:`.ddim`, :mod:`.dpmpp`, :mod:`.sde`)
closes over its options and returns a :class:`Sampler`, the optax shape::

  carry = sampler.init(x_T, chain)              # a NamedTuple with a field ``x``
  carry = sampler.step(carry, i, t_index, chain)  # i = 0..S-1, t_index = S-1..0

``chain`` (:class:`Chain`) is what one sampling call gives every step: the
(respaced) diffusion or a flow's grid, the guided model, the sharded noise and the chain's key.
The driver reads and reshards ``carry.x`` after every step; anything else in
the carry (DPM-Solver's history) is the sampler's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxdiff.core.diffusion import Diffusion
from jaxdiff.core.process import FlowGrid

ModelFn = Callable[..., jax.Array]


class Chain(NamedTuple):
  """One sampling call's data, as every step sees it (built inside jit by the driver).

  Attributes:
    d: the (respaced) diffusion, or a flow process's :class:`~jaxdiff.core.process.FlowGrid`,
      or a sigma grid (:class:`~jaxdiff.core.process.SigmaGrid`, a ddpm chain's
      :class:`~jaxdiff.core.process.VPSigmaGrid`); index ``t`` runs over its S steps.
    model: ``model(x, t_index) -> (output, t)``: the guided model output at the
      scalar index ``t_index`` (in x's dtype) and ``t``, that index as ``[B]`` ints.
    noise: ``noise(key) -> z``, standard normal shaped and sharded like x_T.
    key: the chain's key; step ``i`` draws from ``fold_in(key, i)`` so that the
      samples do not depend on the device count.
    model_at: ``model_at(x, t) -> output``: the guided model output at process times ``t``
      ``[B]`` (continuous t in [0, 1] for flow, sigma on a sigma grid), for solvers that
      evaluate between the levels.
  """

  d: Diffusion | FlowGrid
  model: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  noise: Callable[[jax.Array], jax.Array]
  key: jax.Array
  model_at: Callable[[jax.Array, jax.Array], jax.Array]


class Sampler(NamedTuple):
  """A sampler's pure functions: ``init(x_T, chain) -> carry``, ``step(carry, i, t, chain)``."""

  init: Callable[[jax.Array, Chain], Any]
  step: Callable[[Any, jax.Array, jax.Array, Chain], Any]


class State(NamedTuple):
  """The carry of a sampler that needs nothing but the current sample."""

  x: jax.Array  # [B, H, W, C]


def init_state(x_T: jax.Array, chain: Chain) -> State:
  """``init`` for samplers whose carry is :class:`State`."""
  del chain
  return State(x_T)


def step_key(chain: Chain, i: jax.Array) -> jax.Array:
  """Step ``i``'s key, drawn in the global view (the same for any number of devices)."""
  return jax.random.fold_in(chain.key, i)


def bcast(v: jax.Array, ndim: int) -> jax.Array:
  """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against an ``ndim``-rank batch."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))
