"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) as pure functions.

A :class:`Diffusion` is a pytree of schedule buffers (computed in NumPy float64,
cast to float32 once) plus static choices (what the model predicts, how the
reverse variance is formed). It is passed into jitted code as an argument, never
baked into it. Every function here is pure and jit-able; ``t`` is an int array
``[B]`` of indices ``0..T-1`` (paper step = index + 1) and images are NHWC.

The model enters only through its output: :func:`p_mean_variance` turns a model
output at ``(x_t, t)`` into the reverse-process Gaussian p(x_{t-1} | x_t).

Example::

  d = make_diffusion(get_betas("linear", 1000), mean_type="eps", var_type="fixed_large")
  x_t = q_sample(d, x0, t, noise)                       # [B, H, W, C]
  out = p_mean_variance(d, model_fn(x_t, t), x_t, t)    # dict(mean, variance, ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks
from jaxdiff.core import schedules, zero_snr

MEAN_TYPES = ("eps", "x0", "v")
# What the model may predict when alpha_bar_T = 0 (zero terminal SNR): at x_T = eps an eps
# prediction carries no information about x_0 (Lin et al. 2024, Sec. 3.2).
ZERO_SNR_MEAN_TYPES = ("v", "x0")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


@flax.struct.dataclass
class Diffusion:
  """Schedule buffers, all ``[T]``; ``alpha_bar`` is the cumulative product of 1 - beta.

  Attributes are named after the quantities they hold. ``timestep_map[t]`` is
  the original-schedule step the model sees for index ``t`` (the identity
  unless the diffusion was respaced). ``zero_terminal_snr``: the last beta is 1, so
  ``alpha_bar_T = 0`` (:mod:`jaxdiff.core.zero_snr`); there ``1 / sqrt(alpha_bar)`` is inf and
  x_0 cannot be formed from an eps prediction.
  """

  betas: jax.Array
  log_betas: jax.Array
  alphas_cumprod: jax.Array  # alpha_bar_t
  alphas_cumprod_prev: jax.Array  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
  one_minus_alphas_cumprod: jax.Array  # 1 - alpha_bar, formed in float64
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(alpha_bar); inf where alpha_bar = 0
  sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / alpha_bar - 1); inf where alpha_bar = 0
  posterior_variance: jax.Array  # beta~_t, Ho et al. eq. 7
  posterior_log_variance_clipped: jax.Array  # log(beta~) with beta~_0 := beta~_1
  posterior_mean_coef1: jax.Array  # multiplies x_0 in mu~_t, eq. 7
  posterior_mean_coef2: jax.Array  # multiplies x_t in mu~_t, eq. 7
  fixed_large_variance: jax.Array  # (beta~_1, beta_2, ..., beta_T)
  fixed_large_log_variance: jax.Array
  timestep_map: jax.Array  # int32: index -> step of the original schedule
  mean_type: str = flax.struct.field(pytree_node=False, default="eps")
  var_type: str = flax.struct.field(pytree_node=False, default="fixed_small")
  zero_terminal_snr: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def learned_variance(self) -> bool:
    return self.var_type in ("learned", "learned_range")


