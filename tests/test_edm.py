"""The edm process (Karras et al. 2022) end to end, and the sigma samplers (``euler``, ``heun``,
``edm_stochastic``) on EDM's grid and on the ddpm chain through sigma(t).

Gaussian data y ~ N(MU, SD^2) has the exact denoiser ``D(x; sigma) = (SD^2 x + sigma^2 MU) /
(SD^2 + sigma^2)``, and the probability-flow ODE keeps ``z = (x_sigma - MU) / sqrt(SD^2 +
sigma^2)``: the deterministic samplers are checked sample by sample against ``MU + SD z(x at
sigma_max)``, the stochastic one by its moments. Float32 against float64 references: tolerances
stated at each check.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling as S
from jaxdiff.core import diffusion as D
from jaxdiff.core import process as P
from jaxdiff.core import schedules
from jaxdiff.core.continuous import times
from jaxdiff.training import validation
from tests import reference_continuous as refc
from tests.conftest import tiny_config
from tests.test_sampling import _gaussian_model
from tests.tiny_steps import train_step_and_sample

MU, SD = 0.3, 0.5
EDM = P.EDM()
X_T = jnp.linspace(-3.0, 3.0, 64).reshape(16, 2, 2, 1)  # |z| up to 3


def _sigma_of_time(s, p=EDM):
  """Inverts :meth:`EDM.network_time`: the sigma an EDM backbone is shown time ``s`` for."""
  span = np.log(p.sigma_max / p.sigma_min)
  return jnp.exp(s / P.TIME_SCALE * span + np.log(p.sigma_min))


def _edm_gaussian(mu=MU):
  """The exact EDM backbone F for y ~ N(mu, SD^2): the F whose preconditioned D is exact."""

  def model_fn(x_in, s):
    sigma = _sigma_of_time(s).reshape(-1, 1, 1, 1)
    total = sigma**2 + EDM.sigma_data**2
    x = x_in * jnp.sqrt(total)  # x_in = c_in x
    c_skip, c_out = EDM.sigma_data**2 / total, sigma * EDM.sigma_data / jnp.sqrt(total)
    d = (SD**2 * x + sigma**2 * mu) / (SD**2 + sigma**2)
    return (d - c_skip * x) / c_out

  return model_fn


EDM_GAUSSIAN = _edm_gaussian()  # defined once: sample() caches its compiled sampler by identity


def _transport(x_start, sigma_max):
  """Where the exact ODE takes x at sigma_max to at sigma = 0 (float64)."""
  z = (np.asarray(x_start, np.float64) - MU) / np.sqrt(SD**2 + sigma_max**2)
  return MU + SD * z


# ----------------------------------------------------------------------------- training


def test_edm_loss_matches_float64():
  """The process loss (preconditioned backbone shown the mapped time, lambda-weighted, mean over
  dims) against the float64 reference; rtol 1e-4 (float32 through a tanh network)."""
  p = P.EDM(sigma_data=0.4, sigma_min=0.01, sigma_max=50.0)
  rng = np.random.default_rng(0)
  y, noise = rng.uniform(-1, 1, (5, 4, 4, 1)), rng.standard_normal((5, 4, 4, 1))
  sigma = np.array([0.003, 0.2, 1.0, 7.0, 60.0])

  def net(x, s):  # any backbone F(x, time): nonlinear in both
    return np.tanh(2 * x) * (1 + s / 1000.0) + 0.1 * np.cos(s / 300.0)

  def model_fn(x, s):
    return (
      jnp.tanh(2 * x) * (1 + s / 1000.0)[:, None, None, None]
      + 0.1 * jnp.cos(s / 300.0)[:, None, None, None]
    )

  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  terms = jax.jit(lambda *a: P.training_losses(p, model_fn, *a))(f32(y), f32(sigma), f32(noise))
  want = refc.edm_process_loss(net, y, sigma, noise, 0.4, 0.01, 50.0)
  chex.assert_shape(terms["loss"], (5,))
  np.testing.assert_allclose(terms["loss"], want, rtol=1e-4)
  np.testing.assert_array_equal(terms["simple"], terms["loss"])
  np.testing.assert_array_equal(terms["t"], f32(sigma))


def test_edm_draw_is_log_normal_sigma_with_unit_weights():
  p = P.EDM(p_mean=-0.5, p_std=0.8)
  x0 = jnp.zeros((4096, 1, 1, 1))
  draw = P.draw(p, jax.random.key(0), jax.random.key(1), x0)
  want = times.edm_sigma(jax.random.key(0), 4096, p_mean=-0.5, p_std=0.8)
  np.testing.assert_array_equal(draw.t, want)
  np.testing.assert_array_equal(draw.weights, np.ones(4096))
  ln = np.log(np.asarray(draw.t, np.float64))
  assert abs(ln.mean() + 0.5) < 4 * 0.8 / 64 and ln.std() == pytest.approx(0.8, rel=0.05)
  chex.assert_shape(draw.noise, x0.shape)


def test_the_sigma_grid_and_the_time_shown_to_the_backbone():
  g = P.EDM(sigma_min=0.01, sigma_max=20.0, rho=5.0).grid(12)
  assert P.name(g) == "edm" and g.num_timesteps == 12
  want = refc.edm_sigmas(12, 0.01, 20.0, 5.0)[::-1]  # rising, 0 first
  np.testing.assert_allclose(g.sigmas, want, rtol=5e-6, atol=0)
  assert P.discretize(g, None, None) is g and P.discretize(P.EDM(), 7, None).num_timesteps == 7
  shown = P.model_time(g, g.sigmas[1:])
  want = [refc.edm_network_time(s, 0.01, 20.0) for s in want[1:]]
  np.testing.assert_allclose(shown, want, rtol=1e-5, atol=2e-3)  # 0 at sigma_min, 1000 at max
  with pytest.raises(ValueError, match=r"^num_steps=None: the edm process needs a number"):
    P.discretize(P.EDM(), None, None)


# ----------------------------------------------------------------------------- EDM sampling


@pytest.mark.parametrize(
  "sampler, num_steps, tol",
  # Max distance to the exact transport (measured): Heun 0.024 at 32 steps, 0.0055 at 64 (second
  # order); Euler 0.066 at 64, 0.021 at 200 (first order).
  [("heun", 64, 0.01), ("euler", 64, 0.08)],
)
def test_sigma_samplers_transport_gaussian_data(sampler, num_steps, tol):
  x = S.sample(
    EDM, EDM_GAUSSIAN, jax.random.key(0), X_T.shape, sampler=sampler, num_steps=num_steps,
    x_T=X_T, clip_denoised=False,
  )  # fmt: skip
  np.testing.assert_allclose(x, _transport(EDM.sigma_max * X_T, EDM.sigma_max), atol=tol)


def test_heun_reaches_the_data_mean_and_variance():
  """2048 x 4 values from x_T ~ N(0, I): mean and std of N(MU, SD^2) within 4 standard errors
  (SE 0.0028 for the mean, 0.002 for the std) plus the solver's bias (< 0.003 at 64 steps: the
  transport's error above; at 24 steps the std is 4% high)."""
  x = S.sample(EDM, EDM_GAUSSIAN, jax.random.key(3), (2048, 2, 2, 1), sampler="heun",
               num_steps=64, clip_denoised=False)  # fmt: skip
  assert abs(float(x.mean()) - MU) < 4 * SD / np.sqrt(x.size) + 0.003
  assert abs(float(x.std()) - SD) < 4 * SD / np.sqrt(2 * x.size) + 0.003


