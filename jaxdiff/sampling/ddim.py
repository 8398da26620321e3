"""DDIM; Song, Meng & Ermon 2021, eq. 12 with sigma from eq. 16 times eta (S model calls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.diffusion import Diffusion, extract, p_mean_variance
from jaxdiff.sampling.base import Chain, Sampler, State, bcast, init_state, step_key


def _one_minus_ab_prev(d: Diffusion, t: jax.Array, ndim: int) -> jax.Array:
  # 1 - alpha_bar_{t-1} read from the float64-formed buffer (0 at t = 0):
  # 1 - alphas_cumprod_prev in float32 would keep ~3 digits near t = 0.
  prev = extract(d.one_minus_alphas_cumprod, jnp.maximum(t - 1, 0), ndim)
  return jnp.where(bcast(t, ndim) > 0, prev, 0.0)


def ddim_step(
  d: Diffusion,
  model_output: jax.Array,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array | None,
  *,
  eta: float = 0.0,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """One DDIM step; Song, Meng & Ermon 2021, eq. 12 with sigma from eq. 16.

  ``x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma^2) eps_hat + sigma z``
  with ``sigma = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1})``,
  which is ``eta`` times the posterior standard deviation ``sqrt(beta~_t)``
  (read from ``d.posterior_variance``). ``eps_hat`` is the noise consistent
  with the (possibly clipped) ``x0_hat``, so ``eta = 1`` is exactly DDPM with
  ``fixed_small`` variance, and ``eta = 0`` is deterministic.

  Args:
    d: the (possibly respaced) diffusion; ``t - 1`` is the previous kept step.
    model_output: the model's output at ``(x, t)``.
    x: ``[B, H, W, C]`` x_t.
    t: ``[B]`` int indices into ``d``.
    noise: standard normal, shaped like ``x``; may be None when ``eta = 0``.
    eta: 0 is DDIM, 1 the DDPM posterior.
    clip_denoised: clip the x_0 estimate to [-1, 1].
    temperature: scales the injected noise.

  Returns:
    dict with ``sample`` (x_{t-1}), ``mean``, ``std`` and ``pred_x0``.
  """
  if noise is None and not (isinstance(eta, int | float) and eta == 0):
    raise ValueError(f"ddim_step with eta={eta} needs noise")
  out = p_mean_variance(d, model_output, x, t, clip_denoised=clip_denoised)
  nd = x.ndim
  sigma = eta * jnp.sqrt(extract(d.posterior_variance, t, nd))  # 0 at t = 0
  one_minus_ab_prev = _one_minus_ab_prev(d, t, nd)
  dir_coef = jnp.sqrt(jnp.maximum(one_minus_ab_prev - jnp.square(sigma), 0.0))
  mean = jnp.sqrt(1.0 - one_minus_ab_prev) * out["pred_x0"] + dir_coef * out["pred_eps"]
  std = jnp.broadcast_to(sigma * temperature, x.shape)
  sample = mean if noise is None else mean + std * noise
  return {"sample": sample, "mean": mean, "std": std, "pred_x0": out["pred_x0"]}


def ddim_sampler(
  *, eta: float = 0.0, clip_denoised: bool = True, temperature: float = 1.0
) -> Sampler:
  """DDIM with :func:`ddim_step`, one model call per step; ``eta = 0`` draws no noise."""

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    out, t = chain.model(carry.x, t_index)
    # Deterministic DDIM draws no noise: it would cost a model-sized op per step.
    z = None if eta == 0 else chain.noise(step_key(chain, i))
    x = ddim_step(
      chain.d, out, carry.x, t, z, eta=eta, clip_denoised=clip_denoised, temperature=temperature
    )
    return State(x["sample"])

  return Sampler(init_state, step)
