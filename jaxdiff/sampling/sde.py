"""Samplers of the reverse VP-SDE; Song et al. 2021 (score SDE).

- ``euler_maruyama``: Euler-Maruyama on the reverse SDE, eq. 6 (S model calls);
- ``pc``: Langevin corrector(s) + an ancestral or Euler-Maruyama predictor,
  Algorithm 5 (S * (1 + n_corrector_steps) model calls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.diffusion import Diffusion, extract, p_mean_variance
from jaxdiff.sampling.base import Chain, Sampler, State, bcast, init_state, step_key


def euler_maruyama_step(
  d: Diffusion,
  model_output: jax.Array,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """Euler-Maruyama on the reverse VP-SDE; Song et al. 2021 (score SDE), eq. 6.

  The VP-SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` has the reverse
  ``dx = [-1/2 beta x - beta score] dt + sqrt(beta) dw_bar``. Discretised on the
  diffusion's own grid with ``beta(t) dt ~ beta_t`` (for a respaced diffusion
  ``beta_t = 1 - ab_t / ab_{t-1}`` over the kept steps; for the linear schedule
  at T = 1000 this is score_sde's ``beta_min = 0.1, beta_max = 20``, dt = 1/T)::

    x_{t-1} = x_t + (1/2 beta_t x_t + beta_t score) + sqrt(beta_t) z,
    score = -eps_hat / sqrt(1 - ab_t).

  No noise at index 0 (score_sde's ``noise_removal``: the last step returns its mean).

  Returns:
    dict with ``sample``, ``mean`` and ``pred_x0``.
  """
  out = p_mean_variance(d, model_output, x, t, clip_denoised=clip_denoised)
  nd = x.ndim
  beta = extract(d.betas, t, nd)
  score = -out["pred_eps"] / extract(d.sqrt_one_minus_alphas_cumprod, t, nd)
  mean = x + 0.5 * beta * x + beta * score
  std = jnp.where(bcast(t, nd) > 0, jnp.sqrt(beta), 0.0) * temperature
  return {"sample": mean + std * noise, "mean": mean, "pred_x0": out["pred_x0"]}


def ancestral_step(
  d: Diffusion,
  model_output: jax.Array,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """The ancestral-sampling predictor of score_sde for the VP-SDE (Song et al. 2021).

  ``x_{t-1} = (x_t + beta_t score) / sqrt(1 - beta_t) + sqrt(beta_t) z``. With
  ``score = -eps_hat / sqrt(1 - ab_t)`` the mean is exactly the posterior mean
  mu~_t(x_t, x0_hat) of Ho et al. eq. 7, which is how it is computed here: the
  score form divides by sqrt(1 - beta_t), which is 0 where a respaced schedule's
  last beta rounds to 1 (cosine, few steps). No noise at index 0.

  Returns:
    dict with ``sample``, ``mean`` and ``pred_x0``.
  """
  out = p_mean_variance(d, model_output, x, t, clip_denoised=clip_denoised)
  nd = x.ndim
  beta = extract(d.betas, t, nd)
  std = jnp.where(bcast(t, nd) > 0, jnp.sqrt(beta), 0.0) * temperature
  return {"sample": out["mean"] + std * noise, "mean": out["mean"], "pred_x0": out["pred_x0"]}


def langevin_step(
  d: Diffusion,
  model_output: jax.Array,
  x: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  snr: float = 0.16,
  clip_denoised: bool = True,
  temperature: float = 1.0,
) -> dict[str, jax.Array]:
  """One annealed Langevin corrector step at level t; Song et al. 2021, Algorithm 5.

  ``x <- x + eps g + sqrt(2 eps) z`` with ``g = score(x, t)`` and step size
  ``eps = 2 alpha_t (snr ||z|| / ||g||)^2``, ``alpha_t = 1 - beta_t``.

  As in score_sde, ``||z||`` and ``||g||`` are per-example norms averaged over
  the batch; here the batch is the global one (inside jit the mean is taken
  across devices), so the result does not depend on the device count. A
  per-example ratio would avoid the batch dependence, but for low-dimensional
  data it is heavy-tailed (``1 / ||g||^2`` is an inverse chi-square), which
  over-disperses the samples.

  Returns:
    dict with ``sample``, ``mean`` and ``pred_x0``.
  """
  out = p_mean_variance(d, model_output, x, t, clip_denoised=clip_denoised)
  nd = x.ndim
  score = -out["pred_eps"] / extract(d.sqrt_one_minus_alphas_cumprod, t, nd)
  axes = tuple(range(1, nd))
  g_norm = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(score), axis=axes)))
  z_norm = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(noise), axis=axes)))
  alpha = 1.0 - extract(d.betas, t, nd)
  # A zero score carries no information about where to move: take no step
  # rather than the infinite one the formula gives.
  ratio = jnp.where(g_norm > 0, z_norm / jnp.where(g_norm > 0, g_norm, 1.0), 0.0)
  step = 2.0 * alpha * jnp.square(snr * ratio)
  mean = x + step * score
  return {
    "sample": mean + jnp.sqrt(2.0 * step) * temperature * noise,
    "mean": mean,
    "pred_x0": out["pred_x0"],
  }


PREDICTORS = {"ancestral": ancestral_step, "euler_maruyama": euler_maruyama_step}


def check_predictor(predictor: str) -> None:
  """Raises unless ``predictor`` names one of :data:`PREDICTORS`."""
  if predictor not in PREDICTORS:
    raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")


def euler_maruyama_sampler(*, clip_denoised: bool = True, temperature: float = 1.0) -> Sampler:
  """The reverse VP-SDE by :func:`euler_maruyama_step`, one model call per step."""

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    out, t = chain.model(carry.x, t_index)
    z = chain.noise(step_key(chain, i))
    x = euler_maruyama_step(
      chain.d, out, carry.x, t, z, clip_denoised=clip_denoised, temperature=temperature
    )
    return State(x["sample"])

  return Sampler(init_state, step)


def pc_sampler(
  *,
  clip_denoised: bool = True,
  temperature: float = 1.0,
  snr: float = 0.16,
  n_corrector_steps: int = 1,
  predictor: str = "ancestral",
) -> Sampler:
  """Predictor-corrector sampling; Song et al. 2021, Algorithm 5.

  At each level t, ``n_corrector_steps`` Langevin steps (:func:`langevin_step`), then
  the predictor (one of :data:`PREDICTORS`) from t to t - 1: score_sde's order. With
  ``k_i`` step i's key, the predictor draws from ``fold_in(k_i, 0)`` and corrector j
  from ``fold_in(k_i, j + 1)``.
  """
  check_predictor(predictor)
  predict = PREDICTORS[predictor]
  opts = {"clip_denoised": clip_denoised, "temperature": temperature}

  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    k = step_key(chain, i)
    x = carry.x
    for j in range(n_corrector_steps):
      out, t = chain.model(x, t_index)
      z = chain.noise(jax.random.fold_in(k, j + 1))
      x = langevin_step(chain.d, out, x, t, z, snr=snr, **opts)["sample"]
    out, t = chain.model(x, t_index)
    z = chain.noise(jax.random.fold_in(k, 0))
    return State(predict(chain.d, out, x, t, z, **opts)["sample"])

  return Sampler(init_state, step)
