"""Likelihood by the probability-flow ODE of any process (issue 15, item 6): the ln-sigma ODE of
a denoiser (jaxdiff.core.continuous.ode.sigma_log_likelihood) on Gaussian data, where the
log-density is known in closed form.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core.continuous import ode
from tests import reference_continuous as ref

RNG = np.random.default_rng(3)
COV = np.array([[0.5, 0.3], [0.3, 0.4]])  # correlated: the divergence is not a diagonal sum
MEAN = np.array([0.3, -0.5])


def _denoiser(x, sigma):
  """E[y | y + sigma n = x] for y ~ N(MEAN, COV): MEAN + COV (COV + sigma^2 I)^-1 (x - MEAN)."""
  cov = jnp.asarray(COV, x.dtype)
  s2 = sigma[0] ** 2  # all equal within a call
  gain = cov @ jnp.linalg.inv(cov + s2 * jnp.eye(2, dtype=x.dtype))
  return jnp.asarray(MEAN, x.dtype) + (x - jnp.asarray(MEAN, x.dtype)) @ gain.T


_solve = jax.jit(
  ode.sigma_log_likelihood,
  static_argnums=0,
  static_argnames=("sigma_min", "sigma_max", "prior_var", "num_steps", "method", "divergence"),
)


def test_the_sigma_ode_gives_the_exact_log_density_of_gaussian_data():
  """log p_{sigma_min}(x) = log N(x; MEAN, COV + sigma_min^2 I) in float64. With the exact
  marginal at sigma_max as the prior the ODE's own error remains (measured, 6 points: RK4 in ln
  sigma 3e-4 at 80 steps and 2e-5 at 160, Heun 0.071 at 160); the N(0, (sigma_max^2 + 1) I)
  prior adds its mismatch, mostly the data mean's, ~|MEAN| |z| / sigma_max^2 (measured 0.004 at
  sigma_max = 500)."""
  with jax.enable_x64(True):
    x = jnp.asarray(RNG.multivariate_normal(MEAN, COV, 6))
    sigma_min, sigma_max = 2e-3, 500.0
    want = ref.gaussian_logpdf(np.asarray(x), MEAN, COV + sigma_min**2 * np.eye(2))
    for method, steps, tol in (("rk4", 80, 1e-3), ("heun", 160, 0.1)):
      got = _solve(
        _denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max, prior_var=sigma_max**2 + 1,
        num_steps=steps, method=method, divergence="exact",
      )  # fmt: skip
      exact_prior = ref.gaussian_logpdf(np.asarray(got["z"]), MEAN, COV + sigma_max**2 * np.eye(2))
      np.testing.assert_allclose(
        np.asarray(got["delta_logp"]) + exact_prior, want, rtol=0, atol=tol, err_msg=method
      )
      np.testing.assert_allclose(got["log_p"], want, rtol=0, atol=tol + 0.006, err_msg=method)
    # Hutchinson's probe: unbiased, one estimate per row; 512 rows of one point.
    rows = jnp.repeat(x[:1], 512, axis=0)
    est = _solve(
      _denoiser, rows, jax.random.key(0), sigma_min=sigma_min, sigma_max=sigma_max,
      prior_var=sigma_max**2 + 1, num_steps=40,
    )["log_p"]  # fmt: skip
    se = float(jnp.std(est)) / math.sqrt(512)
    assert float(jnp.std(est)) > 0 and abs(float(jnp.mean(est)) - want[0]) < 4 * se


def test_the_sigma_ode_refuses_an_empty_range():
  with pytest.raises(ValueError, match=r"need 0 < sigma_min < sigma_max, got 1.0 and 0.5"):
    ode.sigma_log_likelihood(
      _denoiser, jnp.zeros((1, 2)), sigma_min=1.0, sigma_max=0.5, prior_var=1
    )


# ----------------------------------------------------------------------------- adaptive steps

ROTATION = np.array([[-0.5, 1.0], [-1.0, -0.3]])  # a damped spiral, time-varying speed


def _spiral(y, t):
  """dy/dt = (1 + sin t) A y per example, with d delta/dt = div = (1 + sin t) tr A."""
  speed = 1.0 + jnp.sin(t)
  return speed[:, None] * (y @ jnp.asarray(ROTATION, y.dtype).T), speed * np.trace(ROTATION)


def test_dopri5_takes_the_steps_of_scipys_rk45():
  """scipy.integrate.solve_ivp(method="RK45") is the independent reference (Song et al. solve the
  likelihood ODE with it): the same Dormand-Prince pair, error norm, first step and step-size
  rule, so the same accepted and rejected steps. In float64 each example's end state agrees to
  rounding and its count of evaluations is scipy's nfev exactly (3 examples x 3 tolerances)."""
  from scipy.integrate import solve_ivp

  def fun(t, s):
    speed = 1.0 + math.sin(t)
    return np.concatenate([speed * ROTATION @ s[:2], [speed * np.trace(ROTATION)]])

  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))
    for tol in (1e-3, 1e-5, 1e-8):
      y, delta, nfe, solved = jax.jit(
        lambda x, tol=tol: ode.dopri5_solve(_spiral, x, 0.0, 5.0, rtol=tol, atol=tol)
      )(x)
      assert bool(jnp.all(solved))
      for i in range(3):
        want = solve_ivp(fun, (0.0, 5.0), [*np.asarray(x[i]), 0.0], rtol=tol, atol=tol)
        np.testing.assert_allclose(y[i], want.y[:2, -1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(delta[i], want.y[2, -1], rtol=0, atol=1e-12)
        assert int(nfe[i]) == want.nfev, (tol, i)


def test_dopri5_steps_each_example_on_its_own():
  """Examples of different scales need different steps; solved together (lockstep, finished
  ones held) each gives what it gives alone, and max_steps leaves the slow ones unsolved."""
  with jax.enable_x64(True):
    x = jnp.asarray([[1e-3, 0.0], [1.0, -1.0], [300.0, 50.0]])
    solve = jax.jit(
      lambda x, m: ode.dopri5_solve(_spiral, x, 0.0, 5.0, rtol=1e-6, atol=1e-6, max_steps=m),
      static_argnums=1,
    )
    y, delta, nfe, _ = solve(x, 1000)
    assert len(set(np.asarray(nfe).tolist())) == 3  # three step-size histories
    for i in range(3):
      yi, di, ni, _ = solve(x[i : i + 1], 1000)
      np.testing.assert_allclose(yi[0], y[i], rtol=1e-12)  # (the matmul batches differ)
      np.testing.assert_allclose(di[0], delta[i], rtol=1e-12)
      assert int(ni[0]) == int(nfe[i])
    middle = np.sort(np.asarray(nfe))[1]
    cap = int((middle - 2) // 6)  # the attempts of the example in the middle
    _, _, nfe_cap, solved = solve(x, cap)
    assert np.asarray(solved).tolist() == (np.asarray(nfe) <= middle).tolist()
    assert int(jnp.max(nfe_cap)) == 2 + 6 * cap


def test_dopri5_refuses_bad_settings():
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match=r"dopri5 integrates forward: need t0 < t1, got 1.0 and 0.0"):
    ode.dopri5_solve(_spiral, x, 1.0, 0.0)
  with pytest.raises(ValueError, match=r"rtol=0.0, atol=1e-05: the tolerances must be positive"):
    ode.dopri5_solve(_spiral, x, 0.0, 1.0, rtol=0.0)
  with pytest.raises(ValueError, match=r"max_steps=0: need >= 1"):
    ode.dopri5_solve(_spiral, x, 0.0, 1.0, max_steps=0)


def test_ode_bits_per_dim_with_adaptive_steps():
  """dopri5 on the pixel Gaussian: the float64 density as with RK4 (its own evaluations counted
  in the record), and an image it cannot finish within max_steps is an error, not a number."""
  from jaxdiff.evaluation import ode_bpd

  images, view = _images(), _pixel_view()
  rk4 = ode_bpd.ode_bits_per_dim(view, images, batch_size=8, num_steps=64, divergence="exact")
  rec = ode_bpd.ode_bits_per_dim(
    view, images, batch_size=8, method="dopri5", rtol=1e-5, atol=1e-5, divergence="exact"
  )
  np.testing.assert_allclose(rec["per_example_bpd"], rk4["per_example_bpd"], rtol=0, atol=1e-3)
  assert {k: rec[k] for k in ("method", "rtol", "atol", "max_steps")} == {
    "method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "max_steps": 1000
  }  # fmt: skip
  assert "num_steps" not in rec and rk4["nfe_mean"] == rk4["nfe_max"] == 256
  assert 2 + 6 <= rec["nfe_mean"] <= rec["nfe_max"] < 2 + 6 * 1000
  with pytest.raises(RuntimeError, match=r"dopri5 reached sigma_max for 0 of 12 images within"
                     r" max_steps=2 attempted steps \(first unsolved: image 0\)"):  # fmt: skip
    ode_bpd.ode_bits_per_dim(view, images, batch_size=8, method="dopri5", max_steps=2)


# ----------------------------------------------------------------------------- bits/dim of images

MU_PIX, SD_PIX = 0.1, 0.6  # the model: pixels ~ N(MU_PIX, SD_PIX^2) independently, in [-1, 1]


def _pixel_view(sigma_min=2e-3, sigma_max=300.0):
  def denoise(x, sigma):
    s2 = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1)) ** 2
    return MU_PIX + SD_PIX**2 / (SD_PIX**2 + s2) * (x - MU_PIX)

  return ode.SigmaView(denoise, sigma_min, sigma_max, sigma_max**2 + 1.0)


