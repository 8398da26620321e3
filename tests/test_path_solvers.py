"""The chain's solvers on the continuous processes' grids: DDIM and DPM-Solver++(2M) on flow,
DPM-Solver++(2M) on EDM's sigma grid and VDM's schedule. Single steps against float64 references
written from other formulas (tests/reference_continuous.py), whole chains on Gaussian data
(whose exact model is known in closed form) against a float64 run of the same method and against
the exact transport.

Float32 against float64: atol 2e-5 on O(1) values, as tests/test_flow.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling as S
from jaxdiff.core import process as P
from jaxdiff.sampling.ddim import flow_ddim_step
from tests import reference_continuous as refc
from tests.test_flow import MU, SD, X_T, _gaussian_velocity


def _velocity64(x, t):
  return refc.flow_gaussian_velocity(x, t, MU, SD)


@pytest.mark.parametrize("t, s", [(1.0, 0.9), (0.7, 0.3), (0.2, 0.05), (0.1, 0.0)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_flow_ddim_step_matches_float64(t, s, eta):
  """One step from t to s, the noise given, against the reference's posterior from precisions."""
  z = jax.random.normal(jax.random.key(1), X_T.shape)
  B = X_T.shape[0]
  v = _gaussian_velocity(X_T, jnp.full((B,), t * P.TIME_SCALE))
  out = flow_ddim_step(
    v, X_T, jnp.full((B,), t), jnp.full((B,), s), z, eta=eta, clip_denoised=False
  )
  want = refc.flow_ddim(X_T, [s, t], _velocity64, eta, [z])
  np.testing.assert_allclose(out["sample"], want, atol=2e-5)
  if eta == 0:  # deterministic DDIM on the straight path is the Euler step
    np.testing.assert_allclose(out["sample"], X_T + (s - t) * v, atol=2e-6)
  # Into s = 0 nothing is injected, whatever eta: the step lands on x0_hat.
  assert (float(jnp.max(out["std"])) == 0.0) == (s == 0.0 or eta == 0.0)


def test_flow_ddim_needs_noise_for_eta_above_zero():
  t = jnp.full((X_T.shape[0],), 0.5)
  with pytest.raises(ValueError, match=r"flow_ddim_step with eta=0.5 needs noise"):
    flow_ddim_step(X_T, X_T, t, t / 2, None, eta=0.5)


def test_deterministic_ddim_on_a_flow_is_the_euler_sampler():
  kw = dict(num_steps=12, x_T=X_T, clip_denoised=False)
  flow = P.FlowMatching(shift=3.0)
  ddim = S.sample(flow, _gaussian_velocity, jax.random.key(0), X_T.shape, sampler="ddim", **kw)
  euler = S.sample(flow, _gaussian_velocity, jax.random.key(0), X_T.shape, sampler="euler", **kw)
  np.testing.assert_allclose(ddim, euler, atol=2e-5)


def _ddim_moments(num_steps, eta):
  """Mean and standard deviation of the float64 reference chain from x_T ~ N(0, 1): on Gaussian
  data every step is affine in x plus c z, so the moments propagate exactly."""
  grid = np.linspace(0.0, 1.0, num_steps + 1)
  mean, var = 0.0, 1.0
  for k in range(num_steps, 0, -1):
    step = lambda x, z: refc.flow_ddim(np.array([x]), grid[k - 1 : k + 1], _velocity64, eta, [z])[0]  # noqa: B023, E731
    b = step(0.0, 0.0)
    a, c = step(1.0, 0.0) - b, step(0.0, 1.0) - b
    mean, var = a * mean + b, a * a * var + c * c
  return mean, math.sqrt(var)


def test_stochastic_ddim_on_a_flow_has_the_reference_chains_law():
  """eta = 1 (ancestral sampling on the straight path) from many x_T: the samples' mean and
  standard deviation are the float64 chain's, to Monte-Carlo error (16384 values: s.e. 0.004 of
  the mean, 0.003 of the std). With the posterior mean of an exact x0_hat, 20 steps lose part of
  the data's spread (std 0.47 for SD 0.5): the check is the method, not the data law."""
  shape, num_steps = (4096, 2, 2, 1), 20
  kw = dict(sampler="ddim", num_steps=num_steps, eta=1.0, clip_denoised=False)
  x = S.sample(P.FlowMatching(), _gaussian_velocity, jax.random.key(3), shape, **kw)
  x = np.asarray(x, np.float64)
  mean, std = _ddim_moments(num_steps, 1.0)
  assert abs(x.mean() - mean) < 0.015 and abs(x.std() - std) < 0.012, (x.mean(), mean, x.std(), std)
  assert abs(mean - MU) < 0.01  # the mean is transported (nearly) exactly
  # The same key gives the same samples; another key others.
  small = (16, 2, 2, 1)
  again = S.sample(P.FlowMatching(), _gaussian_velocity, jax.random.key(3), small, **kw)
  np.testing.assert_array_equal(
    again, S.sample(P.FlowMatching(), _gaussian_velocity, jax.random.key(3), small, **kw)
  )
  other = S.sample(P.FlowMatching(), _gaussian_velocity, jax.random.key(4), small, **kw)
  assert not np.allclose(again, other)


