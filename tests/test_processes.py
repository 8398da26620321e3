"""The continuous-time maths (jaxdiff.core.continuous, jaxdiff.core.zero_snr,
jaxdiff.models.noise_schedule) against float64 references (tests/reference_continuous.py).

Tolerances: float32 results of O(1) inputs are compared with rtol 1e-5 / atol 1e-5 (a few ulps
through a handful of operations), tighter where a formula was written not to lose digits (sigma
near t = 0: rtol 1e-6). Samplers and ODE solves are checked against closed forms for Gaussian
data, with the discretisation error and Monte-Carlo standard errors stated at each check;
float64 (``jax.enable_x64``) only where a check needs more than float32's 7 digits.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.core import schedules, zero_snr
from jaxdiff.core.continuous import conversions, edm, flow, ode, times, vdm, vp
from jaxdiff.io import images
from jaxdiff.models.noise_schedule import LearnedGamma
from tests import reference_continuous as ref

RNG = np.random.default_rng(0)
SHAPE = (4, 3, 3, 2)  # [B, H, W, C]
TS = np.array([0.0, 1e-4, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])


def _close(got, want, rtol=1e-5, atol=1e-5, msg=""):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol, err_msg=msg)


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("variance_preserving", [True, False])
def test_conversions_match_the_linear_solve_and_round_trip(variance_preserving):
  x0, eps = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
  if variance_preserving:
    alpha = np.array([0.99, 0.8, 0.5, 0.1])
    sigma = np.sqrt(1 - alpha**2)
  else:  # EDM (alpha = 1) and a rectified flow point (alpha = 1 - t, sigma = t)
    alpha, sigma = np.array([1.0, 1.0, 0.7, 0.25]), np.array([0.3, 4.0, 0.3, 0.75])
  x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
  kinds = conversions.PREDICTIONS
  preds = {k: ref.prediction(k, x0, eps, alpha, sigma) for k in kinds}

  @jax.jit
  def everything(preds, x0, eps, x_t, a, s):  # one program for every conversion
    out = {f"{k}->x0,eps": conversions.to_x0_eps(k, preds[k], x_t, a, s) for k in kinds}
    out |= {f"x0,eps->{k}": conversions.from_x0_eps(k, x0, eps, a, s) for k in kinds}
    return out | {
      f"{k}->{d}": conversions.convert(preds[k], k, d, x_t, a, s) for k in kinds for d in kinds
    }

  got = everything(
    *jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), (preds, x0, eps, x_t, alpha, sigma))
  )
  for kind in kinds:
    want_x0, want_eps = ref.x0_eps_from(kind, preds[kind], x_t, alpha, sigma)
    np.testing.assert_allclose(want_x0, x0, atol=1e-9)  # the reference is self-consistent
    got_x0, got_eps = got[f"{kind}->x0,eps"]
    # x0 from eps divides by alpha (0.1): errors grow like 1 / alpha.
    _close(got_x0, want_x0, atol=2e-5 / alpha.min(), msg=kind)
    _close(got_eps, want_eps, atol=2e-5 / sigma.min(), msg=kind)
    _close(got[f"x0,eps->{kind}"], preds[kind], msg=kind)
    for dst in kinds:
      chex.assert_shape(got[f"{kind}->{dst}"], SHAPE)
      tol = 2e-4 / min(alpha.min(), sigma.min())
      _close(got[f"{kind}->{dst}"], preds[dst], rtol=1e-4, atol=tol, msg=f"{kind}->{dst}")


def test_conversions_reject_unknown_kinds_and_take_scalars():
  x = np.ones((2, 2, 2, 1), np.float32)
  to_x0_eps = jax.jit(conversions.to_x0_eps, static_argnums=0)
  with pytest.raises(ValueError, match="unknown prediction 'noise'"):
    to_x0_eps("noise", x, x, 0.6, 0.8)
  with pytest.raises(ValueError, match="unknown prediction"):
    jax.jit(conversions.from_x0_eps, static_argnums=0)("noise", x, x, 0.6, 0.8)
  x0, eps = to_x0_eps("v", 0.6 * x - 0.8 * x, x * 1.4, 0.6, 0.8)  # scalar alpha, sigma
  _close(x0, np.ones(x.shape), atol=1e-6)
  _close(eps, np.ones(x.shape), atol=1e-6)
  lam = jax.jit(conversions.log_snr)(np.float32(0.6), np.float32(0.8))
  _close(lam, math.log(0.36 / 0.64), atol=1e-6)


# ----------------------------------------------------------------------------- VP schedules


def test_vp_linear_matches_the_sde_marginal():
  got = jax.jit(vp.vp_linear)(jnp.asarray(TS, jnp.float32))
  for i, t in enumerate(TS):
    alpha, sigma, lam = ref.vp_linear(float(np.float32(t)))
    _close(got.alpha[i], alpha, rtol=2e-6, atol=0)
    if t == 0:
      assert float(got.sigma[i]) == 0.0 and float(got.log_snr[i]) == np.inf
      continue
    # sigma near t = 0 is sqrt(-expm1(-B)), relative error ~1 ulp (forming 1 - alpha^2 in
    # float32 would lose ~0.3% of it at t = 1e-4).
    _close(got.sigma[i], sigma, rtol=1e-6, atol=0)
    _close(got.log_snr[i], lam, rtol=1e-5, atol=1e-5)
  _close(got.alpha**2 + got.sigma**2, np.ones(len(TS)), atol=1e-6)
  beta = jax.jit(vp.beta_linear)(jnp.asarray(TS))
  dbig_b = np.array([ref.derivative(lambda u: 0.1 * u + 9.95 * u**2, t) for t in TS])
  _close(beta, dbig_b, rtol=1e-5)  # beta = d/dt int beta


def test_vp_cosine_matches_the_paper_and_the_discrete_schedule():
  cosine = jax.jit(vp.vp_cosine)
  got = cosine(jnp.asarray(TS, jnp.float32))
  for i, t in enumerate(TS):
    alpha, sigma = ref.vp_cosine(float(np.float32(t)))
    _close(got.alpha[i], alpha, atol=1e-6)
    _close(got.sigma[i], sigma, rtol=1e-5, atol=1e-6)
  # The ends: alpha(1) = 0 exactly (logSNR -inf) and sigma(0) = 0 (logSNR +inf).
  assert float(got.alpha[-1]) == 0.0 and float(got.log_snr[-1]) == -np.inf
  assert float(got.sigma[0]) == 0.0 and float(got.log_snr[0]) == np.inf
  assert float(got.alpha[0]) == pytest.approx(1.0, abs=1e-7)
  # alpha_bar at t = (i + 1) / T is the discrete schedule's cumulative product (eq. 17), where
  # its betas are not clipped at 0.999 (all but the last few).
  T = 1000
  betas = schedules.get_betas("cosine", T)
  keep = betas < 0.999
  ab = np.cumprod(1 - betas)[keep]
  got = cosine(jnp.asarray((np.arange(T)[keep] + 1) / T, jnp.float32))
  _close(got.alpha**2, ab, atol=2e-6)


def test_vp_from_gamma_and_the_fixed_linear_gamma():
  gammas = np.array([-np.inf, -13.3, -2.0, 0.0, 3.0, 5.0, np.inf])
  got = jax.jit(vp.vp_from_gamma)(jnp.asarray(gammas, jnp.float32))
  for i, g in enumerate(gammas):
    want_var = 0.0 if g == -np.inf else 1.0 if g == np.inf else ref.sigmoid(g)
    _close(got.sigma[i] ** 2, want_var, rtol=1e-6, atol=0 if g < -10 else 1e-7)
    _close(got.alpha[i] ** 2, 1 - want_var, rtol=1e-6, atol=1e-7)
  _close(got.log_snr, -gammas)
  g = jax.jit(vp.gamma_linear)(jnp.asarray([0.0, 0.5, 1.0]))
  _close(g, [-13.3, -4.15, 5.0], atol=2e-6)


# ----------------------------------------------------------------------------- VDM


def _cosine_gamma(t):
  return -vp.vp_cosine(t).log_snr


def test_vdm_continuous_loss_uses_the_derivative_of_gamma():
  eps, eps_hat = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
  t = jnp.asarray([0.05, 0.3, 0.6, 0.95], jnp.float32)
  g, dg = jax.jit(vdm.gamma_and_derivative, static_argnums=0)(_cosine_gamma, t)
  for i, ti in enumerate(np.asarray(t, np.float64)):
    fn = lambda u: -2 * math.log(ref.vp_cosine(u)[0] / ref.vp_cosine(u)[1])  # noqa: E731
    _close(g[i], fn(ti), rtol=1e-5)
    _close(dg[i], ref.derivative(fn, ti), rtol=2e-4)  # float32 jvp through sin/log
  loss = jax.jit(vdm.diffusion_loss)(jnp.asarray(eps), jnp.asarray(eps_hat), dg)
  chex.assert_shape(loss, (4,))
  want = 0.5 * np.asarray(dg, np.float64) * np.sum((eps - eps_hat) ** 2, axis=(1, 2, 3))
  _close(loss, want, rtol=1e-5)


def test_vdm_finite_T_loss_tends_to_the_continuous_loss():
  eps, eps_hat = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
  steps = (10, 100, 1000, 10_000)

  @jax.jit
  def losses(eps, eps_hat, t, inv_steps):
    _, dg = vdm.gamma_and_derivative(_cosine_gamma, t)
    g_t = _cosine_gamma(t)
    disc = jax.vmap(
      lambda h: vdm.diffusion_loss_discrete(eps, eps_hat, g_t, _cosine_gamma(t - h), 1.0 / h)
    )(inv_steps)
    return vdm.diffusion_loss(eps, eps_hat, dg), disc

  with jax.enable_x64(True):  # the gap gamma(t) - gamma(s) is 1e-3 at T = 1e4
    t = np.array([0.2, 0.4, 0.7, 0.9])
    cont, discs = losses(eps, eps_hat, t, 1.0 / np.array(steps, np.float64))
    cont, discs = np.asarray(cont), np.asarray(discs)
    errors = []
    for T, disc in zip(steps, discs, strict=True):
      mse = np.sum((eps - eps_hat) ** 2, axis=(1, 2, 3))
      gap = np.array([-2 * math.log(ref.vp_cosine(u)[0] / ref.vp_cosine(u)[1]) for u in t])
      gap_s = np.array(
        [-2 * math.log(ref.vp_cosine(u - 1 / T)[0] / ref.vp_cosine(u - 1 / T)[1]) for u in t]
      )
      np.testing.assert_allclose(disc, T / 2 * np.expm1(gap - gap_s) * mse, rtol=1e-9)
      errors.append(np.max(np.abs(disc / cont - 1)))
  # First order in 1/T: each 10x in T cuts the relative error ~10x; 1e-3 by T = 1e4.
  # (T = 10 is short of the asymptote: 1.8 against 0.08 at T = 100.)
  for coarse, fine in zip(errors[1:], errors[2:], strict=False):
    assert 5 < coarse / fine < 20, errors
  assert errors[-1] < 1e-3, errors
  _close(
    vdm.discretize_time(jnp.asarray([0.0, 0.001, 0.5, 0.5001, 1.0]), 10), [0, 0.1, 0.5, 0.6, 1]
  )


def test_vdm_prior_kl():
  x = RNG.uniform(-1, 1, SHAPE)
  prior_kl = jax.jit(vdm.prior_kl)
  for g1 in (5.0, 10.0, -1.0):
    got = prior_kl(jnp.asarray(x, jnp.float32), jnp.float32(g1))
    chex.assert_shape(got, (4,))
    want = [ref.vdm_prior_kl(x[i], g1) for i in range(4)]
    _close(got, want, rtol=1e-5, atol=1e-5)
  per_example = prior_kl(jnp.asarray(x, jnp.float32), jnp.asarray([5.0, 10.0, -1.0, 5.0]))
  _close(per_example[1], ref.vdm_prior_kl(x[1], 10.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("centered", [False, True])
def test_vdm_decoder_is_the_normalised_gaussian_of_z0(centered):
  V = 256
  k = RNG.integers(0, V, (2, 2, 2, 1))
  values = (2 * (np.arange(V) + 0.5) / V - 1) if centered else np.arange(V) / 127.5 - 1
  grid = jax.jit(vdm.pixel_values, static_argnums=0, static_argnames="centered")(
    V, centered=centered
  )
  _close(grid, values, rtol=0, atol=1e-6)
  if not centered:  # jaxdiff's own grid, bit for bit: the data's pixels are decoder levels
    np.testing.assert_array_equal(grid, images.from_uint8(np.arange(256, dtype=np.uint8)))
  x = values[k]
  indices = jax.jit(vdm.pixel_indices, static_argnums=1, static_argnames="centered")
  np.testing.assert_array_equal(indices(np.asarray(x, np.float32), V, centered=centered), k)
  decode = jax.jit(functools.partial(vdm.decoder_logprobs, centered=centered))
  nll_fn = jax.jit(functools.partial(vdm.reconstruction_nll, centered=centered))
  for g0 in (-13.3, -6.0, 0.0):
    a, s = math.sqrt(ref.sigmoid(-g0)), math.sqrt(ref.sigmoid(g0))
    z0 = a * x + s * RNG.standard_normal(x.shape)
    want = ref.vdm_decoder_logprobs(z0, g0, values)
    got = decode(jnp.asarray(z0, jnp.float32), jnp.float32(g0))
    chex.assert_shape(got, x.shape + (V,))
    # The winning levels to float32 accuracy; far levels have log-probabilities ~ -1e5 whose
    # absolute error is the float32 ulp of their size.
    _close(got, want, rtol=2e-5, atol=1e-3)
    total = np.logaddexp.reduce(np.asarray(got, np.float64), axis=-1)  # normalised over levels
    _close(total, np.zeros(x.shape), atol=1e-5)
    nll = nll_fn(jnp.asarray(x, jnp.float32), jnp.asarray(z0, jnp.float32), jnp.float32(g0))
    want_nll = -np.take_along_axis(want, k[..., None], axis=-1)[..., 0].sum(axis=(1, 2, 3))
    _close(nll, want_nll, rtol=1e-4, atol=1e-4)
  # Edge: z_0 with no noise and a tiny sigma_0 decodes to the right level with certainty.
  exact = nll_fn(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32), jnp.float32(-13.3))
  _close(exact, np.zeros(2), atol=1e-6)
  _close(vdm.nats_to_bpd(jnp.float32(3072 * math.log(2)), 3072), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- times


def test_low_discrepancy_times_put_one_t_in_each_stratum():
  keys = jax.random.split(jax.random.key(0), 200)
  t = np.asarray(jax.vmap(lambda k: times.low_discrepancy(k, 16))(keys))  # [200, 16]
  assert t.min() >= 0 and t.max() < 1
  np.testing.assert_array_equal(np.sort(np.floor(t * 16), axis=1), np.tile(np.arange(16), (200, 1)))
  # Each position is marginally U(0, 1): mean 1/2 within 4 standard errors (1/sqrt(12 * 200)).
  assert np.all(np.abs(t.mean(axis=0) - 0.5) < 4 / math.sqrt(12 * 200))
  u = np.asarray(times.uniform(jax.random.key(1), 4000))
  assert abs(u.mean() - 0.5) < 4 / math.sqrt(12 * 4000)


def test_logit_normal_times_shift_and_edm_sigmas():
  n = 20_000
  t = np.asarray(times.logit_normal(jax.random.key(0), n, m=0.5, s=0.8), np.float64)
  logit = np.log(t / (1 - t))
  assert abs(logit.mean() - 0.5) < 4 * 0.8 / math.sqrt(n)
  assert logit.std() == pytest.approx(0.8, rel=0.03)  # sd of the sd ~ 0.8 / sqrt(2n) = 0.5%
  ln_sigma = np.log(np.asarray(times.edm_sigma(jax.random.key(1), n), np.float64))
  assert abs(ln_sigma.mean() + 1.2) < 4 * 1.2 / math.sqrt(n)
  assert ln_sigma.std() == pytest.approx(1.2, rel=0.03)
  grid = np.linspace(0, 1, 11)
  for f in (1.0, 3.0, 0.5):
    got = np.asarray(times.shift(jnp.asarray(grid, jnp.float32), f), np.float64)
    _close(got, [f * u / (1 + (f - 1) * u) for u in grid], atol=1e-6)
    assert got[0] == 0.0 and got[-1] == pytest.approx(1.0, abs=1e-7)
    # The noise-to-signal ratio t / (1 - t) is scaled by f.
    _close(got[1:-1] / (1 - got[1:-1]), f * grid[1:-1] / (1 - grid[1:-1]), rtol=1e-5)


# ----------------------------------------------------------------------------- EDM


def test_edm_preconditioning_is_table_1_and_gives_unit_variances():
  sigmas = np.array([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
  c = jax.jit(edm.preconditioning)(jnp.asarray(sigmas, jnp.float32))
  for i, s in enumerate(sigmas):
    for got, want in zip(c, ref.edm_precond(s), strict=True):
      _close(got[i], want, rtol=2e-6, atol=0)
  sd = 0.5
  c = [np.asarray(a, np.float64) for a in c]
  c_skip, c_out, c_in, _ = c
  _close(c_in**2 * (sigmas**2 + sd**2), np.ones(6), rtol=1e-6)  # unit-variance input
  # F's effective target (y - c_skip (y + sigma n)) / c_out has variance
  # ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1 for Var[y] = sd^2 (App. B.6).
  _close(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigmas**2) / c_out**2, np.ones(6), rtol=1e-5)
  # lambda(sigma) = 1 / c_out^2: the effective loss has unit weight.
  weight = jax.jit(edm.loss_weight)(jnp.asarray(sigmas, jnp.float32))
  _close(weight * c_out**2, np.ones(6), rtol=1e-5)
  # The same by sampling: y ~ N(0, sd^2); Var of input and target within 3% (n = 20000: the sd
  # of a sample variance is sqrt(2 / n) = 1%).
  y, n = sd * RNG.standard_normal(20_000), RNG.standard_normal(20_000)
  for i in range(6):
    x = y + sigmas[i] * n
    assert np.var(c_in[i] * x) == pytest.approx(1.0, rel=0.03)
    assert np.var((y - c_skip[i] * x) / c_out[i]) == pytest.approx(1.0, rel=0.03)


def test_edm_denoiser_and_training_loss():
  def model_fn(x, c_noise):  # any network F(x_in, c_noise [B])
    return jnp.tanh(x) * c_noise[:, None, None, None]

  x, y, noise = (RNG.standard_normal(SHAPE) for _ in range(3))
  sigma = np.array([0.01, 0.5, 2.0, 50.0])
  denoise = jax.jit(edm.denoise, static_argnums=0)
  got = denoise(model_fn, jnp.asarray(x), jnp.asarray(sigma))
  for i, s in enumerate(sigma):
    c_skip, c_out, c_in, c_noise = ref.edm_precond(s)
    _close(got[i], c_skip * x[i] + c_out * np.tanh(c_in * x[i]) * c_noise, rtol=1e-5, atol=1e-5)
  scalar = denoise(model_fn, jnp.asarray(x), 2.0)  # one sigma for the batch
  _close(scalar[2], np.asarray(got[2]), rtol=1e-6, atol=1e-6)
  loss = jax.jit(edm.training_loss, static_argnums=0)(
    functools.partial(edm.denoise, model_fn), jnp.asarray(y), jnp.asarray(sigma), jnp.asarray(noise)
  )
  chex.assert_shape(loss, (4,))
  for i, s in enumerate(sigma):
    c_skip, c_out, c_in, c_noise = ref.edm_precond(s)
    xi = y[i] + s * noise[i]
    d = c_skip * xi + c_out * np.tanh(c_in * xi) * c_noise
    want = (s**2 + 0.25) / (s * 0.5) ** 2 * np.mean((d - y[i]) ** 2)
    _close(loss[i], want, rtol=1e-4)


def test_edm_sigma_grid():
  for n in (1, 2, 18, 40):
    got = jax.jit(edm.sigma_steps, static_argnums=0)(n)
    chex.assert_shape(got, (n + 1,))
    _close(got, ref.edm_sigmas(n), rtol=5e-6, atol=0)
    assert float(got[-1]) == 0.0 and np.all(np.diff(np.asarray(got)) < 0)
  got = np.asarray(ref.edm_sigmas(18))
  assert got[0] == pytest.approx(80.0, rel=1e-6) and got[-2] == pytest.approx(0.002, rel=1e-5)
  with pytest.raises(ValueError, match="num_steps must be >= 1"):
    edm.sigma_steps(0)


MU, S = 0.3, 0.5  # Gaussian data y ~ N(MU, S^2)


def _gaussian_denoiser(x, sigma):
  """E[y | y + sigma n = x], for y ~ N(MU, S^2)."""
  sigma = conversions.bcast(sigma, x.ndim)
  return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def test_edm_steps_match_algorithms_1_and_2():
  x = RNG.standard_normal((3, 2, 2, 1)) * 3.0
  den = lambda a, s: ref.gaussian_denoiser(a, s, MU, S)  # noqa: E731
  heun = jax.jit(edm.heun_step, static_argnums=3)
  options = ("num_steps", "s_churn", "s_tmin", "s_tmax", "s_noise")
  stochastic = jax.jit(edm.stochastic_step, static_argnums=3, static_argnames=options)
  for cur, nxt in ((80.0, 57.6), (1.0, 0.5), (0.002, 0.0)):
    got = heun(jnp.asarray(x), cur, nxt, _gaussian_denoiser)
    _close(got, ref.edm_step(x, cur, nxt, den), rtol=1e-5, atol=1e-5)

  # The last step (sigma_next = 0) is a plain Euler step, which lands on D(x; sigma), and never
  # evaluates D at sigma = 0.
  def no_zero(a, s):
    return jnp.where(s == 0, jnp.nan, 1.0) * _gaussian_denoiser(a, s)

  last = heun(jnp.asarray(x), 0.002, 0.0, no_zero)
  chex.assert_tree_all_finite(last)
  _close(last, ref.gaussian_denoiser(x, 0.002, MU, S), rtol=1e-5, atol=1e-6)
  # Alg. 2 with churn: the same z the step draws from its key.
  key = jax.random.key(3)
  z = np.asarray(jax.random.normal(key, x.shape), np.float64)
  opts = dict(num_steps=10, s_churn=2.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.007)
  # gamma = S_churn / N = 0.2 inside [S_tmin, S_tmax]; none above S_tmax or below S_tmin (Alg. 1).
  for cur, nxt, gamma in ((1.0, 0.5, 0.2), (80.0, 57.6, 0.0), (0.01, 0.0, 0.0)):
    got = stochastic(jnp.asarray(x), cur, nxt, _gaussian_denoiser, key, **opts)
    want = ref.edm_step(x, cur, nxt, den, gamma=gamma, z=z, s_noise=1.007)
    _close(got, want, rtol=1e-5, atol=1e-5, msg=f"{cur}->{nxt}")
  capped = stochastic(
    jnp.asarray(x), 1.0, 0.5, _gaussian_denoiser, key, num_steps=10, s_churn=100.0
  )
  want = ref.edm_step(x, 1.0, 0.5, den, gamma=math.sqrt(2) - 1, z=z)
  _close(capped, want, rtol=1e-5, atol=1e-5)


def _sample(step, x, grid):
  def body(x, i):
    return step(x, grid[i], grid[i + 1], jax.random.fold_in(jax.random.key(7), i)), None

  return jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))[0]


def test_edm_heun_sampler_transports_gaussian_data():
  """For y ~ N(MU, S^2) the probability-flow ODE maps x_sigma = MU + sqrt(S^2 + sigma^2) n to
  MU + S n: the solve can be checked sample by sample, not only in its moments."""
  n = jax.random.normal(jax.random.key(0), (4096, 1))
  grid = edm.sigma_steps(64)
  x_max = MU + jnp.sqrt(S**2 + grid[0] ** 2) * n  # exactly p_{sigma_max}, to isolate the solver
  heun = lambda x, a, b, key: edm.heun_step(x, a, b, _gaussian_denoiser, key)  # noqa: E731
  out = jax.jit(_sample, static_argnums=0)(heun, x_max, grid)
  # Second order: max error 0.03 at 32 steps, 0.008 at 64 (measured).
  _close(out, np.asarray(MU + S * n), atol=0.015)
  # Moments: the sample's own mean/std (n is fixed) up to the same error.
  assert float(out.mean()) == pytest.approx(float(MU + S * n.mean()), abs=2e-3)
  assert float(out.std()) == pytest.approx(S * float(n.std()), rel=0.01)
  # Alg. 2 with churn lands on the right law too (not the same samples): moments within 4
  # standard errors (S / sqrt(4096) = 0.008 for the mean, ~1.1% for the sd) plus 1%.
  stoch = lambda x, a, b, key: edm.stochastic_step(  # noqa: E731
    x, a, b, _gaussian_denoiser, key, num_steps=64, s_churn=20.0, s_tmin=0.05, s_tmax=50.0
  )
  out = jax.jit(_sample, static_argnums=0)(stoch, x_max, grid)
  assert abs(float(out.mean()) - MU) < 4 * S / 64 + 0.005
  assert float(out.std()) == pytest.approx(S, rel=0.06)


def test_vp_models_run_on_the_edm_grid():
  """sigma = sigma_t / alpha_t, x_sigma = x_t / alpha_t: the exact VP eps-model of Gaussian data,
  wrapped, is the exact EDM denoiser."""

  def eps_fn(x_t, sigma):  # E[eps | x_t] for y ~ N(MU, S^2) at the VP time of sigma
    m = vp.vp_linear(edm.vp_linear_time(sigma))
    a, s = m.alpha[:, None, None, None], m.sigma[:, None, None, None]
    return s * (x_t - a * MU) / (a**2 * S**2 + s**2)

  @jax.jit
  def mappings(x, sig):
    v = vp.vp_linear(edm.vp_linear_time(sig))
    return (
      v,
      edm.sigma_from_vp(v.alpha, v.sigma),
      edm.vp_from_sigma(sig),
      edm.denoise_from_vp_eps(eps_fn, x, sig),
    )

  sig = np.array([0.01, 0.3, 1.0, 5.0, 80.0], np.float32)
  x = (RNG.standard_normal((5, 2, 2, 1)) * sig[:, None, None, None] + MU).astype(np.float32)
  v, sig_back, (alpha, sigma_vp), got = mappings(x, sig)
  _close(sig_back, sig, rtol=2e-5)  # vp_linear_time inverts sigma(t) = sigma_t / alpha_t
  _close(alpha, np.asarray(v.alpha), rtol=2e-5)
  _close(sigma_vp, np.asarray(v.sigma), rtol=2e-5)
  want = ref.gaussian_denoiser(
    x.astype(np.float64), sig.astype(np.float64)[:, None, None, None], MU, S
  )
  _close(got, want, rtol=1e-4, atol=2e-4)


# ----------------------------------------------------------------------------- flow matching


def _flow_velocity(x, t):
  """E[eps - y | x_t = x] for y ~ N(MU, S^2), x_t = (1 - t) y + t eps."""
  t = conversions.bcast(t, x.ndim)
  cov = t - (1 - t) * S**2  # Cov(eps - y, x_t)
  return -MU + cov / ((1 - t) ** 2 * S**2 + t**2) * (x - (1 - t) * MU)


def test_flow_path_target_and_conversions():
  x0, eps = RNG.standard_normal(SHAPE), RNG.standard_normal(SHAPE)
  t = np.array([0.0, 0.25, 0.6, 1.0])
  tb = t[:, None, None, None]
  inner = slice(1, 3)  # t = 0 and t = 1 make the general conversions divide by 0

  @jax.jit
  def flow_maths(x0, eps, t):
    x_t = flow.interpolate(x0, eps, t)
    v = flow.velocity_target(x0, eps)
    # The same process in the general conversions (alpha = 1 - t, sigma = t).
    general = conversions.convert(
      flow.x0_from_velocity(x_t, v, t)[inner], "x0", "eps", x_t[inner], 1 - t[inner], t[inner]
    )
    return x_t, v, flow.x0_from_velocity(x_t, v, t), flow.eps_from_velocity(x_t, v, t), general

  x_t, v, x0_back, eps_back, general = flow_maths(x0, eps, t)
  _close(x_t, (1 - tb) * x0 + tb * eps)
  _close(v, eps - x0)
  _close(x0_back, x0)
  _close(eps_back, eps)
  _close(general, eps[inner])


@pytest.mark.parametrize(("step", "atol"), [(flow.euler_step, 0.04), (flow.heun_step, 5e-4)])
def test_flow_ode_transports_noise_to_the_data_gaussian(step, atol):
  """The exact velocity field of N(MU, S^2) data maps n ~ N(0, 1) at t = 1 to MU + S n at t = 0.
  100 steps: Euler's first-order error is 0.029 at most (measured), Heun's 1e-4."""
  n = jax.random.normal(jax.random.key(0), (4096, 1))
  grid = jnp.linspace(1.0, 0.0, 101)
  fn = lambda x, a, b, key: step(x, a, b, _flow_velocity, key)  # noqa: E731
  out = jax.jit(_sample, static_argnums=0)(fn, n, grid)
  _close(out, np.asarray(MU + S * n), atol=atol)
  assert float(out.mean()) == pytest.approx(MU, abs=4 * S / 64 + atol)
  assert float(out.std()) == pytest.approx(S, rel=0.05)


# ----------------------------------------------------------------------------- zero terminal SNR


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr(name):
  betas = schedules.get_betas(name, 1000)
  got = zero_snr.rescale_zero_terminal_snr(betas)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, ref.zero_terminal_snr(betas), rtol=1e-10, atol=1e-15)
  ab = np.cumprod(1 - got)
  assert ab[-1] == 0.0 and got[-1] == 1.0  # exactly
  assert ab[0] == pytest.approx(np.cumprod(1 - betas)[0], rel=1e-12)
  assert np.all(np.diff(ab) < 0) and np.all((got > 0) & (got <= 1))
  with pytest.raises(ValueError, match="T >= 2"):
    zero_snr.rescale_zero_terminal_snr(betas[:1])


def test_trailing_timesteps():
  assert zero_snr.trailing_timesteps(1000, 10)[::-1] == list(range(999, 0, -100))
  for T, S in ((1000, 10), (1000, 3), (1000, 7), (10, 4), (50, 50), (1000, 1)):
    got = zero_snr.trailing_timesteps(T, S)
    assert got == ref.trailing(T, S), (T, S)
    assert len(set(got)) == S and got[-1] == T - 1 and got[0] >= 0
  with pytest.raises(ValueError, match="must be in 1..1000"):
    zero_snr.trailing_timesteps(1000, 0)


# ----------------------------------------------------------------------------- ODE likelihood


def test_divergences_of_a_linear_field():
  A = jnp.asarray(RNG.standard_normal((3, 3)), jnp.float32)  # f(x) = x A^T per example
  fn = lambda x: x @ A.T  # noqa: E731
  x = jnp.asarray(RNG.standard_normal((2, 3)), jnp.float32)

  @jax.jit
  def divergences(x):
    probes = ode.rademacher(jax.random.key(0), (4000, 3))
    tiled = jnp.tile(x[:1], (4000, 1))
    return ode.exact_divergence(fn, x), ode.hutchinson_divergence(fn, tiled, probes)

  (f, div), (_, est) = divergences(x)
  _close(f, np.asarray(x) @ np.asarray(A).T)
  _close(div, np.full(2, float(np.trace(np.asarray(A)))), atol=1e-5)
  # Hutchinson: unbiased; its variance 2 sum_{i != j} A_ij^2 (symmetrised) is known, so the
  # mean of 4000 probes must be within 4 standard errors.
  sym = 0.5 * (np.asarray(A) + np.asarray(A).T)
  sd = math.sqrt(2 * (np.sum(sym**2) - np.sum(np.diag(sym) ** 2)))
  assert abs(float(est.mean()) - float(np.trace(np.asarray(A)))) < 4 * sd / math.sqrt(4000)


COV = np.array([[0.5, 0.3], [0.3, 0.4]])  # correlated, so the divergence is not a diagonal sum
MEAN = np.array([0.3, -0.5])


def _marginal(t):
  """The marginal at t, N(alpha mu, alpha^2 Sigma + sigma^2 I), as (mean, inverse covariance,
  log det covariance); the 2x2 inverse written out (cheaper to compile than linalg.solve)."""
  m = vp.vp_linear(t)
  cov = m.alpha**2 * jnp.asarray(COV) + m.sigma**2 * jnp.eye(2)
  det = cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[1, 0]
  inv = jnp.array([[cov[1, 1], -cov[0, 1]], [-cov[1, 0], cov[0, 0]]]) / det
  return m.alpha * jnp.asarray(MEAN), inv, jnp.log(det)


def _terminal_logp(z):  # log p_1(z), the exact prior of the Gaussian data at t = 1
  mean, inv, logdet = _marginal(jnp.asarray(1.0, z.dtype))
  diff = z - mean
  return -0.5 * jnp.sum(diff * (diff @ inv), -1) - 0.5 * logdet - math.log(2 * math.pi)


def _drift(x, t):  # x: [B, 2], t: [B] (all equal)
  mean, inv, _ = _marginal(t[0])
  return ode.vp_drift(x, -(x - mean) @ inv, vp.beta_linear(t))  # inv is symmetric


def _exact_logp(x, t):
  """float64 NumPy: log N(x; alpha mu, alpha^2 Sigma + sigma^2 I), Song et al. 2021, App. B."""
  alpha, sigma, _ = ref.vp_linear(t)
  return ref.gaussian_logpdf(
    np.asarray(x, np.float64), alpha * MEAN, alpha**2 * COV + sigma**2 * np.eye(2)
  )


_solve = jax.jit(
  ode.ode_log_likelihood,
  static_argnums=0,
  static_argnames=("num_steps", "t0", "method", "divergence", "prior_logp"),
)


def test_ode_likelihood_of_gaussian_data_is_exact():
  """log p_t0(x) of 2-D correlated Gaussian data under the linear VP SDE: the marginal at t is
  N(alpha mu, alpha^2 Sigma + sigma^2 I), so the score and the log-likelihood are closed forms."""
  with jax.enable_x64(True):
    x = jnp.asarray(RNG.multivariate_normal(MEAN, COV, 6))
    t0 = 1e-3
    exact = _exact_logp(x, t0)
    # Measured: RK4 (4th order) 1.3e-6 at 50 steps; Heun (2nd order) 9e-4 at 200 steps, most
    # of it from the fast dynamics near t = 1 (beta = 20).
    for method, steps, tol in (("heun", 200, 2e-3), ("rk4", 50, 5e-6)):
      options = dict(num_steps=steps, t0=t0, method=method, divergence="exact")
      got = _solve(_drift, x, **options, prior_logp=_terminal_logp)
      _close(got["log_p"], np.asarray(exact), rtol=0, atol=tol, msg=method)
      _close(got["log_p"], np.asarray(got["prior_logp"] + got["delta_logp"]), atol=1e-12)
      chex.assert_shape(got["z"], x.shape)
    # With the N(0, I) prior (the default) the error is the prior mismatch at t = 1
    # (alpha_1 = 0.0066): |log N(z; alpha_1 mu, ...) - log N(z; 0, I)| < 0.02 nats here.
    with_std_prior = ode.std_normal_logp(got["z"]) + got["delta_logp"]
    _close(with_std_prior, np.asarray(exact), rtol=0, atol=0.02)


def test_ode_likelihood_with_hutchinson_is_unbiased():
  with jax.enable_x64(True):
    x = jnp.asarray(RNG.multivariate_normal(MEAN, COV, 2))
    exact = _exact_logp(x, 1e-3)
    reps = 1024  # each row its own probe: 1024 independent estimates per point
    rows = jnp.repeat(x, reps, axis=0)
    # RK4 (4th order): error 1.3e-6 at 50 steps with the exact trace (measured), far below
    # the standard errors (0.8 / sqrt(1024) = 0.025).
    got = _solve(_drift, rows, jax.random.key(0), num_steps=50, t0=1e-3, prior_logp=_terminal_logp)
    est = np.asarray(got["log_p"]).reshape(2, reps)
  se = est.std(axis=1, ddof=1) / math.sqrt(reps)
  assert np.all(est.std(axis=1) > 0)  # the probe matters: a non-diagonal Jacobian
  assert np.all(np.abs(est.mean(axis=1) - exact) < 4 * se + 1e-6), (est.mean(axis=1), exact, se)
  with pytest.raises(ValueError, match="needs a key"):
    ode.ode_log_likelihood(_drift, x)
  with pytest.raises(ValueError, match="unknown method"):
    ode.ode_log_likelihood(_drift, x, jax.random.key(0), method="euler")


# ----------------------------------------------------------------------------- learned gamma


def _numpy_gamma(params, t):
  """The schedule from its parameters, in float64: VDM's NoiseSchedule_NNet, rescaled."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def g(u):
    u = u[:, None]
    h = u * abs(p["l1"]["kernel"][0, 0])
    z = (2 * u - 1) @ np.abs(p["l2"]["kernel"]) + p["l2"]["bias"]
    return (h + (2 / (1 + np.exp(-z)) - 1) @ np.abs(p["l3"]["kernel"]) / z.shape[1])[:, 0]

  g0, g1 = g(np.array([0.0]))[0], g(np.array([1.0]))[0]
  return p["gamma_0"] + (p["gamma_1"] - p["gamma_0"]) * (g(t) - g0) / (g1 - g0)


