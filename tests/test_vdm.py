"""The vdm process (diffusion.process = "vdm", Kingma et al. 2021): its bound per term against
float64 references, the variance-minimising gradient of the schedule against float64 finite
differences, the learned schedule staying monotone under training, the samplers (one step
against the posterior's float64 form, and on Gaussian data whose eps is known in closed form),
bits/dim, the config checks, and a tiny run that trains a step and samples.

Float32 against float64: rtol 1e-4 on the bound's terms unless stated.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdiff import evaluation, models, parallel
from jaxdiff import sampling as S
from jaxdiff.core import process as P
from jaxdiff.core import vdm_process
from jaxdiff.core.continuous import times, vdm
from jaxdiff.models import noise_schedule
from jaxdiff.training import validation
from tests import reference_continuous as refc
from tests.conftest import tiny_config
from tests.tiny_steps import train_step_and_sample

B, SHAPE = 4, (4, 2, 2, 1)
T_TRAIN = np.array([0.1, 0.35, 0.6, 0.85])


def _data(seed=0):
  """8-bit images in [-1, 1], eps and eps_0, float64."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, SHAPE) / 127.5 - 1
  return x, rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)


def _quadratic(eta):
  """gamma(t) = a + b t + c t^2, increasing on [0, 1] for b, c > 0: a schedule whose every
  parameter the maths can be checked against."""
  return lambda t: eta["a"] + eta["b"] * t + eta["c"] * t**2


def _linear_model(theta):
  """eps_hat = w z + v t (shown t * TIME_SCALE): a denoiser with two parameters."""
  return lambda z, s: theta["w"] * z + theta["v"] * s.reshape(-1, 1, 1, 1) / P.TIME_SCALE


ETA = {"a": -6.0, "b": 8.0, "c": 1.5}
THETA = {"w": 0.6, "v": 0.3}


def _f32(*arrays):
  return (jnp.asarray(a, jnp.float32) for a in arrays)


# ----------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("num_steps", [0, 10])
@pytest.mark.parametrize("schedule", ["fixed", "quadratic"])
def test_every_term_of_the_bound_matches_float64(num_steps, schedule):
  x, eps, eps_0 = _data()
  p = P.VDM(num_steps=num_steps)
  if schedule == "fixed":
    gamma_fn, gamma_ref = p.fixed_gamma, lambda t: -13.3 + 18.3 * t
  else:
    gamma_fn, gamma_ref = _quadratic(ETA), _quadratic(ETA)
  model = _linear_model(THETA)
  got = vdm_process.vdm_losses(p, model, gamma_fn, *_f32(x, T_TRAIN, eps, eps_0))

  def model_ref(z, t):
    return THETA["w"] * z + THETA["v"] * t

  want = refc.vdm_bound_terms(x, eps, T_TRAIN, gamma_ref, model_ref, num_steps, eps_0)
  for k in ("prior", "reconstruction", "diffusion"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-7, err_msg=k)
  total = want["prior"] + want["reconstruction"] + want["diffusion"]
  np.testing.assert_allclose(got["loss"], total, rtol=1e-4)
  np.testing.assert_array_equal(got["vb"], got["loss"])
  t_used = np.maximum(np.ceil(T_TRAIN * num_steps), 1) / num_steps if num_steps else T_TRAIN
  np.testing.assert_allclose(got["t"], t_used, atol=1e-7)


def test_the_draw_is_low_discrepancy_or_uniform():
  x0 = jnp.zeros((8, 2, 2, 1))
  key_t, key_noise = jax.random.key(0), jax.random.key(1)
  draw = P.draw(P.VDM(), key_t, key_noise, x0)
  # One t in each [i / B, (i + 1) / B), in some rotation.
  np.testing.assert_array_equal(np.sort(np.floor(np.asarray(draw.t) * 8)), np.arange(8))
  np.testing.assert_array_equal(draw.weights, np.ones(8))
  np.testing.assert_array_equal(draw.noise, jax.random.normal(key_noise, x0.shape))
  uniform = P.draw(P.VDM(t_sampler="uniform"), key_t, key_noise, x0)
  np.testing.assert_array_equal(uniform.t, jax.random.uniform(key_t, (8,)))


# ----------------------------------------------------------------------------- gradients