def test_stochastic_sampler_is_heun_without_churn_and_deterministic_by_seed():
  kw = dict(num_steps=12, x_T=X_T, clip_denoised=False)
  heun = S.sample(EDM, EDM_GAUSSIAN, jax.random.key(0), X_T.shape, sampler="heun", **kw)
  calm = S.sample(EDM, EDM_GAUSSIAN, jax.random.key(5), X_T.shape, sampler="edm_stochastic", **kw)
  np.testing.assert_allclose(calm, heun, rtol=0, atol=1e-6)
  churn = dict(s_churn=10.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  a, b, c = (
    S.sample(
      EDM, EDM_GAUSSIAN, jax.random.key(k), X_T.shape, sampler="edm_stochastic", **kw, **churn
    )  # fmt: skip
    for k in (1, 1, 2)
  )
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, heun)
  # s_tmax = 0 is no upper bound: churn at sigma_max too, so not the windowed result.
  d = S.sample(EDM, EDM_GAUSSIAN, jax.random.key(1), X_T.shape, sampler="edm_stochastic",
               **kw, **{**churn, "s_tmax": 0.0})  # fmt: skip
  assert not np.allclose(a, d)
  # temperature scales the added noise as s_noise does; at 0 the key no longer matters.
  cold = [
    S.sample(
      EDM,
      EDM_GAUSSIAN,
      jax.random.key(k),
      X_T.shape,
      sampler="edm_stochastic",
      **kw,
      **churn,
      temperature=0.0,
    )  # fmt: skip
    for k in (1, 2)
  ]
  np.testing.assert_array_equal(*cold)
  assert not np.allclose(cold[0], a) and not np.allclose(cold[0], heun)
  half = dict(churn, s_noise=churn["s_noise"] / 2)
  np.testing.assert_allclose(
    S.sample(EDM, EDM_GAUSSIAN, jax.random.key(1), X_T.shape, sampler="edm_stochastic", **kw,
             **churn, temperature=0.5),
    S.sample(EDM, EDM_GAUSSIAN, jax.random.key(1), X_T.shape, sampler="edm_stochastic", **kw,
             **half),
    rtol=0, atol=1e-6,
  )  # fmt: skip