@pytest.mark.parametrize(
  "num_steps, shift, exact_tol",
  # Distance to the exact transport MU + SD x_T (measured): 0.0095 at 10 steps, 0.0074 / 0.0024 /
  # 0.0007 at 40 / 80 / 160 (second order once the steps are small); 0.045 on the shift-3 grid
  # of 20 steps (its last steps are long). Euler, for scale: 0.21 at 10 steps, 0.11 at 20, 0.21
  # on the shift-3 grid of 20.
  [(10, 1.0, 0.012), (80, 1.0, 0.003), (20, 3.0, 0.05)],
)
def test_dpmpp_2m_on_a_flow_matches_float64_and_the_exact_transport(num_steps, shift, exact_tol):
  x = S.sample(
    P.FlowMatching(shift=shift), _gaussian_velocity, jax.random.key(0), X_T.shape,
    sampler="dpm++2m", num_steps=num_steps, x_T=X_T, clip_denoised=False,
  )  # fmt: skip
  grid = refc.flow_shift(np.linspace(0.0, 1.0, num_steps + 1), shift)
  np.testing.assert_allclose(x, refc.flow_dpmpp_2m(X_T, grid, _velocity64), atol=2e-5)
  np.testing.assert_allclose(x, MU + SD * np.asarray(X_T, np.float64), atol=exact_tol)


def test_dpmpp_2m_on_a_flow_clips_its_data_predictions():
  x = S.sample(
    P.FlowMatching(), lambda x, s: -3.0 * x, jax.random.key(0), X_T.shape,
    sampler="dpm++2m", num_steps=6, x_T=X_T,
  )  # fmt: skip
  assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.max(jnp.abs(x))) <= 1.0


def test_every_process_lists_its_solvers():
  assert {"ddim", "dpm++2m", "euler", "heun"} <= set(S.samplers_for("flow"))
  assert {"ddpm", "euler_maruyama", "pc"}.isdisjoint(S.samplers_for("flow"))
  assert {"dpm++2m", "euler", "heun", "edm_stochastic"} <= set(S.samplers_for("edm"))
  assert {"dpm++2m", "vdm", "vdm_ddim"} <= set(S.samplers_for("vdm"))


# ----------------------------------------------------------------------------- edm and vdm


def _edm_and_vdm(process):
  from tests.test_ode_bpd import MU_G, SD_G, _exact_model

  p = P.EDM() if process == "edm" else P.VDM(schedule="fixed")
  return p, _exact_model(process, p), MU_G, SD_G


# Distance to the exact transport (measured): edm 0.018 at 40 steps (0.23 at 12, where Heun's
# 24 model calls reach 0.24; x starts at up to 80 * 3); vdm 0.0058 at 40 steps (vdm_ddim 0.10).
@pytest.mark.parametrize("process, num_steps, exact_tol", [("edm", 40, 0.025), ("vdm", 40, 0.01)])
def test_dpmpp_2m_on_edm_and_vdm_matches_float64_and_the_exact_transport(
  process, num_steps, exact_tol
):
  """EDM: alpha = 1, sigma on the rho grid, from sigma_max x_T to sigma = 0. VDM (fixed
  schedule): alpha^2 = sigmoid(-gamma), on t uniform from 1 to 0, ending at z_0 / alpha_0. The
  exact transport of N(MU, SD^2) is the probability-flow map x_sigma -> MU + sqrt((SD^2 +
  sigma'^2) / (SD^2 + sigma^2)) (x_sigma - MU) in x / alpha coordinates."""
  p, model, mu, sd = _edm_and_vdm(process)
  x = S.sample(p, model, jax.random.key(0), X_T.shape, sampler="dpm++2m", num_steps=num_steps,
               x_T=X_T, clip_denoised=False)  # fmt: skip
  x0_of = lambda x, s: refc.gaussian_denoiser(x, s, mu, sd)  # noqa: E731  # sigma coordinates
  if process == "edm":
    sigmas = np.flip(np.asarray(p.grid(num_steps).sigmas, np.float64))[::-1]
    start = sigmas[-1] * np.asarray(X_T, np.float64)
    want = refc.dpmpp_2m_path(start, sigmas, lambda s: 1.0, lambda s: s, x0_of)
    exact = mu + sd / math.sqrt(sd**2 + sigmas[-1] ** 2) * (start - mu)
  else:
    ts = np.linspace(0.0, 1.0, num_steps + 1)
    gamma = lambda t: p.gamma_min + (p.gamma_max - p.gamma_min) * t  # noqa: E731
    alpha = lambda t: math.sqrt(1 / (1 + math.exp(gamma(t))))  # noqa: E731
    sigma = lambda t: math.sqrt(1 / (1 + math.exp(-gamma(t))))  # noqa: E731
    z0 = refc.dpmpp_2m_path(np.asarray(X_T, np.float64), ts, alpha, sigma,
                            lambda z, t: x0_of(z / alpha(t), sigma(t) / alpha(t)))  # fmt: skip
    want = z0 / alpha(0.0)
    s0, s1 = (sigma(t) / alpha(t) for t in (0.0, 1.0))
    x1 = np.asarray(X_T, np.float64) / alpha(1.0)
    exact = mu + math.sqrt((sd**2 + s0**2) / (sd**2 + s1**2)) * (x1 - mu)
  np.testing.assert_allclose(x, want, atol=5e-5)
  np.testing.assert_allclose(x, exact, atol=exact_tol)


@pytest.mark.parametrize(
  "process, draw",
  [("ddpm", "uniform"), ("flow", "uniform"), ("edm", "log_normal"), ("vdm", "low_discrepancy")],
)
def test_a_process_alone_is_a_whole_config_with_its_own_time_draw(process, draw):
  """``--config.diffusion.process=X`` and nothing else: the defaults pass every process's check
  and t_sampler "" resolves to the process's own draw."""
  from jaxdiff.config import get_config

  dcfg = get_config().diffusion
  dcfg.process = process
  assert dcfg.t_sampler == "" and P.check_config(dcfg) == []
  assert P.t_sampler(dcfg) == draw and P.kind(dcfg) == process
  built = P.from_config(dcfg)
  assert P.name(built) == process
  if process in ("flow", "vdm"):
    assert built.t_sampler == draw