def _images(n=12):
  return np.random.default_rng(5).integers(0, 256, (n, 2, 2, 1), dtype=np.uint8)


def test_ode_bits_per_dim_is_the_dequantised_gaussian_density_in_float64():
  """Exact divergence: each example's bits/dim against float64 -log2 N(x; MU, SD^2 + sigma_min^2)
  / D + log2 127.5 at x = (p + u - 1/2) / 127.5 - 1, u drawn as the contract says (fold_in of the
  example's index). Tolerance: RK4 with 64 steps in float32 plus the prior's mismatch (the mean
  MU_PIX against 0 at sigma_max = 300)."""
  from jaxdiff.evaluation import ode_bpd

  images, seed = _images(), 7
  rec = ode_bpd.ode_bits_per_dim(
    _pixel_view(), images, batch_size=8, seed=seed, num_steps=64, divergence="exact"
  )
  want = []
  for i, p in enumerate(images):
    k_u, _ = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    u = np.asarray(jax.random.uniform(k_u, p.shape), np.float64)
    x = ((p + u - 0.5) / 127.5 - 1.0).reshape(1, -1)
    var = SD_PIX**2 + 2e-3**2
    logp = ref.gaussian_logpdf(x, np.full(x.shape[1], MU_PIX), var * np.eye(x.shape[1]))[0]
    want.append(-logp / (x.shape[1] * math.log(2)) + math.log2(127.5))
  np.testing.assert_allclose(rec["per_example_bpd"], want, rtol=0, atol=1.5e-3)  # measured 6e-4
  assert rec["bpd"] == pytest.approx(np.mean(want), abs=1.5e-3)
  assert rec["bpd_stderr"] == pytest.approx(np.std(want, ddof=1) / math.sqrt(12), rel=0.02)
  assert {k: rec[k] for k in ("metric", "num_examples", "num_steps", "method", "divergence")} == {
    "metric": "ode_bpd",
    "num_examples": 12,
    "num_steps": 64,
    "method": "rk4",
    "divergence": "exact",
  }


