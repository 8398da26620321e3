"""Ancestral sampling; Ho et al. 2020, Algorithm 2 (S model calls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.diffusion import Diffusion, p_mean_variance
from jaxdiff.sampling.base import Chain, Sampler, State, bcast, init_state, step_key


def ddpm_step(
  d: Diffusion,
  model_output: jax.Array,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """x_{t-1} = mu_theta(x_t, t) + sigma_t z; Ho et al. 2020, Algorithm 2 (line 4).

  The mean and variance are those of :func:`p_mean_variance` for the
  diffusion's ``var_type`` (fixed small / large, learned, learned range), so
  this works on any respaced subset. No noise is added at index 0.

  Args:
    d: the (possibly respaced) diffusion.
    model_output: the model's output at ``(x, t)``.
    x: ``[B, H, W, C]`` x_t.
    t: ``[B]`` int indices into ``d``.
    noise: standard normal, shaped like ``x``.
    clip_denoised: clip the x_0 estimate to [-1, 1].
    temperature: scales the injected noise.

  Returns:
    dict with ``sample`` (x_{t-1}), ``mean``, ``std`` (of the injected noise,
    temperature included) and ``pred_x0``.
  """
  out = p_mean_variance(d, model_output, x, t, clip_denoised=clip_denoised)
  nonzero = bcast(t > 0, x.ndim).astype(x.dtype)
  std = nonzero * jnp.exp(0.5 * out["log_variance"]) * temperature
  return {
    "sample": out["mean"] + std * noise,
    "mean": out["mean"],
    "std": std,
    "pred_x0": out["pred_x0"],
  }


def ddpm_sampler(*, clip_denoised: bool = True, temperature: float = 1.0) -> Sampler:
  """Ancestral sampling with :func:`ddpm_step`, one model call per step."""

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    out, t = chain.model(carry.x, t_index)
    z = chain.noise(step_key(chain, i))
    x = ddpm_step(chain.d, out, carry.x, t, z, clip_denoised=clip_denoised, temperature=temperature)
    return State(x["sample"])

  return Sampler(init_state, step)