def _reference_gradients(x, eps, num_steps, h=1e-5):
  """Central differences in float64: the schedule's of ``mean(L_diff^2) + mean(prior + recon)``,
  the denoiser's of ``mean(L_total)``."""

  def terms(eta, theta):
    return refc.vdm_bound_terms(
      x, eps, T_TRAIN, _quadratic(eta), lambda z, t: theta["w"] * z + theta["v"] * t, num_steps
    )

  def schedule_objective(eta):
    r = terms(eta, THETA)
    return np.mean(r["diffusion"] ** 2) + np.mean(r["prior"] + r["reconstruction"])

  def denoiser_objective(theta):
    r = terms(ETA, theta)
    return np.mean(r["prior"] + r["reconstruction"] + r["diffusion"])

  def grad(f, params):
    out = {}
    for k in params:
      up, down = dict(params), dict(params)
      up[k] += h
      down[k] -= h
      out[k] = (f(up) - f(down)) / (2 * h)
    return out

  return grad(schedule_objective, ETA), grad(denoiser_objective, THETA)


@pytest.mark.parametrize("num_steps", [0, 10])
def test_the_schedule_descends_the_variance_and_the_denoiser_the_bound(num_steps):
  """App. I.2: the schedule's gradient is that of the mean squared diffusion loss (plus the
  prior's and reconstruction's through its endpoints), the denoiser's the bound's."""
  x, eps, _ = _data(1)
  p = P.VDM(num_steps=num_steps)

  def loss(eta, theta):
    terms = P.training_losses(
      p, _linear_model(theta), *_f32(x, T_TRAIN, eps), gamma_fn=_quadratic(eta)
    )
    return jnp.mean(terms["loss"])

  eta, theta = (jax.tree.map(jnp.float32, d) for d in (ETA, THETA))
  g_eta, g_theta = jax.grad(loss, argnums=(0, 1))(eta, theta)
  want_eta, want_theta = _reference_gradients(x, eps, num_steps)
  for k in ETA:
    np.testing.assert_allclose(g_eta[k], want_eta[k], rtol=2e-3, err_msg=k)
  for k in THETA:
    np.testing.assert_allclose(g_theta[k], want_theta[k], rtol=2e-3, err_msg=k)