def test_ode_bits_per_dim_depends_on_neither_batch_nor_devices():
  """Hutchinson: the probe and u are the example's own, so batches of 8 on 8 devices and of 3 on
  one device give the same per-example numbers (to float32 reassociation)."""
  from jaxdiff import parallel
  from jaxdiff.evaluation import ode_bpd

  images, view = _images(), _pixel_view()
  a = ode_bpd.ode_bits_per_dim(view, images, batch_size=8, num_steps=8)["per_example_bpd"]
  b = ode_bpd.ode_bits_per_dim(view, images, batch_size=3, num_steps=8, mesh=parallel.make_mesh(1))[
    "per_example_bpd"
  ]
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  c = ode_bpd.ode_bits_per_dim(view, images, batch_size=8, num_steps=8, seed=1)["per_example_bpd"]
  assert not np.allclose(a, c)


def test_ode_bits_per_dim_refuses_bad_input():
  from jaxdiff.evaluation import ode_bpd

  view, images = _pixel_view(), _images()
  with pytest.raises(ValueError, match=r"num_steps=0: need >= 1 solver steps"):
    ode_bpd.ode_bits_per_dim(view, images, batch_size=8, num_steps=0)
  with pytest.raises(ValueError, match=r"^method='euler': allowed heun, rk4, dopri5$"):
    ode_bpd.ode_bits_per_dim(view, images, batch_size=8, method="euler")
  with pytest.raises(ValueError, match=r"^rtol=0: a tolerance > 0; atol=nan: a tolerance > 0;"
                     r" max_steps=0: an int >= 1$"):  # fmt: skip
    ode_bpd.ode_bits_per_dim(
      view, images, batch_size=8, method="dopri5", rtol=0, atol=float("nan"), max_steps=0
    )
  assert ode_bpd.solver_problems("dopri5", 0, 1e-5, 1e-5, 10, "exact") == []  # (steps: unused)
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, C\] \(8-bit pixels\), got"
                     r" float32"):  # fmt: skip
    ode_bpd.ode_bits_per_dim(view, images.astype(np.float32), batch_size=8)
  with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\] with N >= 1, got shape"):
    ode_bpd.ode_bits_per_dim(view, images[:0], batch_size=8)


