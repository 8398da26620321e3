"""Zero terminal SNR (Lin et al. 2024) wired into the discrete chain: the schedule buffers, the
predictions, the bound and the losses at alpha_bar_T = 0 against float64 references
(``tests/reference.py`` for the chain, ``tests/reference_continuous.py`` for Alg. 1 and Table
2), trailing and logSNR spacing, every sampler on Gaussian data, the config checks, and one tiny
run that trains and samples.

Tolerances: float32 against float64, atol 1e-5 on O(1) values unless stated.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling as S
from jaxdiff.core import diffusion as D
from jaxdiff.core import likelihood, losses, schedules, zero_snr
from jaxdiff.training import validation
from tests import reference as ref
from tests import reference_continuous as refc
from tests.conftest import tiny_config
from tests.test_sampling import MU, SD, _gaussian_model
from tests.tiny_steps import train_step_and_sample

T = 1000
BETAS = refc.zero_terminal_snr(ref.betas("linear", T))  # float64, betas[-1] == 1
AB = ref.alpha_bar(BETAS)
TS = np.array([0, 1, 500, T - 3, T - 2, T - 1])


@functools.cache
def _diffusion(mean_type="v", var_type="fixed_small"):
  betas = zero_snr.rescale_zero_terminal_snr(schedules.get_betas("linear", T))
  return D.make_diffusion(betas, mean_type=mean_type, var_type=var_type)


# E[target | x_t] for x_0 ~ N(MU, SD^2), finite at alpha_bar = 0 (test_sampling's, this schedule)
GAUSSIAN = {m: _gaussian_model(m, AB) for m in D.ZERO_SNR_MEAN_TYPES}


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- the chain


def test_buffers_match_the_reference_and_end_at_alpha_bar_zero():
  d = _diffusion()
  assert d.zero_terminal_snr and float(d.betas[-1]) == 1.0 and float(d.alphas_cumprod[-1]) == 0.0
  np.testing.assert_allclose(d.alphas_cumprod, AB, rtol=1e-5, atol=1e-12)
  np.testing.assert_allclose(d.one_minus_alphas_cumprod, 1 - AB, rtol=1e-5)
  np.testing.assert_allclose(d.sqrt_alphas_cumprod, np.sqrt(AB), rtol=1e-5, atol=1e-12)
  var = [ref.posterior(BETAS, np.zeros(1), np.zeros(1), t)[1] for t in range(1, T)]
  np.testing.assert_allclose(d.posterior_variance[1:], var, rtol=1e-5)
  # At T-1 x_T holds nothing of x_{T-1}: the posterior mean is sqrt(ab_{T-2}) x_0 alone.
  assert float(d.posterior_mean_coef2[-1]) == 0.0
  np.testing.assert_allclose(d.posterior_mean_coef1[-1], np.sqrt(AB[-2]), rtol=1e-5)
  assert np.isinf(d.sqrt_recip_alphas_cumprod[-1]) and np.isinf(d.sqrt_recipm1_alphas_cumprod[-1])
  for name in ("log_betas", "posterior_log_variance_clipped", "fixed_large_log_variance"):
    assert np.isfinite(np.asarray(getattr(d, name))).all(), name
  # An ordinary schedule is not flagged (its buffers and code paths are unchanged).
  assert not D.make_diffusion(schedules.get_betas("linear", T)).zero_terminal_snr


def test_make_diffusion_takes_beta_1_only_last_and_not_for_eps():
  with pytest.raises(ValueError, match=r"needs mean_type 'v' or 'x0', not 'eps'"):
    D.make_diffusion(BETAS)
  with pytest.raises(ValueError, match=r"beta\[0\] = 1.0 is outside the allowed \(0, 1\), or 1"):
    D.make_diffusion([1.0, 1.0], mean_type="v")
  with pytest.raises(ValueError, match=r"beta\[1\] = 1.5"):
    D.make_diffusion([0.1, 1.5], mean_type="v")
  with pytest.raises(ValueError, match=r"beta\[1\] = 1.0 is outside the allowed open interval"):
    schedules.validate_betas([0.1, 1.0])  # the schedules themselves never end at 1
  one = D.make_diffusion([1.0], mean_type="x0")  # T = 1: pure noise straight to the decoder
  assert one.zero_terminal_snr and np.isfinite(np.asarray(one.posterior_log_variance_clipped)).all()


@pytest.mark.parametrize("mean_type", D.ZERO_SNR_MEAN_TYPES)
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_p_mean_variance_matches_the_reference_up_to_t_minus_1(mean_type, var_type):
  d = _diffusion(mean_type, var_type)
  shape = (len(TS), 3, 3, 1)
  x = _rand(shape, 0)
  out = _rand(shape, 1)
  got = jax.jit(D.p_mean_variance)(d, jnp.asarray(out, jnp.float32), jnp.asarray(x), TS)
  for i, t in enumerate(TS):
    mean, log_var, x0 = ref.p_mean_var(BETAS, mean_type, var_type, out[i], x[i], int(t))
    np.testing.assert_allclose(got["mean"][i], mean, atol=1e-5, err_msg=f"t={t}")
    np.testing.assert_allclose(got["log_variance"][i], log_var, rtol=1e-5, err_msg=f"t={t}")
    np.testing.assert_allclose(got["pred_x0"][i], x0, atol=1e-5, err_msg=f"t={t}")
    eps = ref.eps_from_x0(BETAS, x[i], int(t), x0)  # = x_t at T-1, whatever x0
    # Near t = 0 eps divides by sqrt(1 - ab) (0.01 at t = 0): rounding of x0 is scaled up.
    np.testing.assert_allclose(got["pred_eps"][i], eps, atol=2e-3 if t < 2 else 1e-5)
  np.testing.assert_array_equal(got["pred_eps"][-1], x[-1].astype(np.float32))


def test_no_nan_gradient_through_the_terminal_eps():
  d = _diffusion()
  x = jnp.asarray(_rand((2, 2, 2, 1), 0), jnp.float32)
  out = jnp.asarray(_rand((2, 2, 2, 1), 1), jnp.float32)
  t = jnp.array([T - 1, T - 2])

  def f(x, out):
    p = D.p_mean_variance(d, out, x, t, clip_denoised=False)
    return jnp.sum(p["pred_eps"] ** 2) + jnp.sum(p["mean"] ** 2)

  chex.assert_tree_all_finite(jax.grad(f, argnums=(0, 1))(x, out))


def test_bound_terms_and_prior_match_the_reference():
  """The prior KL(q(x_T | x_0) || N(0, I)) is exactly 0; every KL term is finite and right."""
  d = _diffusion("v", "fixed_large")
  x0 = np.round((np.random.default_rng(2).uniform(-1, 1, (len(TS), 2, 2, 1)) + 1) * 127.5)
  x0 = x0 / 127.5 - 1
  noise = _rand(x0.shape, 3)
  out = _rand(x0.shape, 4) * 0.3
  x_t = np.stack([np.sqrt(AB[t]) * x0[i] + np.sqrt(1 - AB[t]) * noise[i] for i, t in enumerate(TS)])
  args = [jnp.asarray(a, jnp.float32) for a in (out, x0, x_t)]
  got = likelihood.vb_terms_bpd(d, *args, jnp.asarray(TS), clip_denoised=False)
  want = [
    ref.vb_term_bpd(BETAS, "v", "fixed_large", out[i], x0[i], x_t[i], int(t), clip=False)
    for i, t in enumerate(TS)
  ]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  prior = likelihood.prior_bpd(d, args[1])
  np.testing.assert_array_equal(prior, 0.0)
  np.testing.assert_allclose(prior, [ref.prior_bpd(BETAS, x) for x in x0], atol=1e-12)


def test_calc_bpd_loop_is_finite_with_the_exact_model():
  d = D.respace(_diffusion("v"), D.space_timesteps(T, 50))  # keeps T-1: still zero terminal SNR
  assert d.zero_terminal_snr
  x0 = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 2, 2, 1)), jnp.float32)
  r = jax.jit(lambda d, x, k: likelihood.calc_bpd_loop(d, GAUSSIAN["v"], x, k))(
    d, x0, jax.random.key(0)
  )
  chex.assert_tree_all_finite(r)
  np.testing.assert_array_equal(r["prior_bpd"], 0.0)


def test_training_loss_targets_and_min_snr_weights_at_alpha_bar_zero():
  d = _diffusion("v")
  x0, noise = _rand((len(TS), 2, 2, 1), 6), _rand((len(TS), 2, 2, 1), 7)
  model_out = _rand((len(TS), 2, 2, 1), 8)
  t = jnp.asarray(TS)
  terms = losses.training_losses(
    d, lambda x, s: jnp.asarray(model_out, jnp.float32), jnp.asarray(x0, jnp.float32), t,
    jnp.asarray(noise, jnp.float32), min_snr_gamma=5.0,
  )  # fmt: skip
  for i, s in enumerate(TS):
    target = ref.v_target(BETAS, x0[i], int(s), noise[i])  # -x_0 at T-1
    snr = AB[s] / (1 - AB[s])
    want = np.mean((model_out[i] - target) ** 2) * min(snr, 5.0) / (snr + 1)
    np.testing.assert_allclose(terms["loss"][i], want, rtol=1e-4, atol=1e-7, err_msg=f"t={s}")
  assert float(terms["loss"][-1]) == 0.0  # min-SNR weight 0 at SNR 0


# ----------------------------------------------------------------------------- spacing and samplers


def test_trailing_and_logsnr_spacing():
  d = _diffusion()
  for n in (1, 2, 7, 10, 50, 999, T):
    assert S.sampler_timesteps(d, n, spacing="trailing") == sorted(refc.trailing(T, n)), n
  assert S.sampler_timesteps(d, 10, sampler="dpm++2m", spacing="trailing")[::-1][:2] == [999, 899]
  lam = 0.5 * np.log(AB[:-1] / (1 - AB[:-1]))  # lambda_T = -inf is left out
  for n in (1, 2, 3, 20, 300):
    kept = S.sampler_timesteps(d, n, sampler="dpm++2m")
    assert len(kept) == n and kept[-1] == T - 1 and (n == 1 or kept[0] == 0), n
    assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
  gaps = -np.diff(lam[S.sampler_timesteps(d, 20, sampler="dpm++2m")[:-1]])
  assert gaps.max() < 1.5 * gaps.mean()  # roughly uniform in logSNR up to the last step


def test_first_ddim_step_from_pure_noise_matches_float64():
  """From alpha_bar_T = 0, eps_hat = x_T and x0_hat = -v: the step is exact in float64."""
  d = D.respace(_diffusion("v"), zero_snr.trailing_timesteps(T, 10))
  ab = AB[np.asarray(d.timestep_map)]
  x, out = _rand((2, 2, 2, 1), 9), _rand((2, 2, 2, 1), 10)
  t = jnp.full((2,), 9)
  got = S.ddim_step(d, jnp.asarray(out, jnp.float32), jnp.asarray(x, jnp.float32), t, None,
                    clip_denoised=False)["sample"]  # fmt: skip
  want = np.sqrt(ab[8]) * -out + np.sqrt(1 - ab[8]) * x
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
  "sampler,mean_type,opts,bias",
  [
    # (mean, std) bias measured with 32,000 values (SE 0.003, 0.002): first-order DDIM and
    # DDPM's fixed_small at 100 steps under-disperse as they do without zero terminal SNR, and
    # DPM-Solver++ likes logSNR steps better than trailing ones.
    ("ddim", "v", dict(num_steps=50, spacing="trailing"), (-0.003, -0.032)),
    ("dpm++2m", "v", dict(num_steps=20), (-0.003, 0.008)),
    ("dpm++2m", "x0", dict(num_steps=20, spacing="trailing"), (-0.003, -0.048)),
    ("ddpm", "v", dict(num_steps=100), (0.000, -0.032)),
    ("euler_maruyama", "v", dict(num_steps=250), (-0.006, 0.006)),
    ("pc", "v", dict(num_steps=100, spacing="trailing"), (-0.003, 0.007)),
  ],
)
def test_every_sampler_draws_the_data_distribution(sampler, mean_type, opts, bias):
  """From x_T ~ N(0, I), which at alpha_bar_T = 0 is exactly the chain's start: 1,000 values,
  checked to the measured bias plus 4 standard errors (0.016 for the mean, 0.011 for the std)."""
  x = S.sample(
    _diffusion(mean_type), GAUSSIAN[mean_type], jax.random.key(1), (250, 2, 2, 1),
    sampler=sampler, clip_denoised=False, **opts,
  )  # fmt: skip
  x = np.asarray(x, np.float64)
  assert np.isfinite(x).all()
  assert abs(x.mean() - MU - bias[0]) < 4 * 0.016, x.mean()
  assert abs(x.std() - SD - bias[1]) < 4 * 0.011, x.std()


# ----------------------------------------------------------------------------- config


def _zero_snr_config(image_dir, **overrides):
  zero_snr_v = dict(diffusion__zero_terminal_snr=True, diffusion__mean_type="v")
  return tiny_config(image_dir, **{**zero_snr_v, "sampling__spacing": "trailing", **overrides})


def test_config_builds_the_rescaled_schedule(image_dir):
  config = _zero_snr_config(image_dir)
  assert validation.problems(config, num_devices=8) == []
  d = D.from_config(config.diffusion)
  want = refc.zero_terminal_snr(ref.betas("cosine", 20))
  np.testing.assert_allclose(d.betas, want, rtol=1e-6)
  assert d.zero_terminal_snr and d.mean_type == "v"
  assert S.sampler_kwargs(config)["spacing"] == "trailing"
  config.sampling.spacing = ""
  assert S.sampler_kwargs(config)["spacing"] is None


@pytest.mark.parametrize(
  "overrides, lines",
  [
    (
      {"diffusion__mean_type": "eps", "sampling__spacing": "leading"},
      [
        "diffusion.mean_type='eps': diffusion.zero_terminal_snr=True needs mean_type 'v' (or"
        " 'x0'): at alpha_bar_T = 0 an eps prediction does not determine x_0",
        "sampling.spacing='leading': allowed: '' (the sampler's own), sections, ddim, logsnr,"
        " trailing",
      ],
    ),
    (
      {"diffusion__num_timesteps": 1, "sampling__num_steps": 1},
      ["diffusion.num_timesteps=1: diffusion.zero_terminal_snr=True needs num_timesteps >= 2"],
    ),
  ],
)
def test_config_problems_are_one_line_each(image_dir, overrides, lines):
  assert validation.problems(_zero_snr_config(image_dir, **overrides), num_devices=8) == lines


def test_a_non_bool_flag_is_one_line(image_dir):
  config = _zero_snr_config(image_dir)
  with config.unlocked():  # as a config file that builds its own dict can have it
    del config.diffusion["zero_terminal_snr"]
    config.diffusion.zero_terminal_snr = 1
  line = "diffusion.zero_terminal_snr=1: must be a bool (True or False)"
  assert validation.problems(config, num_devices=8) == [line]
  assert D.check_config(config.diffusion) == [line]  # the room's own check, called alone


def test_a_zero_snr_v_config_trains_a_step_and_samples(image_dir):
  config = _zero_snr_config(image_dir, model__name="dit")  # the DiT compiles in half the time
  metrics, samples = train_step_and_sample(config, sampler="dpm++2m")
  assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
  assert np.abs(samples).max() <= 1.0