def make_diffusion(
  betas: np.ndarray | Sequence[float],
  *,
  mean_type: str = "eps",
  var_type: str = "fixed_small",
  timestep_map: np.ndarray | Sequence[int] | None = None,
  dtype: Any = jnp.float32,
) -> Diffusion:
  """Builds the schedule buffers in float64 and casts them to ``dtype`` once.

  Args:
    betas: ``[T]`` forward-process variances in (0, 1), e.g. from
      :func:`jaxdiff.core.schedules.get_betas`; the last may be exactly 1 (zero terminal SNR,
      :func:`jaxdiff.core.zero_snr.rescale_zero_terminal_snr`) if ``mean_type`` is ``v`` or
      ``x0``.
    mean_type: what the model predicts: ``eps`` (the noise, Ho et al.),
      ``x0`` (the clean image) or ``v`` (Salimans & Ho 2022).
    var_type: reverse variance: ``fixed_small`` (posterior beta~_t),
      ``fixed_large`` (beta_t, with beta~_1 at t=0), ``learned`` (the model
      outputs log-variance) or ``learned_range`` (the model outputs v in [-1, 1]
      interpolating log beta_t and log beta~_t; Nichol & Dhariwal eq. 15).
    timestep_map: ``[T]`` original step for each index (set by :func:`respace`).
    dtype: dtype of the buffers.

  Returns:
    A :class:`Diffusion` pytree.
  """
  if mean_type not in MEAN_TYPES:
    raise ValueError(f"unknown mean_type {mean_type!r}; allowed: {', '.join(MEAN_TYPES)}")
  if var_type not in VAR_TYPES:
    raise ValueError(f"unknown var_type {var_type!r}; allowed: {', '.join(VAR_TYPES)}")
  betas = schedules.validate_betas(betas, terminal_one=True)
  T = betas.shape[0]
  zero_terminal = _zero_terminal(betas, mean_type)
  if timestep_map is None:
    timestep_map = np.arange(T)
  timestep_map = np.asarray(timestep_map)
  if timestep_map.shape != (T,):
    raise ValueError(f"timestep_map must have shape ({T},), got {timestep_map.shape}")

  alphas = 1.0 - betas
  ab = np.cumprod(alphas)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
  # beta~_0 is 0; clip its log with beta~_1 as DDPM does. With T = 1 there is
  # no beta~_1, and the decoder is all there is: fall back to beta_1.
  post_var_1 = post_var[1] if T > 1 else betas[0]
  post_log_var_clipped = np.log(np.append(post_var_1, post_var[1:]))
  fixed_large = np.append(post_var_1, betas[1:])

  def cast(a: np.ndarray) -> jax.Array:
    return jnp.asarray(a, dtype=dtype)

  with np.errstate(divide="ignore"):  # inf at alpha_bar = 0, as it should be
    recip_ab = 1.0 / ab

  return Diffusion(
    betas=cast(betas),
    log_betas=cast(np.log(betas)),
    alphas_cumprod=cast(ab),
    alphas_cumprod_prev=cast(ab_prev),
    one_minus_alphas_cumprod=cast(1.0 - ab),
    sqrt_alphas_cumprod=cast(np.sqrt(ab)),
    sqrt_one_minus_alphas_cumprod=cast(np.sqrt(1.0 - ab)),
    log_one_minus_alphas_cumprod=cast(np.log(1.0 - ab)),
    sqrt_recip_alphas_cumprod=cast(np.sqrt(recip_ab)),
    sqrt_recipm1_alphas_cumprod=cast(np.sqrt(recip_ab - 1.0)),
    posterior_variance=cast(post_var),
    posterior_log_variance_clipped=cast(post_log_var_clipped),
    posterior_mean_coef1=cast(betas * np.sqrt(ab_prev) / (1.0 - ab)),
    posterior_mean_coef2=cast((1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab)),
    fixed_large_variance=cast(fixed_large),
    fixed_large_log_variance=cast(np.log(fixed_large)),
    timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
    mean_type=mean_type,
    var_type=var_type,
    zero_terminal_snr=zero_terminal,
  )


def _zero_terminal(betas: np.ndarray, mean_type: str) -> bool:
  """Whether the last beta is 1 (alpha_bar_T = 0); raises if ``mean_type`` cannot take it."""
  if betas[-1] != 1.0:
    return False
  if mean_type not in ZERO_SNR_MEAN_TYPES:
    raise ValueError(
      f"the last beta is 1 (alpha_bar_T = 0, zero terminal SNR), which needs mean_type 'v' or"
      f" 'x0', not {mean_type!r}: at alpha_bar_T = 0 an eps prediction does not determine x_0"
    )
  return True


def from_config(config: Any) -> Diffusion:
  """Builds a :class:`Diffusion` from a config's ``diffusion`` section; with
  ``zero_terminal_snr`` the schedule is rescaled to alpha_bar_T = 0 (Lin et al. 2024, Alg. 1)."""
  betas = _config_betas(config)
  if getattr(config, "zero_terminal_snr", False):
    betas = zero_snr.rescale_zero_terminal_snr(betas)
  return make_diffusion(betas, mean_type=config.mean_type, var_type=config.var_type)


def _config_betas(config: Any) -> np.ndarray:
  """The float64 betas of a ``diffusion`` section (raises ValueError as ``get_betas`` does)."""
  kwargs = {}
  if config.schedule in ("linear", "quadratic", "sigmoid", "geometric"):
    kwargs = {"beta_start": config.beta_start, "beta_end": config.beta_end}
  elif config.schedule == "constant":
    kwargs = {"beta": config.beta}
  return schedules.get_betas(config.schedule, config.num_timesteps, **kwargs)


# How training draws t; read by jaxdiff.training.state.init_state.
T_SAMPLERS = ("uniform", "importance")


