"""Zero terminal SNR and trailing timesteps: Lin et al. 2024, "Common Diffusion Noise Schedules
and Sample Steps are Flawed".

Common schedules end at ``alpha_bar_T > 0`` (4e-5 for DDPM's linear schedule at T = 1000), so
training never sees pure noise while sampling starts from it. :func:`rescale_zero_terminal_snr`
rescales ``sqrt(alpha_bar)`` so that ``alpha_bar_T = 0`` exactly (their Alg. 1), and
:func:`trailing_timesteps` picks the sampling steps so that the first one is the last step of the
schedule (their Table 2). Like :mod:`jaxdiff.core.schedules`, NumPy float64.

The rescaled schedule has ``beta_T = 1``, which :func:`jaxdiff.core.diffusion.make_diffusion`
takes only with ``mean_type`` ``v`` (the paper's choice) or ``x0``: at alpha_bar_T = 0 an eps
prediction no longer determines x0. In a run config: ``diffusion.zero_terminal_snr = True`` and
``sampling.spacing = "trailing"``.
"""

from __future__ import annotations

import numpy as np


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Betas whose ``alpha_bar_T`` is 0 and whose ``alpha_bar_1`` is unchanged; Lin et al. 2024,
  Alg. 1.

  ``sqrt(alpha_bar)`` is shifted by its last value and scaled by ``a_1 / (a_1 - a_T)`` (``a =
  sqrt(alpha_bar)``), a linear map fixing the first entry and sending the last to 0; the betas
  are then recovered from the ratios ``alpha_bar_t / alpha_bar_{t-1}``.

  Args:
    betas: ``[T]`` float64 betas in (0, 1), e.g. from :func:`jaxdiff.core.schedules.get_betas`,
      T >= 2.

  Returns:
    ``[T]`` float64 betas in (0, 1] with ``betas[-1] == 1.0`` exactly.
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 2:
    raise ValueError(f"betas must be a 1-D array of T >= 2 values, got shape {betas.shape}")
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  sqrt_ab[-1] = 0.0  # exactly, whatever the rounding of (last - last) * scale
  ab = np.square(sqrt_ab)
  alphas = np.append(ab[0], ab[1:] / ab[:-1])
  return 1.0 - alphas


def trailing_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
  """The "trailing" sample steps of Lin et al. 2024, Table 2: ``round(T - i T / S) - 1`` for
  ``i = 0..S-1`` (as indices 0..T-1; the paper's ``np.round(np.flip(np.arange(T, 0, -T/S)))``
  on steps 1..T), so sampling starts at the schedule's last step, where a zero-terminal-SNR
  model has seen pure noise.

  T = 1000, S = 10 gives ``999, 899, ..., 99`` in sampling order.

  Args:
    num_timesteps: T.
    num_steps: S in 1..T.

  Returns:
    The S indices sorted ascending (as :func:`jaxdiff.core.diffusion.space_timesteps` returns
    them, for :func:`jaxdiff.core.diffusion.respace`); sample in reverse order.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in 1..{num_timesteps}")
  i = np.arange(num_steps, dtype=np.float64)
  steps = np.round(num_timesteps - i * (num_timesteps / num_steps)).astype(np.int64) - 1
  return sorted(int(s) for s in steps)