@pytest.fixture(scope="module")
def learned():
  return LearnedGamma(rngs=nnx.Rngs(0))


def test_learned_gamma_endpoints_monotone_and_matches_reference(learned):
  graphdef, state = nnx.split(learned)

  @jax.jit
  def evaluate(state, grid):
    model = nnx.merge(graphdef, state)
    g, dg = vdm.gamma_and_derivative(model, grid)
    return g, dg, model(jnp.float32(0.3))

  grid = np.linspace(0.0, 1.0, 513, dtype=np.float32)
  got, dg, scalar = evaluate(state, grid)
  chex.assert_shape(got, (513,))
  assert scalar.shape == ()  # any shape in, the same shape out
  assert float(got[0]) == float(np.float32(-13.3))  # exactly: frac(0) = 0
  assert float(got[-1]) == pytest.approx(5.0, abs=1e-5)
  assert np.all(np.diff(np.asarray(got)) > 0) and np.all(np.asarray(dg) > 0)
  params = nnx.to_pure_dict(state)
  _close(got, _numpy_gamma(params, grid.astype(np.float64)), rtol=1e-5, atol=2e-5)
  # Any parameters (signs of the kernels included) keep it increasing between the endpoints.
  noisy = jax.tree.map(lambda a: 3.0 * RNG.standard_normal(a.shape).astype(np.float32), params)
  noisy["gamma_0"], noisy["gamma_1"] = np.float32(-10.0), np.float32(8.0)
  nnx.replace_by_pure_dict(state, noisy)
  g, dg, _ = evaluate(state, grid)
  assert np.all(np.diff(np.asarray(g)) > 0) and np.all(np.asarray(dg) > 0)
  assert float(g[0]) == pytest.approx(-10.0, abs=1e-6) and float(g[-1]) == pytest.approx(
    8.0, abs=1e-5
  )
  _close(g, _numpy_gamma(noisy, grid.astype(np.float64)), rtol=1e-4, atol=1e-4)


def test_learned_gamma_trains_through_the_vdm_loss(learned):
  """gamma'(t) by jvp inside the loss; grad reaches every schedule parameter."""
  graphdef, params = nnx.split(learned)
  eps, eps_hat = jnp.asarray(RNG.standard_normal(SHAPE)), jnp.asarray(RNG.standard_normal(SHAPE))
  x = jnp.asarray(RNG.uniform(-1, 1, SHAPE), jnp.float32)
  t = times.low_discrepancy(jax.random.key(0), 4)

  def loss(params):
    gamma_fn = nnx.merge(graphdef, params)
    _, dg = vdm.gamma_and_derivative(gamma_fn, t)
    g1 = gamma_fn(jnp.float32(1.0))
    return jnp.mean(vdm.diffusion_loss(eps, eps_hat, dg) + vdm.prior_kl(x, g1))

  grads = jax.jit(jax.grad(loss))(params)
  chex.assert_tree_all_finite(grads)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