def check_config(dcfg: Any) -> list[str]:
  """Every problem with a config's ``diffusion`` section, one line each naming the field, its
  value and what is allowed; empty when :func:`from_config` will build it.

  ``dcfg`` is read by attribute (a ConfigDict or any object with the fields). ``loss_type`` is
  not checked here: :mod:`jaxdiff.core.losses` owns the losses and imports this module.
  """
  problems = checks.Problems("diffusion", dcfg)
  need = problems.need

  need(dcfg.schedule in schedules.SCHEDULES, "schedule", _one_of(schedules.SCHEDULES))
  T = dcfg.num_timesteps
  need(checks.is_int(T) and T >= 1, "num_timesteps", "must be an int >= 1")
  for name in ("beta_start", "beta_end", "beta"):
    value = getattr(dcfg, name)
    ok = value is None or (checks.is_number(value) and 0.0 < value < 1.0)
    need(ok, name, "must be None (the schedule's default) or a number in (0, 1)")
  need(dcfg.schedule != "constant" or dcfg.beta is not None, "beta",
       "schedule 'constant' needs a beta in (0, 1), e.g. 0.02")  # fmt: skip
  need(dcfg.mean_type in MEAN_TYPES, "mean_type", _one_of(MEAN_TYPES))
  need(dcfg.var_type in VAR_TYPES, "var_type", _one_of(VAR_TYPES))
  need(dcfg.t_sampler in ("", *T_SAMPLERS), "t_sampler",
       f"must be '' (uniform) or one of {', '.join(T_SAMPLERS)}")  # fmt: skip
  gamma = dcfg.min_snr_gamma
  need(checks.is_number(gamma) and gamma >= 0, "min_snr_gamma",
       "must be a number >= 0 (0 disables)")  # fmt: skip
  problems.extend(_zero_snr_problems(dcfg))
  if not problems:  # the fields are sound one by one: now the schedule they make
    problems.extend(_schedule_problems(dcfg))
  return list(problems)


def _zero_snr_problems(dcfg: Any) -> list[str]:
  zero_terminal = getattr(dcfg, "zero_terminal_snr", False)
  if not isinstance(zero_terminal, bool):
    return [f"diffusion.zero_terminal_snr={zero_terminal!r}: must be a bool (True or False)"]
  if not zero_terminal:
    return []
  problems = []
  if dcfg.mean_type in MEAN_TYPES and dcfg.mean_type not in ZERO_SNR_MEAN_TYPES:
    problems.append(
      f"diffusion.mean_type={dcfg.mean_type!r}: diffusion.zero_terminal_snr=True needs"
      " mean_type 'v' (or 'x0'): at alpha_bar_T = 0 an eps prediction does not determine x_0"
    )
  T = dcfg.num_timesteps
  if checks.is_int(T) and T < 2:
    problems.append(
      f"diffusion.num_timesteps={T!r}: diffusion.zero_terminal_snr=True needs num_timesteps >= 2"
    )
  return problems


def _schedule_problems(dcfg: Any) -> list[str]:
  try:
    betas = _config_betas(dcfg)
  except ValueError as e:
    T = dcfg.num_timesteps
    end = schedules.DEFAULT_BETA_END * 1000.0 / T
    if dcfg.schedule == "linear" and dcfg.beta_end is None and end >= 1.0:
      # DDPM's 0.02 at T = 1000, rescaled by 1000 / T, is 1 or more from T = 20 down.
      return [
        f"diffusion.num_timesteps={T}: the linear schedule's default beta_end 0.02 * 1000 / T"
        f" = {end:g} makes a beta >= 1 at T <= 20; use schedule 'cosine', or set"
        " diffusion.beta_end < 1"
      ]
    return [f"diffusion.schedule={dcfg.schedule!r}: {e}"]
  if dcfg.schedule != "constant" and betas[0] > betas[-1]:
    name = "beta_start" if dcfg.beta_start is not None else "beta_end"
    return [
      f"diffusion.{name}={getattr(dcfg, name)!r}: must give beta_start <= beta_end; the"
      f" {dcfg.schedule} schedule would run from {betas[0]:g} down to {betas[-1]:g}"
    ]
  return []


def _one_of(allowed: Any) -> str:
  return "must be one of " + ", ".join(allowed)