def test_the_learned_schedule_stays_monotone_while_it_trains():
  """Ten Adam steps at a large learning rate on the variance objective: gamma stays
  increasing on a fine grid, and both the shape and the endpoints moved."""
  gamma = noise_schedule.LearnedGamma(n_features=16, rngs=nnx.Rngs(0))
  graphdef, eta = nnx.split(gamma)
  eta0 = jax.tree.map(jnp.copy, eta)
  x, eps, _ = _data(2)
  opt = optax.adam(0.05)
  opt_state = opt.init(eta)
  p = P.VDM()

  @jax.jit
  def step(eta, opt_state, key):
    def loss(eta):
      t = times.low_discrepancy(key, B)
      gamma_fn = lambda s: nnx.merge(graphdef, eta)(s)  # noqa: E731
      terms = P.training_losses(p, _linear_model(THETA), *_f32(x), t, *_f32(eps), gamma_fn=gamma_fn)
      return jnp.mean(terms["loss"])

    updates, opt_state = opt.update(jax.grad(loss)(eta), opt_state)
    return optax.apply_updates(eta, updates), opt_state

  for i in range(10):
    eta, opt_state = step(eta, opt_state, jax.random.key(i))
  g = np.asarray(nnx.merge(graphdef, eta)(jnp.linspace(0.0, 1.0, 1001)), np.float64)
  assert np.all(np.diff(g) > 0), np.diff(g).min()
  assert not np.allclose(eta["l2"]["kernel"][...], eta0["l2"]["kernel"][...])
  assert float(eta["gamma_0"][...]) != -13.3 and float(eta["gamma_1"][...]) != 5.0


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("g_t, g_s", [(4.0, 3.0), (-2.0, -2.5), (-10.0, -13.3)])
def test_the_ancestral_step_is_the_posterior_draw(g_t, g_s):
  rng = np.random.default_rng(3)
  z, eps_hat, noise = (rng.standard_normal(8) for _ in range(3))
  got = vdm.ancestral_step(*_f32(z, eps_hat), jnp.float32(g_t), jnp.float32(g_s), *_f32(noise))
  a_t, s_t = math.sqrt(refc.sigmoid(-g_t)), math.sqrt(refc.sigmoid(g_t))
  x_hat = (z - s_t * eps_hat) / a_t
  want = [refc.vdm_posterior_step(*v, g_t, g_s, n) for *v, n in zip(z, x_hat, noise, strict=True)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The deterministic step: alpha_s x_hat + sigma_s eps_hat.
  a_s, s_s = math.sqrt(refc.sigmoid(-g_s)), math.sqrt(refc.sigmoid(g_s))
  np.testing.assert_allclose(
    vdm.ddim_step(*_f32(z, eps_hat), jnp.float32(g_t), jnp.float32(g_s)),
    a_s * x_hat + s_s * eps_hat, rtol=1e-4, atol=1e-5,
  )  # fmt: skip


MU, SD = 0.3, 0.5


def _gaussian_eps(x, s):
  """E[eps | z_t] for data N(MU, SD^2) under the fixed schedule (shown t * TIME_SCALE)."""
  g = P.VDM().fixed_gamma(s / P.TIME_SCALE).reshape(-1, 1, 1, 1)
  a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
  return jnp.sqrt(s2) * (x - jnp.sqrt(a2) * MU) / (a2 * SD**2 + s2)


def test_the_ancestral_sampler_reaches_the_data_distribution_from_the_exact_eps():
  """16384 scalars, 200 steps of the fixed schedule: mean and standard deviation within 0.015
  of the data's (the standard errors are 0.004 and 0.003; the prior N(0, 1) differs from
  q(z_1) by alpha_1^2 = 0.007)."""
  x = S.sample(
    P.VDM(schedule="fixed"), _gaussian_eps, jax.random.key(0), (16, 32, 32, 1),
    sampler="vdm", num_steps=200, clip_denoised=False,
  )  # fmt: skip
  x = np.asarray(x, np.float64)
  assert abs(x.mean() - MU) < 0.015 and abs(x.std() - SD) < 0.015, (x.mean(), x.std())


def test_the_deterministic_sampler_follows_the_exact_transport():
  """The probability-flow map of Gaussian data sends z_1 to MU + SD (z_1 - alpha_1 MU) /
  sd(z_1); the DDIM steps are first order in the step (measured max error 0.097 at 50 steps,
  0.025 at 200, 0.005 at 1000)."""
  x_T = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  x = S.sample(
    P.VDM(schedule="fixed"), _gaussian_eps, jax.random.key(0), x_T.shape, sampler="vdm_ddim",
    num_steps=200, x_T=x_T, clip_denoised=False,
  )  # fmt: skip
  a2 = refc.sigmoid(-5.0)
  exact = MU + SD * (np.asarray(x_T, np.float64) - math.sqrt(a2) * MU) / math.sqrt(
    a2 * SD**2 + 1 - a2
  )
  np.testing.assert_allclose(x, exact, atol=0.03)


@dataclasses.dataclass(frozen=True)
class _Bound:
  """A model function of the shape ``models.bind`` gives (``Partial(apply, params)`` with an
  ``apply.gamma(params, t)``): the exact Gaussian eps, scaled by ``params["w"]``, and the fixed
  schedule shifted by ``params["shift"]``."""

  def __call__(self, params, x, s):
    return params["w"] * _gaussian_eps(x, s)

  def gamma(self, params, t):
    return P.VDM().fixed_gamma(t) + params["shift"]


def test_the_sampler_evaluates_the_models_schedule_inside_one_compile():
  """gamma comes from the model's parameters (here a shift of the line), inside jit: new
  parameters reuse the compiled sampler and change the samples."""
  chex.clear_trace_counter()
  fn = jax.jit(chex.assert_max_traces(S.make_sampler("vdm_ddim", clip_denoised=False), n=1))
  grid = P.discretize(P.VDM(), 10, None)
  assert grid.gammas is None  # a learned schedule: filled in from the model
  x_T = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
  outs = [
    fn(grid, jax.tree_util.Partial(_Bound(), {"w": 1.0, "shift": s}), jax.random.key(0), x_T)
    for s in (0.0, 0.5)
  ]
  chex.assert_tree_all_finite(outs)
  assert not np.allclose(*outs)
  fixed = S.sample(
    P.VDM(schedule="fixed"), _gaussian_eps, jax.random.key(0), x_T.shape, sampler="vdm_ddim",
    num_steps=10, x_T=x_T, clip_denoised=False,
  )  # fmt: skip
  np.testing.assert_allclose(outs[0], fixed, atol=1e-5)
  with pytest.raises(ValueError, match="a learned vdm schedule needs the model's parameters"):
    S.sample(P.VDM(), _gaussian_eps, jax.random.key(0), x_T.shape, sampler="vdm", num_steps=3)


def test_guidance_and_temperature():
  """Guidance mixes the eps of two labels in one call on the doubled batch; temperature 0 makes
  the ancestral sampler deterministic (the same for any key)."""
  calls = []

  def model_fn(x, s, y):
    calls.append(x.shape[0])
    return _gaussian_eps(x, s) * (1.0 + 0.1 * y.reshape(-1, 1, 1, 1))

  x_T = jax.random.normal(jax.random.key(1), (4, 2, 2, 1))
  kw = dict(sampler="vdm", num_steps=5, x_T=x_T, labels=jnp.zeros(4, jnp.int32), null_label=1)
  p = P.VDM(schedule="fixed")
  a = S.sample(p, model_fn, jax.random.key(0), x_T.shape, guidance_scale=2.0, temperature=0.0,
               **kw)  # fmt: skip
  b = S.sample(p, model_fn, jax.random.key(5), x_T.shape, guidance_scale=2.0, temperature=0.0,
               **kw)  # fmt: skip
  assert set(calls) == {8}
  np.testing.assert_array_equal(a, b)
  c = S.sample(p, model_fn, jax.random.key(5), x_T.shape, guidance_scale=2.0, **kw)
  assert not np.allclose(a, c)


# ----------------------------------------------------------------------------- the model


def _vdm_config(image_dir, **overrides):
  vdm_ = dict(
    diffusion__process="vdm", diffusion__t_sampler="low_discrepancy", sampling__sampler="vdm",
    sampling__num_steps=3,
  )  # fmt: skip
  return tiny_config(image_dir, **{**vdm_, **overrides})


def test_the_model_holds_its_schedule_in_its_params(image_dir):
  config = _vdm_config(image_dir, diffusion__fourier_features=True)
  model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
  assert isinstance(model, noise_schedule.ScheduledDenoiser) and model.fourier
  params = nnx.state(model)
  assert set(params["schedule"]) >= {"gamma_0", "gamma_1", "l1", "l2", "l3"}
  # 1 channel + sin and cos at n = 7, 8.
  assert params["denoiser"]["conv_in"]["kernel"].shape[2] == 5
  config.diffusion.vdm_schedule = "fixed"
  fixed = nnx.state(nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0))))
  assert "schedule" not in fixed or not jax.tree.leaves(fixed["schedule"])
  z = jnp.array([[0.0, 1 / 256, 0.25]])  # sin(2^7 pi / 256) = 1, sin(2^8 pi / 256) = 0
  np.testing.assert_allclose(
    noise_schedule.fourier_features(z[..., None]),
    [[[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 1.0, 1.0]]],  # sin, then cos
    atol=1e-5,
  )


