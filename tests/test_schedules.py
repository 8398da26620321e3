"""Beta schedules against the float64 reference, and their input checks."""

import numpy as np
import pytest

from jaxdiff.core import schedules
from tests import reference as ref

CASES = [
  ("linear", 1000, {}),
  ("linear", 4000, {}),
  ("linear", 10, {"beta_start": 0.1, "beta_end": 0.2}),
  ("cosine", 1000, {}),
  ("cosine", 50, {"s": 0.01}),
  ("quadratic", 1000, {}),
  ("sigmoid", 1000, {}),
  ("geometric", 1000, {}),
  ("geometric", 30, {"beta_start": 1e-3, "beta_end": 0.3}),
  ("constant", 7, {"beta": 0.05}),
]


@pytest.mark.parametrize("name,T,kw", CASES)
def test_matches_reference_in_float64(name, T, kw):
  betas = schedules.get_betas(name, T, **kw)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  np.testing.assert_allclose(betas, ref.betas(name, T, **kw), rtol=1e-12, atol=0)
  assert np.all((betas > 0) & (betas < 1))


def test_linear_is_ddpm_at_1000_and_rescaled_elsewhere():
  b = schedules.get_betas("linear", 1000)
  assert b[0] == pytest.approx(1e-4, rel=1e-12) and b[-1] == pytest.approx(0.02, rel=1e-12)
  b = schedules.get_betas("linear", 250)
  assert b[0] == pytest.approx(4e-4, rel=1e-12) and b[-1] == pytest.approx(0.08, rel=1e-12)


def test_cosine_clips_above_only():
  b = schedules.get_betas("cosine", 1000)
  assert b[-1] == 0.999  # eq. 17's clip
  assert b[0] < 1e-4  # no lower clip: the first beta is as small as the curve says
  # alpha_bar follows the curve itself, f(t) / f(0), before the clip bites.
  f = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  f0 = np.cos(0.008 / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(np.cumprod(1 - b)[:900], (f / f0)[:900], rtol=1e-10)


def test_none_means_default():
  np.testing.assert_array_equal(
    schedules.get_betas("linear", 100, beta_start=None, beta_end=None),
    schedules.get_betas("linear", 100),
  )


@pytest.mark.parametrize(
  "args,kw,match",
  [
    (("cosinus", 10), {}, r"unknown beta schedule 'cosinus'; allowed: linear, cosine"),
    (("linear", 0), {}, r"num_timesteps must be >= 1, got 0"),
    (("linear", -5), {}, r"got -5"),
    (("linear", 2.5), {}, r"num_timesteps must be an int >= 1, got 2.5"),
    (("constant", 10), {"beta": 1.0}, r"beta\[0\] = 1.0 is outside the allowed open interval"),
    (("constant", 10), {"beta": 0.0}, r"beta\[0\] = 0.0 is outside"),
    (("constant", 10), {}, r"'constant' needs beta="),
    (("geometric", 10), {"beta_end": 1.5}, r"beta\[9\] = 1.5"),
    (("linear", 20), {}, r"pass beta_end for small T\): beta\[19\] = 1.0 is outside"),
    (("cosine", 10), {"beta_end": 0.1}, r"unknown parameter\(s\) \['beta_end'\]; allowed: \['s'"),
  ],
)
def test_bad_input_is_one_clear_error(args, kw, match):
  with pytest.raises(ValueError, match=match):
    schedules.get_betas(*args, **kw)


def test_validate_betas_rejects_bad_shapes_and_values():
  with pytest.raises(ValueError, match=r"non-empty 1-D"):
    schedules.validate_betas(np.zeros((2, 2)) + 0.1)
  with pytest.raises(ValueError, match=r"beta\[1\] = nan"):
    schedules.validate_betas([0.1, np.nan])