def test_stochastic_sampler_reaches_the_data_distribution():
  """Alg. 2 with churn (test_processes' settings, 64 steps): 4096 values; the mean within 4
  standard errors (0.008) plus 0.005, the std within 6% (churn with few steps widens it: 9% at 24
  steps)."""
  churn = dict(s_churn=20.0, s_tmin=0.05, s_tmax=50.0)
  x = S.sample(EDM, EDM_GAUSSIAN, jax.random.key(4), (1024, 2, 2, 1), sampler="edm_stochastic",
               num_steps=64, clip_denoised=False, **churn)  # fmt: skip
  assert abs(float(x.mean()) - MU) < 4 * SD / np.sqrt(x.size) + 0.005
  assert float(x.std()) == pytest.approx(SD, rel=0.06)


def test_guidance_is_applied_to_the_backbone():
  """Class y has data mean mu_y[y], the null label the mixture's; Heun with the guided labels
  equals Heun on F_uncond + g (F_cond - F_uncond) written out (D is affine in F)."""
  mu_y = jnp.array([-0.5, 0.5, 0.0])
  per_mean = {float(m): _edm_gaussian(m) for m in np.asarray(mu_y)}

  def model_fn(x, s, y):
    outs = jnp.stack([per_mean[float(m)](x, s) for m in np.asarray(mu_y)])  # [3, B, ...]
    return jnp.take_along_axis(outs, y[None, :, None, None, None], axis=0)[0]

  labels = jnp.arange(16) % 2

  def guided(x, s):
    cond = model_fn(x, s, labels)
    uncond = model_fn(x, s, jnp.full_like(labels, 2))
    return uncond + 3.0 * (cond - uncond)

  kw = dict(sampler="heun", num_steps=8, x_T=X_T, clip_denoised=False)
  got = S.sample(EDM, model_fn, jax.random.key(0), X_T.shape, labels=labels,
                 guidance_scale=3.0, null_label=2, **kw)  # fmt: skip
  want = S.sample(EDM, guided, jax.random.key(0), X_T.shape, **kw)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_sigma_sampler_compiles_once_for_any_grid_and_parameters():
  chex.clear_trace_counter()
  apply = lambda p, x, s: p["w"] * x + p["b"] * s.reshape(-1, 1, 1, 1)  # noqa: E731
  fn = jax.jit(chex.assert_max_traces(S.make_sampler("heun"), n=1))
  grids = [P.EDM().grid(4), P.EDM().grid(4).replace(sigmas=P.EDM().grid(4).sigmas * 0.5)]
  outs = [
    fn(g, jax.tree_util.Partial(apply, {"w": w, "b": 1e-4}), jax.random.key(0), X_T)
    for g, w in zip(grids, (0.1, 0.2), strict=True)
  ]
  chex.assert_tree_all_finite(outs)
  assert float(jnp.max(jnp.abs(outs[0]))) <= 1.0  # the final sample is clipped by default


# ----------------------------------------------------------------------------- ddpm via sigma(t)

T = 1000
AB = np.cumprod(1 - schedules.get_betas("linear", T))
LOG_SIGMA = 0.5 * np.log((1 - AB) / AB)


def _vp_gaussian(mean_type):
  """test_sampling's exact ddpm model, at fractional steps: ``ln sigma`` linear between levels
  (the map the ddpm sigma grid documents), alpha_bar from it."""
  steps, log_sigma = jnp.arange(T, dtype=jnp.float32), jnp.asarray(LOG_SIGMA, jnp.float32)

  def model_fn(x, t):
    ab = jax.nn.sigmoid(-2.0 * jnp.interp(t, steps, log_sigma))  # 1 / (1 + sigma^2)
    return _gaussian_model(mean_type, alpha_bar=ab)(x, jnp.arange(x.shape[0]))

  return model_fn


VP_GAUSSIAN = {m: _vp_gaussian(m) for m in D.MEAN_TYPES}