def test_every_bad_vdm_field_is_one_line(image_dir):
  config = _vdm_config(
    image_dir, diffusion__t_sampler="logit_normal", diffusion__vdm_schedule="cosine",
    diffusion__vdm_timesteps=-1, diffusion__gamma_max=-20.0, diffusion__mean_type="v",
    diffusion__min_snr_gamma=5.0, sampling__sampler="ddpm",
  )  # fmt: skip
  vdm_only = "for process 'vdm'"
  assert validation.problems(config, num_devices=8) == [
    "diffusion.vdm_schedule='cosine': must be one of learned, fixed",  # the model's check
    f"diffusion.t_sampler='logit_normal': must be '' or one of low_discrepancy, uniform {vdm_only}",
    "diffusion.vdm_timesteps=-1: must be an int >= 0 (0: the continuous-time loss)",
    "diffusion.gamma_max=-20.0: must be a finite number > diffusion.gamma_min=-13.3",
    f"diffusion.mean_type='v': must be 'eps' {vdm_only} (the model predicts eps)",
    f"diffusion.min_snr_gamma=5.0: must be 0 {vdm_only} (a ddpm weighting)",
    "sampling.sampler='ddpm': allowed for diffusion.process='vdm': dpm++2m, vdm, vdm_ddim",
  ]
  good = _vdm_config(image_dir, diffusion__vdm_timesteps=100, diffusion__fourier_features=True)
  assert validation.problems(good, num_devices=8) == []
  assert P.from_config(good.diffusion) == P.VDM("low_discrepancy", 100, "learned", -13.3, 5.0)
  from jaxdiff.training import summary

  line = "vdm, learned gamma from -13.3..5, t low_discrepancy, loss in T=100 steps, Fourier"
  assert summary._process_line(good.diffusion, None).startswith(line)  # dry_run's line