# ----------------------------------------------------------------------------- every process

MU_G, SD_G = 0.1, 0.6  # data: every value ~ N(MU_G, SD_G^2), independently


def _x0_given(x_sigma, sigma):
  """E[y | y + sigma n = x_sigma] for the data above."""
  return MU_G + SD_G**2 / (SD_G**2 + sigma**2) * (x_sigma - MU_G)


def _bc(v, x):
  return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def _exact_model(process, p):
  """Each process's exact network for the data, written from its own definition of its input,
  time and output (independently of sigma_view's conversions)."""
  from jaxdiff.core import process as P

  if process == "ddpm":  # eps at x_t, the time a fractional step between the chain's levels
    ab = np.asarray(p.alphas_cumprod, np.float64)
    log_sigmas = 0.5 * (np.log1p(-ab) - np.log(ab))

    def model(x_t, step):
      sigma = _bc(jnp.exp(jnp.interp(step, jnp.arange(len(ab), dtype=jnp.float32),
                                     jnp.asarray(log_sigmas, jnp.float32))), x_t)  # fmt: skip
      alpha = 1 / jnp.sqrt(1 + sigma**2)
      x_sigma = x_t / alpha
      return (x_sigma - _x0_given(x_sigma, sigma)) / sigma  # eps = (x_sigma - x0) / sigma

  elif process == "flow":  # v = eps - x0 at x_t = (1 - t) x0 + t eps

    def model(x_t, time):
      t = _bc(time / P.TIME_SCALE, x_t)
      sigma = t / (1 - t)
      x0 = _x0_given(x_t / (1 - t), sigma)
      return (x_t - (1 - t) * x0) / t - x0

  elif process == "edm":  # F with D = c_skip x + c_out F(c_in x, time(c_noise))

    def model(x_in, time):
      span = math.log(p.sigma_max / p.sigma_min)
      sigma = _bc(jnp.exp(time / P.TIME_SCALE * span + math.log(p.sigma_min)), x_in)
      c = P.edm.preconditioning(sigma, sigma_data=p.sigma_data)
      x = x_in / c.c_in
      return (_x0_given(x, sigma) - c.c_skip * x) / c.c_out

  else:  # vdm, fixed schedule: eps at z_t = alpha x0 + sigma_t eps, gamma(t) linear

    def model(z, time):
      gamma = _bc(p.fixed_gamma(time / P.TIME_SCALE), z)
      alpha, sigma_t = jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))
      x0 = _x0_given(z / alpha, sigma_t / alpha)
      return (z - alpha * x0) / sigma_t

  return model


@pytest.mark.parametrize("process", ["ddpm", "flow", "edm", "vdm"])
def test_every_process_has_the_exact_ode_likelihood_of_gaussian_data(process):
  """sigma_view of each process, fed its exact model, gives the ODE whose log-density at the
  view's sigma_min is N(x; MU, SD^2 + sigma_min^2) (float64 reference; RK4 in ln sigma, exact
  divergence, 48 steps). Measured errors (nats, 4 values per example): ddpm 8e-4, flow 6e-4,
  edm 1.6e-3, vdm 0.018, the last mostly the prior N(0, 1 + sigma_max^2) against the true
  N(MU, SD^2 + sigma_max^2) at vdm's small sigma_max (12: gamma_max = 5)."""
  from jaxdiff.core import diffusion as D
  from jaxdiff.core import process as P
  from jaxdiff.core import schedules

  p = {
    "ddpm": D.make_diffusion(schedules.get_betas("linear", 1000)),
    "flow": P.FlowMatching(),
    "edm": P.EDM(),
    "vdm": P.VDM(schedule="fixed"),
  }[process]
  view = P.sigma_view(p, _exact_model(process, p))
  x = jnp.asarray(np.random.default_rng(1).normal(MU_G, SD_G, (3, 2, 2, 1)), jnp.float32)
  var = SD_G**2 + view.sigma_min**2
  want = ref.gaussian_logpdf(np.asarray(x, np.float64).reshape(3, -1), np.full(4, MU_G),
                             var * np.eye(4))  # fmt: skip
  for method in ("rk4", "dopri5"):  # dopri5: each example at its own sigma within a call
    got = ode.sigma_log_likelihood(
      view.denoise, x, sigma_min=view.sigma_min, sigma_max=view.sigma_max,
      prior_var=view.prior_var, num_steps=48, method=method, divergence="exact",
    )  # fmt: skip
    assert bool(jnp.all(got["solved"])), method
    tol = 0.03 if process == "vdm" else 0.005
    np.testing.assert_allclose(got["log_p"], want, rtol=0, atol=tol, err_msg=method)