def test_the_ddpm_sigma_grid_shows_the_model_its_own_steps():
  d = D.make_diffusion(schedules.get_betas("linear", T))
  g = S.driver._discretize(d, "heun", 10, None)
  assert isinstance(g, P.VPSigmaGrid) and P.name(g) == "ddpm" and g.num_timesteps == 10
  sigma = np.exp(LOG_SIGMA)
  np.testing.assert_allclose(g.sigmas, refc.edm_sigmas(10, sigma[0], sigma[-1])[::-1], rtol=2e-5)
  levels = jnp.asarray(sigma[[0, 1, 7, 500, 998, 999]], jnp.float32)
  np.testing.assert_allclose(P.model_time(g, levels), [0, 1, 7, 500, 998, 999], atol=2e-3)
  # A respaced chain's levels show their original steps; between them, linear in ln sigma.
  r = D.respace(d, [0, 10, 999])
  gr = P.vp_sigma_grid(r, 4)
  mid = jnp.exp(jnp.asarray([0.25 * LOG_SIGMA[0] + 0.75 * LOG_SIGMA[10]], jnp.float32))
  np.testing.assert_allclose(P.model_time(gr, mid), [7.5], atol=2e-3)
  # A learned-variance model's variance channels are dropped.
  gl = P.vp_sigma_grid(D.make_diffusion(schedules.get_betas("linear", T), var_type="learned"), 4)
  both = lambda x, t: jnp.concatenate([VP_GAUSSIAN["eps"](x, t), 7 + x], -1)  # noqa: E731
  sig = jnp.asarray([0.1, 1.0, 10.0, 100.0])
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2, 2, 1)), jnp.float32)
  np.testing.assert_allclose(
    P.denoise(gl, both, x, sig), P.denoise(g, VP_GAUSSIAN["eps"], x, sig), rtol=1e-6
  )
  with pytest.raises(ValueError, match=r"^spacing='trailing' is the ddpm chain's; sampler 'heun'"):
    S.sample(d, VP_GAUSSIAN["eps"], jax.random.key(0), X_T.shape, sampler="heun", num_steps=4,
             spacing="trailing")  # fmt: skip
  with pytest.raises(ValueError, match=r"sampler 'heun' steps on a sigma grid"):
    S.sampler_timesteps(d, 4, sampler="heun")


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
def test_heun_on_the_ddpm_chain_through_sigma(mean_type):
  """x_T is the VP state at the last level; seen at sigma_max it is sqrt(1 + sigma_max^2) x_T,
  and the exact model's ODE takes it to MU + SD z (Heun, max error 0.026 at 32 steps, 0.0059 at
  64 for each mean type, measured)."""
  d = D.make_diffusion(schedules.get_betas("linear", T), mean_type=mean_type)
  x = S.sample(d, VP_GAUSSIAN[mean_type], jax.random.key(0), X_T.shape, sampler="heun",
               num_steps=64, x_T=X_T, clip_denoised=False)  # fmt: skip
  sigma_max = float(np.exp(LOG_SIGMA[-1]))
  want = _transport(np.sqrt(1 + sigma_max**2) * np.asarray(X_T, np.float64), sigma_max)
  np.testing.assert_allclose(x, want, atol=0.01)


def test_stochastic_sampler_on_the_ddpm_chain():
  d = D.make_diffusion(schedules.get_betas("linear", T), mean_type="eps")
  x = S.sample(d, VP_GAUSSIAN["eps"], jax.random.key(1), (1024, 2, 2, 1),
               sampler="edm_stochastic", num_steps=64, clip_denoised=False, s_churn=20.0,
               s_tmin=0.05, s_tmax=50.0)  # fmt: skip
  assert abs(float(x.mean()) - MU) < 4 * SD / np.sqrt(x.size) + 0.005
  assert float(x.std()) == pytest.approx(SD, rel=0.06)


# ----------------------------------------------------------------------------- config


def _edm_config(image_dir, **overrides):
  edm = dict(diffusion__process="edm", diffusion__t_sampler="log_normal",
             sampling__sampler="heun", sampling__num_steps=3)  # fmt: skip
  return tiny_config(image_dir, **{**edm, **overrides})