# ----------------------------------------------------------------------------- bits/dim


def test_bits_per_dim_sums_the_terms_per_example_with_a_standard_error():
  """A 2x2 grey model: the record's bound is the mean of prior + reconstruction + diffusion per
  example, each example's draws fixed by its index (batch size does not matter)."""
  p = P.VDM(schedule="fixed")
  model_fn = jax.tree_util.Partial(_Bound(), {"w": 1.0, "shift": 0.0})
  images = np.random.default_rng(0).integers(0, 256, (6, 2, 2, 1)).astype(np.uint8)
  mesh = parallel.make_mesh(2)
  a = evaluation.vdm_bits_per_dim(p, model_fn, images, batch_size=4, num_t=3, mesh=mesh)
  b = evaluation.vdm_bits_per_dim(p, model_fn, images, batch_size=2, num_t=3, mesh=mesh)
  np.testing.assert_allclose(a["per_example_bpd"], b["per_example_bpd"], rtol=1e-6)
  parts = a["prior_bpd"] + a["reconstruction_bpd"] + a["diffusion_bpd"]
  assert a["bpd"] == pytest.approx(parts, rel=1e-9)
  per = a["per_example_bpd"]
  assert a["bpd_stderr"] == pytest.approx(per.std(ddof=1) / math.sqrt(6))
  # The prior of data in [-1, 1] at gamma_1 = 5 is tiny, the bound positive.
  assert 0 < a["prior_bpd"] < 0.01 and a["bpd"] > 0 and a["num_examples"] == 6


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # compiles a U-Net's train step and a sampler (~1 min on a busy 2-core CPU)
def test_a_vdm_config_trains_a_step_and_samples(image_dir):
  config = _vdm_config(image_dir, diffusion__fourier_features=True)
  assert validation.problems(config, num_devices=8) == []
  metrics, samples = train_step_and_sample(config)
  assert set(metrics) >= {"loss", "vb", "prior", "reconstruction", "diffusion", "grad_norm"}
  assert metrics["loss"] == pytest.approx(
    metrics["prior"] + metrics["reconstruction"] + metrics["diffusion"], rel=1e-5
  )
  assert samples.shape == (4, 8, 8, 1) and np.abs(samples).max() <= 1.0


@pytest.mark.slow  # three CLI processes that each compile a model (~3 min)
def test_jaxdiff_train_sample_and_evaluate_bpd_of_a_vdm_config(image_dir, tmp_path):
  """Trains 2 steps (bits/dim evaluated in the loop), samples, and `evaluate --metric bpd`."""
  import json

  from tests.conftest import jaxdiff_cli, tiny_config_file

  config_file = tiny_config_file(
    tmp_path / "vdm.py", image_dir, diffusion__process="vdm", sampling__sampler="vdm",
    sampling__num_steps=4, training__num_steps=2, eval__every=2, eval__bpd_examples=4,
    eval__batch_size=4,
  )  # fmt: skip
  workdir, out = tmp_path / "run", tmp_path / "grid"
  train = jaxdiff_cli("train", "--config", str(config_file), "--workdir", str(workdir))
  assert train.returncode == 0, train.stderr[-2000:]
  sample = jaxdiff_cli(
    "sample", "--workdir", str(workdir), "--out", str(out), "--num_samples", "4",
    "--sampler", "vdm_ddim", "--steps", "4",
  )  # fmt: skip
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert (out / "samples.png").exists()
  bpd = jaxdiff_cli("evaluate", "--workdir", str(workdir), "--metric", "bpd", "--num_examples", "4")
  assert bpd.returncode == 0, bpd.stderr[-2000:]
  record = json.loads(bpd.stdout.strip().splitlines()[-1])
  assert record["metric"] == "bpd" and record["num_examples"] == 4 and record["bpd"] > 0
  parts = record["prior_bpd"] + record["reconstruction_bpd"] + record["diffusion_bpd"]
  assert record["bpd"] == pytest.approx(parts, rel=1e-6)
