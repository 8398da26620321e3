"""Which steps of the diffusion a sampler visits: even sections, DDIM's stride, uniform logSNR,
trailing."""

from __future__ import annotations

import numpy as np

from jaxdiff.core.diffusion import Diffusion, space_timesteps
from jaxdiff.core.zero_snr import trailing_timesteps
from jaxdiff.sampling.registry import SIGMA_GRID, check_process, get_sampler

SPACINGS = ("sections", "ddim", "logsnr", "trailing")


def sampler_timesteps(
  d: Diffusion, num_steps: int | None, *, sampler: str = "ddim", spacing: str | None = None
) -> list[int]:
  """Which steps of the diffusion a sampler visits with ``num_steps`` steps.

  Spacings (``None``: the sampler's registered default, ``SamplerDef.spacing``):

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
    time-uniform, 0.506 logSNR-uniform). With zero terminal SNR (lambda_T = -inf) the last
    step is kept and the others are uniform in lambda over the rest.
  - ``trailing``: ``round(T - i T / N) - 1`` for i = 0..N-1 (Lin et al. 2024, Table 2): the
    first step is the schedule's last, where a zero-terminal-SNR model has seen pure noise, and
    the steps are evenly spaced from there (index 0 is kept only when N = T).

  Args:
    d: the diffusion to respace.
    num_steps: N in 1..T, or None for all T steps.
    sampler: one of :data:`SAMPLERS`.
    spacing: one of :data:`SPACINGS`, or None.

  Returns:
    Sorted indices into ``d``, for :func:`jaxdiff.core.diffusion.respace`.

  Raises:
    ValueError: unknown sampler or spacing, or ``num_steps`` outside 1..T.
  """
  default = get_sampler(sampler).spacing  # raises for an unknown sampler
  check_process(sampler, "ddpm")
  if default == SIGMA_GRID:
    raise ValueError(
      f"sampler {sampler!r} steps on a sigma grid (jaxdiff.core.process.vp_sigma_grid), not on"
      " indices of the chain"
    )
  spacing = default if spacing is None else spacing
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
    if d.zero_terminal_snr and num_steps > 1:  # lambda_T = -inf: uniform over the rest
      rest = [0] if num_steps == 2 else _logsnr_timesteps(d, num_steps - 1, T - 1)
      return [*rest, T - 1]
    return _logsnr_timesteps(d, num_steps, T)
  if spacing == "trailing":
    return trailing_timesteps(T, num_steps)
  if spacing == "ddim":
    try:
      return space_timesteps(T, f"ddim{num_steps}")
    except ValueError:
      pass
  return space_timesteps(T, num_steps)


def _logsnr_timesteps(d: Diffusion, n: int, T: int) -> list[int]:
  """``n`` distinct indices of the first ``T`` of ``d``, both ends kept, nearest to uniform steps
  in lambda (Lu et al. 2022)."""
  if n == 1:
    return [T - 1]
  ab = np.asarray(d.alphas_cumprod, np.float64)[:T]
  neg_lam = -0.5 * (np.log(ab) - np.asarray(d.log_one_minus_alphas_cumprod, np.float64)[:T])
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