# ----------------------------------------------------------------------------- respacing


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """Chooses which steps of a T-step schedule to keep (Nichol & Dhariwal 2021, Sec. 4).

  Args:
    num_timesteps: T of the original schedule.
    section_counts: ``"ddimN"`` keeps ``range(0, T, stride)`` with the stride
      giving exactly N steps (DDIM's spacing); an int N, or a list / comma
      separated string of counts, splits ``0..T-1`` into that many equal
      sections and keeps evenly spaced steps (first and last included) in each.

  Returns:
    Sorted list of kept step indices.
  """
  T = num_timesteps
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      n = _parse_int(section_counts[4:], section_counts)
      for stride in range(1, T + 1):
        if len(range(0, T, stride)) == n:
          return list(range(0, T, stride))
      raise ValueError(
        f"cannot keep exactly {n} of {T} steps with a fixed stride ({section_counts!r});"
        f" choose N in 1..{T} that some stride produces, or pass a section count such as {n}"
      )
    section_counts = [_parse_int(s, section_counts) for s in section_counts.split(",")]
  elif isinstance(section_counts, int | np.integer):
    section_counts = [int(section_counts)]
  counts = list(section_counts)
  if not counts:
    raise ValueError("section_counts is empty; pass e.g. 50, 'ddim50' or [10, 20]")
  size_per, extra = divmod(T, len(counts))
  kept: list[int] = []
  start = 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if not 1 <= count <= size:
      raise ValueError(
        f"cannot keep {count} steps in a section of {size} steps (T={T}, sections={counts});"
        f" each count must be in 1..{size}"
      )
    frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    kept.extend(start + round(j * frac_stride) for j in range(count))
    start += size
  return sorted(set(kept))


def _parse_int(s: str, whole: str) -> int:
  try:
    return int(s)
  except ValueError:
    raise ValueError(
      f"cannot parse timestep spacing {whole!r}; allowed: 'ddimN', an int, or counts like '10,15'"
    ) from None


def respace(diffusion: Diffusion, use_timesteps: Sequence[int]) -> Diffusion:
  """A diffusion over a subset of steps, with the same alpha_bar at the kept steps.

  The betas are recomputed in float64 as ``1 - alpha_bar_i / alpha_bar_prev``
  over the kept steps (from the stored betas: products of float32 betas formed
  in float64 keep float32 precision; it is forming them in float32 that loses
  digits), and ``timestep_map`` remembers the original step of each
  index, so a model trained on the full schedule sees the t it was trained on.
  """
  T = diffusion.num_timesteps
  keep = sorted({int(i) for i in use_timesteps})
  if not keep or keep[0] < 0 or keep[-1] >= T:
    raise ValueError(f"use_timesteps must be a non-empty subset of 0..{T - 1}, got {keep[:8]}...")
  ab = np.cumprod(1.0 - np.asarray(diffusion.betas, dtype=np.float64))
  prev = np.append(1.0, ab[keep][:-1])
  new_betas = 1.0 - ab[keep] / prev
  old_map = np.asarray(diffusion.timestep_map)
  return make_diffusion(
    new_betas,
    mean_type=diffusion.mean_type,
    var_type=diffusion.var_type,
    timestep_map=old_map[keep],
    dtype=diffusion.betas.dtype,
  )


# ----------------------------------------------------------------------------- the maths


