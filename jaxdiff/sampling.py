"""Samplers: from noise x_T to images x_0 with a trained denoiser.

Five samplers share one contract. The model enters only as
``model_fn(x_t, t) -> output`` (or ``model_fn(x_t, t, y)`` with class labels),
where ``t`` is ``[B]`` original-schedule steps (:func:`jaxdiff.diffusion.model_timesteps`,
so a respaced diffusion still shows the model the steps it was trained on), and
the output is whatever the diffusion's ``mean_type`` / ``var_type`` say it is;
:func:`jaxdiff.diffusion.p_mean_variance` turns it into ``pred_x0`` / ``pred_eps``.

- ``ddpm``: ancestral sampling, Ho et al. 2020, Algorithm 2 (S model calls);
- ``ddim``: Song, Meng & Ermon 2021, eq. 12 with sigma from eq. 16 times eta (S);
- ``dpm++2m``: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (S);
- ``euler_maruyama``: the reverse VP-SDE, Song et al. 2021 (score SDE), eq. 6 (S);
- ``pc``: Langevin corrector + ancestral / Euler-Maruyama predictor, score SDE
  Algorithm 5 (S * (1 + n_corrector_steps)).

Each sampler is one ``jax.lax.scan`` over the S steps of the (respaced)
diffusion, so under ``jax.jit`` it compiles once per shape and S. Step ``i``
(``i = 0`` is the first, noisiest step) draws its noise from
``jax.random.fold_in(key, i)`` in the global view, so with a mesh the samples
do not depend on the number of devices.

Example::

  d = diffusion.from_config(config.diffusion)
  model_fn = jax.tree_util.Partial(apply_fn, params)   # params become jit arguments
  x0 = sample(d, model_fn, jax.random.key(0), (16, 32, 32, 3), sampler="ddim", num_steps=50)

For a loop you jit yourself, :func:`make_sampler` returns the pure function
``fn(d, model_fn, key, x_T, labels=None)``; :func:`sample_in_chunks` draws many
samples in fixed-size chunks with one compiled function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.diffusion import (
  Diffusion,
  extract,
  model_timesteps,
  p_mean_variance,
  respace,
  space_timesteps,
)

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "euler_maruyama", "pc")
PREDICTORS = ("ancestral", "euler_maruyama")
DATA_AXIS = "data"

ModelFn = Callable[..., jax.Array]
SamplerFn = Callable[..., Any]


# ----------------------------------------------------------------------------- guidance


def guided_model_output(
  model_fn: ModelFn,
  x: jax.Array,
  t: jax.Array,
  labels: jax.Array | None = None,
  *,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
) -> jax.Array:
  """The model output, with classifier-free guidance (Ho & Salimans 2022, eq. 6).

  With ``g = guidance_scale`` the guided output is ``uncond + g (cond - uncond)``
  (the paper's ``(1 + w) eps(z, c) - w eps(z)`` with ``g = 1 + w``). Both halves
  come from ONE model call on the doubled batch ``[x, x]`` with labels
  ``[y, null]``. The guidance is affine in the output, so it applies to eps, x0
  and v predictions alike; for learned variances only the first C channels
  (the mean part) are guided and the conditional variance channels are kept.
  ``g = 1`` calls the conditional model on the batch as it is.

  Args:
    model_fn: ``model_fn(x, t)``, or ``model_fn(x, t, y)`` when labels are given.
    x: ``[B, H, W, C]`` noisy images.
    t: ``[B]`` original-schedule steps.
    labels: ``[B]`` int class labels, or None for an unconditional model.
    guidance_scale: g; 1 is the conditional model.
    null_label: the label the model was trained with for "no class" (label dropout).

  Returns:
    ``[B, H, W, C']``, the model output with the mean part guided.
  """
  if guidance_scale == 1.0:
    return model_fn(x, t) if labels is None else model_fn(x, t, labels)
  _check_guidance(guidance_scale, labels, null_label)
  y = jnp.concatenate([labels, jnp.full_like(labels, null_label)])
  out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)  # [2B, H, W, C']
  cond, uncond = jnp.split(out, 2)
  c = x.shape[-1]
  guided = uncond[..., :c] + guidance_scale * (cond[..., :c] - uncond[..., :c])
  return jnp.concatenate([guided, cond[..., c:]], axis=-1)


def _check_guidance(guidance_scale: float, labels: Any, null_label: int | None) -> None:
  if guidance_scale != 1.0 and (labels is None or null_label is None):
    missing = " and ".join(
      n for n, v in (("labels", labels), ("null_label", null_label)) if v is None
    )
    raise ValueError(
      f"guidance_scale={guidance_scale} needs class labels and the model's null label"
      f" (classifier-free guidance); {missing} not given. Pass labels=[B] ints and"
      " null_label=<the 'no class' id, usually num_classes>, or guidance_scale=1.0"
    )


# ----------------------------------------------------------------------------- one step each


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
  """``[B]`` -> ``[B, 1, ..., 1]`` to broadcast against an ``ndim``-rank batch."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _one_minus_ab_prev(d: Diffusion, t: jax.Array, ndim: int) -> jax.Array:
  # 1 - alpha_bar_{t-1} read from the float64-formed buffer (0 at t = 0):
  # 1 - alphas_cumprod_prev in float32 would keep ~3 digits near t = 0.
  prev = extract(d.one_minus_alphas_cumprod, jnp.maximum(t - 1, 0), ndim)
  return jnp.where(_bcast(t, ndim) > 0, prev, 0.0)


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
  nonzero = _bcast(t > 0, x.ndim).astype(x.dtype)
  std = nonzero * jnp.exp(0.5 * out["log_variance"]) * temperature
  return {
    "sample": out["mean"] + std * noise,
    "mean": out["mean"],
    "std": std,
    "pred_x0": out["pred_x0"],
  }


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


def dpmpp_2m_step(
  d: Diffusion,
  pred_x0: jax.Array,
  x: jax.Array,
  t: jax.Array,
  prev_pred_x0: jax.Array,
  h_prev: jax.Array,
  first_order: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) step from index t to t - 1; Lu et al. 2022, Algorithm 2.

  With ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)``, ``lambda = log(alpha / sigma)``
  and ``h = lambda_{t-1} - lambda_t``::

    D = (1 + 1 / (2r)) x0_hat_t - 1 / (2r) x0_hat_prev,   r = h_prev / h
    x_{t-1} = (sigma_{t-1} / sigma_t) x_t - alpha_{t-1} (exp(-h) - 1) D

  With ``first_order`` it uses ``D = x0_hat_t`` (DPM-Solver++(1), i.e. DDIM).
  From index 0 the step goes to ``alpha = 1, sigma = 0`` (lambda = +inf):
  first order, it returns ``x0_hat_0`` itself, the final denoising.

  Args:
    d: the (possibly respaced) diffusion.
    pred_x0: ``[B, H, W, C]`` the data prediction at ``(x, t)``.
    x: ``[B, H, W, C]`` x_t.
    t: ``[B]`` int indices into ``d``.
    prev_pred_x0: the previous step's data prediction (unused if ``first_order``).
    h_prev: ``[B]`` the previous step's h (unused if ``first_order``).
    first_order: scalar bool: take the first-order step.

  Returns:
    ``(x_{t-1}, h)``.
  """
  nd = x.ndim
  tp = jnp.maximum(t - 1, 0)
  lam = 0.5 * (jnp.log(d.alphas_cumprod[t]) - d.log_one_minus_alphas_cumprod[t])  # [B]
  lam_next = 0.5 * (jnp.log(d.alphas_cumprod[tp]) - d.log_one_minus_alphas_cumprod[tp])
  h = lam_next - lam
  # 1 / (2r); the inner where keeps h / h_prev finite when there is no h_prev.
  half_inv_r = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))
  half_inv_r = _bcast(half_inv_r, nd)
  D = (1.0 + half_inv_r) * pred_x0 - half_inv_r * prev_pred_x0
  ratio = extract(d.sqrt_one_minus_alphas_cumprod, tp, nd) / extract(
    d.sqrt_one_minus_alphas_cumprod, t, nd
  )
  x_next = ratio * x - extract(d.sqrt_alphas_cumprod, tp, nd) * _bcast(jnp.expm1(-h), nd) * D
  return jnp.where(_bcast(t, nd) == 0, pred_x0, x_next), h


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
  std = jnp.where(_bcast(t, nd) > 0, jnp.sqrt(beta), 0.0) * temperature
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
  std = jnp.where(_bcast(t, nd) > 0, jnp.sqrt(beta), 0.0) * temperature
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


# ----------------------------------------------------------------------------- full samplers


def _auto_mesh(mesh: Mesh) -> Mesh:
  # Inside jit we constrain with with_sharding_constraint, which needs Auto axes
  # (jax.make_mesh defaults to Explicit); the devices and names are unchanged.
  if all(a == AxisType.Auto for a in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _constrain(x: jax.Array, mesh: Mesh | None, batch_axis: int = 0) -> jax.Array:
  if mesh is None:
    return x
  spec = [None] * x.ndim
  spec[batch_axis] = DATA_AXIS
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _run(
  step: Callable[[jax.Array, Any, jax.Array, jax.Array], tuple[jax.Array, Any]],
  d: Diffusion,
  x_T: jax.Array,
  aux: Any,
  return_trajectory: bool,
  mesh: Mesh | None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scans ``step(x, aux, i, t) -> (x, aux)`` over i = 0..S-1, t = S-1..0."""
  S = d.num_timesteps

  def body(carry, inputs):
    x, aux = carry
    i, t = inputs
    x, aux = step(x, aux, i, t)
    x = _constrain(x, mesh)
    return (x, aux), (x if return_trajectory else None)

  steps = (jnp.arange(S), jnp.arange(S - 1, -1, -1))
  (x, _), traj = jax.lax.scan(body, (_constrain(x_T, mesh), aux), steps)
  if not return_trajectory:
    return x
  traj = jnp.concatenate([x_T[None], traj])  # [S + 1, B, H, W, C], x_T first
  return x, _constrain(traj, mesh, batch_axis=1)


def make_sampler(
  sampler: str = "ddim",
  *,
  eta: float = 0.0,
  clip_denoised: bool = True,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  temperature: float = 1.0,
  return_trajectory: bool = False,
  mesh: Mesh | None = None,
  snr: float = 0.16,
  n_corrector_steps: int = 1,
  predictor: str = "ancestral",
) -> SamplerFn:
  """A pure sampling function with the hyperparameters closed over (optax style).

  The returned ``fn(d, model_fn, key, x_T, labels=None)`` runs the whole chain
  as one ``lax.scan`` over the S steps of ``d``; it is meant to be jitted by the
  caller (:func:`sample` does that and caches the result). ``d`` and, if it is a
  ``jax.tree_util.Partial``, ``model_fn``'s bound arguments (the parameters)
  are data, so a new schedule of the same length or new parameters reuse the
  compiled code.

  Args:
    sampler: one of :data:`SAMPLERS`.
    eta: DDIM's eta (0 deterministic, 1 the DDPM posterior).
    clip_denoised: clip every x_0 estimate to [-1, 1].
    guidance_scale: classifier-free guidance scale g (1: none).
    null_label: the "no class" label, needed when ``guidance_scale != 1``.
    temperature: scales all injected noise (x_T is not scaled).
    return_trajectory: also return ``[S + 1, B, H, W, C]``, x_T first.
    mesh: a mesh with a ``data`` axis to shard the batch over, or None.
    snr: ``pc``'s Langevin signal-to-noise ratio.
    n_corrector_steps: ``pc``'s Langevin steps per level.
    predictor: ``pc``'s predictor, ``ancestral`` or ``euler_maruyama``.

  Returns:
    ``fn(d, model_fn, key, x_T, labels=None) -> x_0`` or ``(x_0, trajectory)``.

  Raises:
    ValueError: for an unknown sampler or predictor, a bad option value, or
      guidance without a null label.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
  if predictor not in PREDICTORS:
    raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
  if eta < 0 or temperature < 0 or snr <= 0 or n_corrector_steps < 0:
    raise ValueError(
      f"need eta >= 0, temperature >= 0, snr > 0 and n_corrector_steps >= 0; got eta={eta},"
      f" temperature={temperature}, snr={snr}, n_corrector_steps={n_corrector_steps}"
    )
  if guidance_scale != 1.0 and null_label is None:
    _check_guidance(guidance_scale, True, null_label)
  mesh = None if mesh is None else _auto_mesh(mesh)
  opts = {"clip_denoised": clip_denoised, "temperature": temperature}

  def fn(d: Diffusion, model_fn: ModelFn, key: jax.Array, x_T: jax.Array, labels=None):
    _check_guidance(guidance_scale, labels, null_label)
    B = x_T.shape[0]
    if labels is not None:
      labels = _constrain(jnp.asarray(labels), mesh)

    def model(x, t_index):
      t = jnp.full((B,), t_index, jnp.int32)
      out = guided_model_output(
        model_fn,
        x,
        model_timesteps(d, t),
        labels,
        guidance_scale=guidance_scale,
        null_label=null_label,
      )
      return out.astype(x.dtype), t  # the sampler maths stay in x's dtype

    def noise(k):
      return _constrain(jax.random.normal(k, x_T.shape, x_T.dtype), mesh)

    if sampler in ("ddpm", "ddim"):

      def step(x, aux, i, t_index):
        out, t = model(x, t_index)
        # Deterministic DDIM draws no noise: it would cost a model-sized op per step.
        z = None if sampler == "ddim" and eta == 0 else noise(jax.random.fold_in(key, i))
        if sampler == "ddpm":
          return ddpm_step(d, out, x, t, z, **opts)["sample"], aux
        return ddim_step(d, out, x, t, z, eta=eta, **opts)["sample"], aux

      return _run(step, d, x_T, None, return_trajectory, mesh)

    if sampler == "dpm++2m":

      def step(x, aux, i, t_index):
        prev_x0, h_prev = aux
        out, t = model(x, t_index)
        x0 = p_mean_variance(d, out, x, t, clip_denoised=clip_denoised)["pred_x0"]
        # First order on the first step (no history) and into index 0, where the
        # logSNR gap is the widest and extrapolating x0_hat overshoots.
        x, h = dpmpp_2m_step(d, x0, x, t, prev_x0, h_prev, (i == 0) | (t_index == 1))
        return x, (x0, h)

      aux = (jnp.zeros_like(x_T), jnp.zeros((B,), x_T.dtype))
      return _run(step, d, x_T, aux, return_trajectory, mesh)

    if sampler == "euler_maruyama":

      def step(x, aux, i, t_index):
        out, t = model(x, t_index)
        z = noise(jax.random.fold_in(key, i))
        return euler_maruyama_step(d, out, x, t, z, **opts)["sample"], aux

      return _run(step, d, x_T, None, return_trajectory, mesh)

    # pc: corrector(s) at level t, then the predictor from t to t - 1 (score_sde's order).
    predict = ancestral_step if predictor == "ancestral" else euler_maruyama_step

    def step(x, aux, i, t_index):
      k = jax.random.fold_in(key, i)
      for j in range(n_corrector_steps):
        out, t = model(x, t_index)
        x = langevin_step(d, out, x, t, noise(jax.random.fold_in(k, j + 1)), snr=snr, **opts)
        x = x["sample"]
      out, t = model(x, t_index)
      return predict(d, out, x, t, noise(jax.random.fold_in(k, 0)), **opts)["sample"], aux

    return _run(step, d, x_T, None, return_trajectory, mesh)

  return fn


@functools.lru_cache(maxsize=64)
def _jitted_sampler(**options: Any) -> SamplerFn:
  # One jitted function per set of static options: repeated sample() calls hit
  # jit's cache instead of building (and compiling) a new function each time.
  return jax.jit(make_sampler(**options))


SPACINGS = ("sections", "ddim", "logsnr")
_DEFAULT_SPACING = {
  "ddpm": "sections",
  "ddim": "ddim",
  "dpm++2m": "logsnr",
  "euler_maruyama": "sections",
  "pc": "sections",
}


def sampler_timesteps(
  d: Diffusion, num_steps: int | None, *, sampler: str = "ddim", spacing: str | None = None
) -> list[int]:
  """Which steps of the diffusion a sampler visits with ``num_steps`` steps.

  Spacings (``None``: the sampler's default):

  - ``sections`` (``ddpm``, ``euler_maruyama``, ``pc``): ``space_timesteps(T, N)``,
    evenly spaced over 0..T-1 with both ends kept (Nichol & Dhariwal 2021), so
    the chain starts at the last step, where x_T ~ N(0, I) is most nearly exact.
  - ``ddim`` (``ddim``): DDIM's fixed stride ``"ddimN"`` (Song et al. 2021),
    the spacing its published results use; when no stride gives exactly N
    steps, the ``sections`` spacing.
  - ``logsnr`` (``dpm++2m``): uniform in lambda = log(alpha / sigma), the step
    schedule DPM-Solver recommends for low-resolution images (Lu et al. 2022).
    Time-uniform steps leave one wide logSNR gap at the clean end, where the
    multistep extrapolation of x0_hat is least accurate (measured on
    N(0.3, 0.5^2) data with the exact model, 20 steps: sample std 0.48
    time-uniform, 0.506 logSNR-uniform).

  Args:
    d: the diffusion to respace.
    num_steps: N in 1..T, or None for all T steps.
    sampler: one of :data:`SAMPLERS`.
    spacing: one of :data:`SPACINGS`, or None.

  Returns:
    Sorted indices into ``d``, for :func:`jaxdiff.diffusion.respace`.

  Raises:
    ValueError: unknown sampler or spacing, or ``num_steps`` outside 1..T.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
  spacing = _DEFAULT_SPACING[sampler] if spacing is None else spacing
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
  T = d.num_timesteps
  if num_steps is None or num_steps == T:
    return list(range(T))
  if not 1 <= num_steps <= T:
    raise ValueError(
      f"num_steps={num_steps} must be in 1..{T} (the diffusion has T={T} steps);"
      " pass None to use all of them"
    )
  if spacing == "logsnr":
    return _logsnr_timesteps(d, num_steps)
  if spacing == "ddim":
    try:
      return space_timesteps(T, f"ddim{num_steps}")
    except ValueError:
      pass
  return space_timesteps(T, num_steps)


def _logsnr_timesteps(d: Diffusion, n: int) -> list[int]:
  T = d.num_timesteps
  ab = np.asarray(d.alphas_cumprod, np.float64)
  neg_lam = -0.5 * (np.log(ab) - np.asarray(d.log_one_minus_alphas_cumprod, np.float64))
  if n == 1:
    return [T - 1]
  targets = np.linspace(neg_lam[0], neg_lam[-1], n)  # increasing, like neg_lam
  # Nearest index to each target, then nudged apart: near t = 0 lambda moves
  # fast and several targets can share an index.
  pos = np.clip(np.searchsorted(neg_lam, targets), 1, T - 1)
  idx = np.where(targets - neg_lam[pos - 1] < neg_lam[pos] - targets, pos - 1, pos)
  idx[0] = 0
  for j in range(1, n):
    idx[j] = max(idx[j], idx[j - 1] + 1)
  idx[-1] = T - 1
  for j in range(n - 2, -1, -1):
    idx[j] = min(idx[j], idx[j + 1] - 1)
  return [int(i) for i in idx]


def _check_mesh(mesh: Mesh | None, batch: int) -> None:
  if mesh is None:
    return
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh needs a {DATA_AXIS!r} axis to shard the batch; got {mesh.axis_names}")
  n = mesh.shape[DATA_AXIS]
  if batch % n:
    raise ValueError(
      f"batch size {batch} is not divisible by the {n} devices of the mesh's {DATA_AXIS!r}"
      f" axis; use a multiple of {n}"
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_x_T(key: jax.Array, shape: tuple[int, ...], mesh: Mesh | None) -> jax.Array:
  # Drawn under jit in the global view, sharded from the start (and multi-host safe).
  return _constrain(jax.random.normal(key, shape), mesh)


def sample(
  d: Diffusion,
  model_fn: ModelFn,
  key: jax.Array,
  shape: Sequence[int],
  *,
  sampler: str = "ddim",
  num_steps: int | None = None,
  spacing: str | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
  guidance_scale: float = 1.0,
  labels: jax.Array | None = None,
  null_label: int | None = None,
  temperature: float = 1.0,
  return_trajectory: bool = False,
  x_T: jax.Array | None = None,
  mesh: Mesh | None = None,
  snr: float = 0.16,
  n_corrector_steps: int = 1,
  predictor: str = "ancestral",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Draws samples ``[B, H, W, C]`` from the model.

  Respaces ``d`` to ``num_steps`` (:func:`sampler_timesteps`), draws
  ``x_T ~ N(0, I)`` from ``split(key)[0]`` unless given, and runs the jitted
  sampler (compiled once per sampler options, shape and number of steps) with
  per-step keys ``fold_in(split(key)[1], i)``.

  Define ``model_fn`` once and reuse it: jit recognises it by identity. To pass
  parameters as arguments rather than compile them in as constants, give
  ``jax.tree_util.Partial(apply_fn, params)`` with ``apply_fn(params, x, t[, y])``.

  Args:
    d: the diffusion the model was trained with (or a respaced one).
    model_fn: ``model_fn(x, t) -> output``; ``model_fn(x, t, y)`` when ``labels`` are given.
    key: PRNG key.
    shape: ``(B, H, W, C)``.
    sampler: one of :data:`SAMPLERS`.
    num_steps: number of steps (None: all T of ``d``).
    spacing: which steps to keep, see :func:`sampler_timesteps` (None: the sampler's default).
    eta: DDIM's eta.
    clip_denoised: clip x_0 estimates to [-1, 1].
    guidance_scale: classifier-free guidance scale (needs ``labels`` and ``null_label``).
    labels: ``[B]`` int class labels for a conditional model.
    null_label: the label meaning "no class".
    temperature: scales the injected noise.
    return_trajectory: also return the ``[S + 1, B, H, W, C]`` chain, x_T first.
    x_T: start from this noise instead of drawing it.
    mesh: shard the batch over this mesh's ``data`` axis.
    snr, n_corrector_steps, predictor: ``pc`` options (see :func:`make_sampler`).

  Returns:
    ``x_0`` ``[B, H, W, C]``, or ``(x_0, trajectory)``.

  Raises:
    ValueError: unknown sampler, ``num_steps`` outside 1..T, guidance without
      labels or null label, a mesh without ``data`` or not dividing the batch,
      or ``x_T`` / ``labels`` of the wrong shape.
  """
  shape = tuple(int(s) for s in shape)
  steps = sampler_timesteps(d, num_steps, sampler=sampler, spacing=spacing)
  _check_guidance(guidance_scale, labels, null_label)
  _check_mesh(mesh, shape[0])
  if len(steps) != d.num_timesteps:
    d = respace(d, steps)
  mesh = None if mesh is None else _auto_mesh(mesh)
  key_T, key_steps = jax.random.split(key)
  if x_T is None:
    x_T = _draw_x_T(key_T, shape, mesh)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != shape[:1]:
      raise ValueError(f"labels have shape {labels.shape}, expected ({shape[0]},)")
  # A given x_T and the labels are resharded inside the jitted sampler, which
  # also accepts host arrays on every process of a multi-host run.
  if not isinstance(model_fn, jax.tree_util.Partial):
    model_fn = jax.tree_util.Partial(model_fn)  # a pytree: jit can take it as an argument
  fn = _jitted_sampler(
    sampler=sampler,
    eta=float(eta),
    clip_denoised=bool(clip_denoised),
    guidance_scale=float(guidance_scale),
    # Irrelevant without guidance: keep it out of the cache key.
    null_label=None if null_label is None or guidance_scale == 1.0 else int(null_label),
    temperature=float(temperature),
    return_trajectory=bool(return_trajectory),
    mesh=mesh,
    snr=float(snr),
    n_corrector_steps=int(n_corrector_steps),
    predictor=predictor,
  )
  return fn(d, model_fn, key_steps, x_T, labels)


def sample_in_chunks(
  d: Diffusion,
  model_fn: ModelFn,
  key: jax.Array,
  num_samples: int,
  image_shape: Sequence[int],
  *,
  batch_size: int,
  labels: np.ndarray | jax.Array | None = None,
  return_trajectory: bool = False,
  progress: bool = False,
  **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Draws ``num_samples`` in chunks of ``batch_size`` with one compiled sampler.

  Chunk ``c`` uses ``fold_in(key, c)``; the last chunk is padded to
  ``batch_size`` (and the padding dropped) so every chunk has the same shape.
  Each chunk is fetched to host memory as it finishes, so the devices hold one
  chunk at a time.

  Args:
    d, model_fn: as for :func:`sample`.
    key: PRNG key.
    num_samples: N.
    image_shape: ``(H, W, C)``.
    batch_size: global samples per chunk (a multiple of the mesh's devices).
    labels: ``[N]`` int class labels, or None.
    return_trajectory: also return the ``[S + 1, N, H, W, C]`` trajectories.
    progress: show a tqdm bar over chunks.
    **kwargs: any other :func:`sample` option (sampler, num_steps, mesh, ...).

  Returns:
    NumPy ``[N, H, W, C]`` samples, or ``(samples, trajectory)``.
  """
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
      raise ValueError(f"labels have shape {labels.shape}, expected ({num_samples},)")
  chunks = range(math.ceil(num_samples / batch_size))
  if progress:
    from tqdm import tqdm

    chunks = tqdm(chunks, desc="sampling", unit="chunk")
  outs, trajs = [], []
  for c in chunks:
    lo = c * batch_size
    n = min(batch_size, num_samples - lo)
    y = None
    if labels is not None:
      y = np.resize(labels[lo : lo + n], batch_size)  # pads by repeating; padding is dropped
    out = sample(
      d,
      model_fn,
      jax.random.fold_in(key, c),
      (batch_size, *image_shape),
      labels=y,
      return_trajectory=return_trajectory,
      **kwargs,
    )
    if return_trajectory:
      out, traj = out
      trajs.append(np.asarray(traj)[:, :n])
    outs.append(np.asarray(out)[:n])
  samples = np.concatenate(outs)
  return (samples, np.concatenate(trajs, axis=1)) if return_trajectory else samples
