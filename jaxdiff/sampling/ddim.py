"""DDIM; Song, Meng & Ermon 2021, eq. 12 with sigma from eq. 16 times eta (S model calls).

On the discrete chain (:func:`ddim_step`) and on the flow process's straight path
(:func:`flow_ddim_step`, the same update written for ``alpha = 1 - t``, ``sigma = t``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous import flow
from jaxdiff.core.diffusion import Diffusion, extract, p_mean_variance
from jaxdiff.core.process import FlowGrid
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


def flow_ddim_step(
  velocity: jax.Array,
  x: jax.Array,
  t: jax.Array,
  t_next: jax.Array,
  noise: jax.Array | None,
  *,
  eta: float = 0.0,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """One DDIM step on the flow path ``x_t = (1 - t) x0 + t eps`` from ``t`` to ``s = t_next``.

  The generalised DDIM update (Song, Meng & Ermon 2021, eq. 12) for any Gaussian path
  ``x_t = alpha_t x0 + sigma_t eps``: ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat +
  c z`` with ``c = eta`` times the standard deviation of ``q(x_s | x_t, x0)``, which for
  ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``
  is ``sigma_{t|s} sigma_s / sigma_t`` (Kingma et al. 2021, eq. 26-28). Here ``alpha = 1 - t``
  and ``sigma = t``; ``x0_hat = x_t - t v`` and ``eps_hat = (x_t - (1 - t) x0_hat) / t`` (the noise
  consistent with the possibly clipped ``x0_hat``; t > 0 on every step). With ``eta = 0`` and no
  clipping this is exactly the Euler step ``x_t + (s - t) v``.

  Args:
    velocity: the model's ``v`` at ``(x, t)``.
    x: ``[B, H, W, C]`` x_t.
    t, t_next: ``[B]`` times, ``1 >= t > t_next >= 0``.
    noise: standard normal shaped like ``x``; may be None when ``eta = 0``.
    eta, clip_denoised, temperature: as :func:`ddim_step`'s.

  Returns:
    dict with ``sample`` (x_s), ``mean``, ``std`` and ``pred_x0``.
  """
  if noise is None and not (isinstance(eta, int | float) and eta == 0):
    raise ValueError(f"flow_ddim_step with eta={eta} needs noise")
  nd = x.ndim
  t_, s_ = bcast(t, nd), bcast(t_next, nd)
  x0 = flow.x0_from_velocity(x, velocity, t)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  eps = (x - (1.0 - t_) * x0) / t_
  a_ts = (1.0 - t_) / (1.0 - s_)  # alpha_{t|s}; s < 1 on every step
  var_ts = jnp.maximum(jnp.square(t_) - jnp.square(a_ts * s_), 0.0)
  sigma = eta * jnp.sqrt(var_ts) * s_ / t_  # 0 into s = 0
  mean = (1.0 - s_) * x0 + jnp.sqrt(jnp.maximum(jnp.square(s_) - jnp.square(sigma), 0.0)) * eps
  std = jnp.broadcast_to(sigma * temperature, x.shape)
  sample = mean if noise is None else mean + std * noise
  return {"sample": sample, "mean": mean, "std": std, "pred_x0": x0}


def ddim_sampler(
  *, eta: float = 0.0, clip_denoised: bool = True, temperature: float = 1.0
) -> Sampler:
  """DDIM with :func:`ddim_step` (:func:`flow_ddim_step` on a flow grid), one model call per
  step; ``eta = 0`` draws no noise."""

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    out, t = chain.model(carry.x, t_index)
    # Deterministic DDIM draws no noise: it would cost a model-sized op per step.
    z = None if eta == 0 else chain.noise(step_key(chain, i))
    options = dict(eta=eta, clip_denoised=clip_denoised, temperature=temperature)
    if isinstance(chain.d, FlowGrid):  # step t_index: from times[t_index + 1] to times[t_index]
      t_cur, t_next = (jnp.broadcast_to(chain.d.times[t_index + k], t.shape) for k in (1, 0))
      return State(flow_ddim_step(out, carry.x, t_cur, t_next, z, **options)["sample"])
    return State(ddim_step(chain.d, out, carry.x, t, z, **options)["sample"])

  return Sampler(init_state, step)