def extract(a: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """``a[t]`` shaped ``[B, 1, ..., 1]`` to broadcast against an ``ndim``-rank batch."""
  return a[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def model_timesteps(d: Diffusion, t: jax.Array) -> jax.Array:
  """The timesteps to give the model for indices ``t`` (original-schedule steps)."""
  return d.timestep_map[t]


def q_mean_variance(
  d: Diffusion, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I); Ho et al. eq. 4.

  Returns:
    ``(mean, variance, log_variance)``, each shaped like ``x0``.
  """
  mean = extract(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
  var = jnp.broadcast_to(extract(d.one_minus_alphas_cumprod, t, x0.ndim), x0.shape)
  log_var = jnp.broadcast_to(extract(d.log_one_minus_alphas_cumprod, t, x0.ndim), x0.shape)
  return mean, var, log_var


def q_sample(d: Diffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) with the given standard-normal ``noise``; Ho et al. eq. 4."""
  return (
    extract(d.sqrt_alphas_cumprod, t, x0.ndim) * x0
    + extract(d.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
  )


def q_posterior_mean_variance(
  d: Diffusion, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I); Ho et al. eqs. 6-7.

  Returns:
    ``(mean, variance, log_variance_clipped)``, each shaped like ``x_t``.
  """
  mean = (
    extract(d.posterior_mean_coef1, t, x_t.ndim) * x0
    + extract(d.posterior_mean_coef2, t, x_t.ndim) * x_t
  )
  var = jnp.broadcast_to(extract(d.posterior_variance, t, x_t.ndim), x_t.shape)
  log_var = jnp.broadcast_to(extract(d.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
  return mean, var, log_var


def predict_x0_from_eps(d: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar); inverts eq. 4 (undefined, NaN,
  where alpha_bar = 0: hence no eps prediction with zero terminal SNR)."""
  return (
    extract(d.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
    - extract(d.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
  )


def predict_eps_from_x0(d: Diffusion, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1); inverts eq. 4.

  Where alpha_bar = 0 (zero terminal SNR) x_t is the noise itself: eps = x_t, whatever x_0.
  """
  nd = x_t.ndim
  recip, recipm1 = (
    extract(d.sqrt_recip_alphas_cumprod, t, nd),
    extract(d.sqrt_recipm1_alphas_cumprod, t, nd),
  )
  if not d.zero_terminal_snr:
    return (recip * x_t - x0) / recipm1
  # The inf / inf of the general form is replaced before it is formed, so that neither the
  # value nor a gradient through the unused branch is NaN.
  terminal = extract(d.alphas_cumprod, t, nd) == 0.0
  recip, recipm1 = jnp.where(terminal, 1.0, recip), jnp.where(terminal, 1.0, recipm1)
  return jnp.where(terminal, x_t, (recip * x_t - x0) / recipm1)


def predict_v(d: Diffusion, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """The v target, v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)."""
  return (
    extract(d.sqrt_alphas_cumprod, t, x0.ndim) * eps
    - extract(d.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
  )


def predict_x0_from_v(d: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
  return (
    extract(d.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
    - extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
  )


def predict_eps_from_v(d: Diffusion, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
  return (
    extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
    + extract(d.sqrt_alphas_cumprod, t, x_t.ndim) * v
  )


def split_model_output(d: Diffusion, model_output: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Splits ``[..., 2C]`` into (mean part, variance part) for learned variances."""
  if not d.learned_variance:
    return model_output, None
  c = model_output.shape[-1]
  if c % 2:
    raise ValueError(
      f"var_type {d.var_type!r} needs a model output with 2*C channels, got {c} channels"
    )
  return model_output[..., : c // 2], model_output[..., c // 2 :]


def p_mean_variance(
  d: Diffusion,
  model_output: jax.Array,
  x_t: jax.Array,
  t: jax.Array,
  *,
  clip_denoised: bool = True,
) -> dict[str, jax.Array]:
  """The reverse step p(x_{t-1} | x_t) = N(mean, variance) from a model output.

  The mean is the posterior mean mu~_t(x_t, x0_hat) at the model's estimate of
  x_0 (Ho et al. eqs. 7 and 11), whatever the model predicts.

  Args:
    d: the diffusion.
    model_output: ``[B, H, W, C]``, or ``[B, H, W, 2C]`` for learned variances
      (second half: log-variance for ``learned``, v in [-1, 1] for ``learned_range``).
    x_t: ``[B, H, W, C]``.
    t: ``[B]`` int indices.
    clip_denoised: clip the x_0 estimate to [-1, 1] before forming the mean.

  Returns:
    dict with ``mean``, ``variance``, ``log_variance``, ``pred_x0`` and
    ``pred_eps`` (the noise consistent with the possibly clipped ``pred_x0``),
    each shaped like ``x_t``.
  """
  out, var_out = split_model_output(d, model_output)
  if out.shape != x_t.shape:
    raise ValueError(f"model output mean part has shape {out.shape}, expected {x_t.shape}")
  nd = x_t.ndim
  if d.var_type == "fixed_small":
    log_var = extract(d.posterior_log_variance_clipped, t, nd)
  elif d.var_type == "fixed_large":
    log_var = extract(d.fixed_large_log_variance, t, nd)
  elif d.var_type == "learned":
    log_var = var_out
  else:  # learned_range, Nichol & Dhariwal eq. 15
    frac = (var_out + 1.0) / 2.0
    log_var = frac * extract(d.log_betas, t, nd) + (1.0 - frac) * extract(
      d.posterior_log_variance_clipped, t, nd
    )
  log_var = jnp.broadcast_to(log_var, x_t.shape)

  if d.mean_type == "eps":
    pred_x0 = predict_x0_from_eps(d, x_t, t, out)
  elif d.mean_type == "x0":
    pred_x0 = out
  else:
    pred_x0 = predict_x0_from_v(d, x_t, t, out)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(d, pred_x0, x_t, t)
  return {
    "mean": mean,
    "variance": jnp.exp(log_var),
    "log_variance": log_var,
    "pred_x0": pred_x0,
    "pred_eps": predict_eps_from_x0(d, x_t, t, pred_x0),
  }


def snr(d: Diffusion, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), ``[B]``."""
  return d.alphas_cumprod[t] / d.one_minus_alphas_cumprod[t]
