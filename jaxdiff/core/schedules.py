"""Noise schedules: the variances beta_1..beta_T of the forward process.

Every schedule is computed in NumPy float64. Casting to the compute dtype
happens once, in :func:`jaxdiff.core.diffusion.make_diffusion`: quantities such as
``1 - alpha_bar`` near ``t = 0`` lose most of their digits if the products are
formed in float32 (and JAX silently drops float64 unless x64 is enabled).

Example::

  betas = get_betas("cosine", 1000)            # np.ndarray, float64, shape [1000]
  betas = get_betas("linear", 4000)            # DDPM's schedule rescaled to T=4000
  betas = get_betas("constant", 10, beta=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# DDPM's linear schedule (Ho et al. 2020, Sec. 4) at T = 1000.
DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 0.02


def _linear(T: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
  # Nichol & Dhariwal 2021 (Sec. 3.2 / improved-diffusion) rescale DDPM's
  # defaults by 1000 / T so that any T gives roughly the same alpha_bar curve.
  # Explicitly given endpoints are used as they are.
  scale = 1000.0 / T
  start = DEFAULT_BETA_START * scale if beta_start is None else beta_start
  end = DEFAULT_BETA_END * scale if beta_end is None else beta_end
  return np.linspace(start, end, T, dtype=np.float64)


def _quadratic(
  T: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END
) -> np.ndarray:
  return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _sigmoid(
  T: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END
) -> np.ndarray:
  s = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T, dtype=np.float64)))
  return s * (beta_end - beta_start) + beta_start


def _geometric(
  T: int, beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END
) -> np.ndarray:
  return np.geomspace(beta_start, beta_end, T, dtype=np.float64)


def _constant(T: int, beta: float | None = None) -> np.ndarray:
  if beta is None:
    raise ValueError("schedule 'constant' needs beta=<float in (0, 1)>, e.g. beta=0.02")
  return np.full(T, beta, dtype=np.float64)


def _cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021, eq. 17: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)."""

  def alpha_bar(u: np.ndarray) -> np.ndarray:
    return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

  i = np.arange(T, dtype=np.float64)
  # Clipped above only (eq. 17's 0.999): the first betas stay as small as the curve says.
  return np.minimum(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
  "linear": _linear,
  "cosine": _cosine,
  "quadratic": _quadratic,
  "sigmoid": _sigmoid,
  "geometric": _geometric,
  "constant": _constant,
}


def get_betas(name: str, num_timesteps: int, **kwargs: float) -> np.ndarray:
  """Returns the float64 betas of a named schedule.

  Args:
    name: one of ``linear`` (DDPM; defaults 1e-4..0.02 scaled by 1000/T),
      ``cosine`` (Nichol & Dhariwal eq. 17; ``s``, ``max_beta``), ``quadratic``,
      ``sigmoid``, ``geometric`` (``beta_start``, ``beta_end``) or ``constant``
      (``beta``).
    num_timesteps: T >= 1, the number of diffusion steps.
    **kwargs: the schedule's parameters; ``None`` values mean "default".

  Returns:
    ``np.ndarray`` of shape ``[T]``, dtype float64, every value in (0, 1).

  Raises:
    ValueError: unknown name or parameter, T < 1, or a beta outside (0, 1).
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
  if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int | np.integer):
    raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  fn = SCHEDULES[name]
  allowed = fn.__code__.co_varnames[1 : fn.__code__.co_argcount]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
      f"schedule {name!r} got unknown parameter(s) {unknown}; allowed: {list(allowed)}"
    )
  given = {k: v for k, v in kwargs.items() if v is not None}
  betas = fn(int(num_timesteps), **given)
  what = f"schedule {name!r} with T={num_timesteps}"
  if name == "linear" and "beta_end" not in given:
    what += " (default beta_end 0.02 * 1000 / T; pass beta_end for small T)"
  return validate_betas(betas, what=what)


def validate_betas(
  betas: np.ndarray, *, what: str = "betas", terminal_one: bool = False
) -> np.ndarray:
  """Checks a user-given beta vector; returns it as float64 ``[T]``.

  Every beta must lie in (0, 1); with ``terminal_one`` the last may also be exactly 1, the
  zero-terminal-SNR schedules of :mod:`jaxdiff.core.zero_snr` (alpha_bar_T = 0).
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f"{what}: betas must be a non-empty 1-D array, got shape {betas.shape}")
  ok = (betas > 0.0) & (betas < 1.0)
  if terminal_one:
    ok[-1] |= betas[-1] == 1.0
  bad = np.flatnonzero(~ok)
  if bad.size:
    i = int(bad[0])
    allowed = "(0, 1), or 1 for the last beta" if terminal_one else "open interval (0, 1)"
    raise ValueError(
      f"{what}: beta[{i}] = {float(betas[i])!r} is outside the allowed {allowed}"
      f" ({bad.size} bad value(s))"
    )
  return betas