def test_an_edm_config_builds_its_process(image_dir):
  config = _edm_config(image_dir, diffusion__sigma_data=0.4, diffusion__rho=5.0,
                       sampling__num_steps=50)  # fmt: skip
  assert validation.problems(config, num_devices=8) == []  # 50 steps > T: T is ddpm's
  assert P.from_config(config.diffusion) == P.EDM(0.4, -1.2, 1.2, 0.002, 80.0, 5.0)
  config.sampling.sampler = "edm_stochastic"
  config.sampling.s_churn, config.sampling.s_tmax = 5.0, 0.0
  kwargs = S.sampler_kwargs(config)
  assert (kwargs["sampler"], kwargs["s_churn"], kwargs["s_tmax"]) == ("edm_stochastic", 5.0, 0.0)
  assert "s_churn" not in S.sampler_kwargs(config, sampler="heun")
  with pytest.raises(ValueError, match=r"sampler 'ddim' does not sample the edm process; its"
                     r" samplers: dpm\+\+2m, euler, heun, edm_stochastic"):  # fmt: skip
    S.sampler_kwargs(config, sampler="ddim")


def test_every_bad_edm_field_is_one_line_at_once(image_dir):
  config = _edm_config(
    image_dir, diffusion__t_sampler="uniform", diffusion__sigma_data=0.0, diffusion__p_std=-1.0,
    diffusion__sigma_min=0.5, diffusion__sigma_max=0.1, diffusion__rho=0.0,
    diffusion__loss_type="l1", diffusion__var_type="learned", diffusion__min_snr_gamma=5.0,
    diffusion__zero_terminal_snr=True, sampling__sampler="ddim", sampling__spacing="ddim",
    sampling__s_churn=-1.0, sampling__s_noise=0.0,
  )  # fmt: skip
  edm = "for process 'edm'"
  assert validation.problems(config, num_devices=8) == [
    f"diffusion.t_sampler='uniform': must be '' or one of log_normal {edm} (ln sigma ~ N(p_mean,"
    " p_std^2))",
    "diffusion.sigma_data=0.0: must be a number > 0 (the data's standard deviation; 0.5 for"
    " [-1, 1])",
    "diffusion.p_std=-1.0: must be a number > 0",
    "diffusion.sigma_max=0.1: must be a number > diffusion.sigma_min (0.5)",
    "diffusion.rho=0.0: must be a number > 0 (EDM: 7)",
    f"diffusion.loss_type='l1': must be mse {edm} (the lambda(sigma)-weighted L2)",
    f"diffusion.var_type='learned': must be fixed_small or fixed_large {edm} (no variance output)",
    f"diffusion.min_snr_gamma=5.0: must be 0 {edm} (a ddpm weighting)",
    f"diffusion.zero_terminal_snr=True: must be False {edm} (a ddpm rescaling)",
    "sampling.sampler='ddim': allowed for diffusion.process='edm': dpm++2m, euler, heun,"
    " edm_stochastic",
    "sampling.spacing='ddim': '' for diffusion.process='edm' (its own grid)",
    "sampling.s_churn=-1.0: a number >= 0",
    "sampling.s_noise=0.0: a number > 0",
  ]


def test_the_churn_window_and_the_ddpm_sigma_samplers_are_checked(image_dir):
  config = tiny_config(image_dir, sampling__sampler="heun", sampling__num_steps=500,
                       sampling__s_tmin=2.0, sampling__s_tmax=1.0)  # fmt: skip
  assert validation.problems(config, num_devices=8) == [
    "sampling.s_tmax=1.0: must be >= sampling.s_tmin (2.0), or 0 for no upper bound"
  ]  # 500 steps > T = 20 is fine on the chain's sigma grid
  config.sampling.s_tmax, config.sampling.spacing = 0.0, "trailing"
  assert validation.problems(config, num_devices=8) == [
    "sampling.spacing='trailing': '' for sampler 'heun' (it steps on the chain's sigma grid)"
  ]
  with pytest.raises(ValueError, match=re.escape("need s_churn >= 0")):
    S.stochastic_sampler(s_churn=-1.0)
  with pytest.raises(ValueError, match=r"^s_tmax=1.0 is below s_tmin=2.0"):
    S.stochastic_sampler(s_tmin=2.0, s_tmax=1.0)


# ----------------------------------------------------------------------------- end to end


def test_an_edm_config_trains_a_step_and_samples_with_guidance(image_dir):
  """One sharded train step of a class-conditional EDM DiT (the tiny U-Net takes ~70 s to
  compile here), then guided, churned Heun samples (edm_stochastic) through the config's
  sampling driver."""
  config = _edm_config(
    image_dir, model__name="dit", model__class_conditional=True, sampling__guidance_scale=2.0,
    sampling__sampler="edm_stochastic", sampling__s_churn=5.0,
  )  # fmt: skip
  assert validation.problems(config, num_devices=8) == []
  metrics, samples = train_step_and_sample(config)
  assert set(metrics) >= {"loss", "simple", "grad_norm"} and "vb" not in metrics
  assert samples.shape == (4, 8, 8, 1) and np.abs(samples).max() <= 1.0
