"""The flow process (diffusion.process = "flow"): its draw, loss and grid against float64
references, the Euler and Heun samplers on Gaussian data (whose velocity is known in closed form)
against a float64 integration of the same grid and against the exact transport, guidance, the
refusals, and a tiny run that trains a step and samples.

Float32 against float64: atol 1e-5 on O(1) values unless stated.
"""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sampling as S
from jaxdiff.core import diffusion as D
from jaxdiff.core import losses, schedules, timesteps
from jaxdiff.core import process as P
from jaxdiff.training import validation
from tests import reference_continuous as refc
from tests.conftest import tiny_config
from tests.tiny_steps import train_step_and_sample

MU, SD = 0.3, 0.5
X_T = jnp.linspace(-3.0, 3.0, 64).reshape(16, 2, 2, 1)  # |z| up to 3


def _gaussian_velocity(x, s):
  """The exact velocity for x0 ~ N(MU, SD^2); ``s`` is what the model is shown, t * 1000."""
  t = (s / P.TIME_SCALE).reshape(-1, *([1] * (x.ndim - 1)))
  var = (1 - t) ** 2 * SD**2 + t**2
  r = (x - (1 - t) * MU) / var
  return t * r - (MU + (1 - t) * SD**2 * r)


def _reference_sample(method, num_steps, shift, velocity=None):
  grid = refc.flow_shift(np.linspace(0.0, 1.0, num_steps + 1), shift)
  velocity = velocity or (lambda x, t: refc.flow_gaussian_velocity(x, t, MU, SD))
  return refc.flow_ode(np.asarray(X_T, np.float64), grid, velocity, method)


# ----------------------------------------------------------------------------- training


def test_draw_composes_the_documented_maps():
  """uniform, logit-normal and shifted times from the same normal / uniform numbers as SD3's
  formulas in float64; the noise is standard normal like x0; weights are 1."""
  key_t, key_noise, B = jax.random.key(0), jax.random.key(1), 64
  x0 = jnp.zeros((B, 2, 2, 1))
  n = np.asarray(jax.random.normal(key_t, (B,)), np.float64)
  u = np.asarray(jax.random.uniform(key_t, (B,)), np.float64)
  cases = [
    (P.FlowMatching(), u),
    (P.FlowMatching(shift=3.0), refc.flow_shift(u, 3.0)),
    (P.FlowMatching("logit_normal", 0.5, 0.8), 1 / (1 + np.exp(-(0.5 + 0.8 * n)))),
    (P.FlowMatching("logit_normal", shift=2.0), refc.flow_shift(1 / (1 + np.exp(-n)), 2.0)),
  ]
  for p, want in cases:
    draw = P.draw(p, key_t, key_noise, x0)
    np.testing.assert_allclose(draw.t, want, atol=1e-6, err_msg=str(p))
    np.testing.assert_array_equal(draw.weights, np.ones(B))
    np.testing.assert_array_equal(draw.noise, jax.random.normal(key_noise, x0.shape))


@pytest.mark.parametrize("m, s, shift", [(0.0, 1.0, 1.0), (-0.5, 0.7, 3.0)])
def test_logit_normal_times_have_the_logit_normal_law(m, s, shift):
  """Kolmogorov-Smirnov against P(t' <= x) = Phi((logit(shift^-1(x)) - m) / s): 4096 draws,
  the 1% critical value 1.63 / sqrt(n) = 0.025."""
  t = P.FlowMatching("logit_normal", m, s, shift).draw_t(jax.random.key(3), 4096)
  t = np.sort(np.asarray(t, np.float64))
  unshifted = t / (shift - (shift - 1) * t)  # the inverse of the shift
  cdf = refc.logit_normal_cdf(unshifted, m, s)
  n = len(t)
  ks = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
  assert ks < 1.63 / math.sqrt(n), ks


@pytest.mark.parametrize("loss_type", P.FLOW_LOSS_TYPES)
def test_flow_loss_matches_float64(loss_type):
  rng = np.random.default_rng(0)
  x0, noise = rng.uniform(-1, 1, (5, 3, 3, 2)), rng.standard_normal((5, 3, 3, 2))
  t = np.array([0.0, 0.1, 0.5, 0.93, 1.0])
  model = lambda x, s: 0.7 * x + 2e-4 * s.reshape(-1, 1, 1, 1)  # noqa: E731
  got = P.training_losses(
    P.FlowMatching(), model, *(jnp.asarray(a, jnp.float32) for a in (x0, t)),
    jnp.asarray(noise, jnp.float32), loss_type=loss_type,
  )  # fmt: skip
  tb = t.reshape(-1, 1, 1, 1)
  x_t = (1 - tb) * x0 + tb * noise
  err = 0.7 * x_t + 2e-4 * 1000 * tb - (noise - x0)
  a = np.abs(err)
  per = {"mse": err**2, "l1": a, "huber": np.where(a <= 1, 0.5 * a**2, a - 0.5)}[loss_type]
  np.testing.assert_allclose(got["loss"], per.mean(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["simple"], got["loss"])
  np.testing.assert_array_equal(got["t"], t.astype(np.float32))


def test_ddpm_goes_through_the_process_interface_unchanged():
  d = D.make_diffusion(schedules.get_betas("cosine", 50), mean_type="v")
  key_t, key_noise, x0 = jax.random.key(0), jax.random.key(1), jnp.ones((4, 2, 2, 1)) * 0.3
  draw = P.draw(d, key_t, key_noise, x0)
  chex.assert_trees_all_equal(draw, timesteps.draw(key_t, key_noise, x0, 50))
  model = lambda x, s: 0.5 * x  # noqa: E731
  got = P.training_losses(d, model, x0, draw.t, draw.noise, min_snr_gamma=5.0)
  chex.assert_trees_all_equal(
    got, losses.training_losses(d, model, x0, draw.t, draw.noise, min_snr_gamma=5.0)
  )
  assert P.name(d) == "ddpm" and P.name(P.FlowMatching()) == "flow"


def test_the_sampling_grid_is_the_shifted_uniform_grid():
  grid = P.FlowMatching(shift=3.0).grid(8)
  assert grid.num_timesteps == 8 and P.name(grid) == "flow"
  np.testing.assert_allclose(grid.times, refc.flow_shift(np.linspace(0, 1, 9), 3.0), atol=1e-7)
  assert float(grid.times[0]) == 0.0 and float(grid.times[-1]) == 1.0
  np.testing.assert_allclose(P.level_time(grid, jnp.array([0, 7])), grid.times[jnp.array([1, 8])])
  np.testing.assert_allclose(P.model_time(grid, jnp.array([0.25])), [250.0])


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
  "sampler, num_steps, shift, exact_tol",
  [
    # Distance to the exact transport MU + SD x_T (measured): Euler is first order (0.022 at
    # 100 steps), Heun second order (0.0015 at 20 steps; 0.0042 with the shift 3 grid).
    ("euler", 100, 1.0, 0.025),
    ("heun", 20, 1.0, 0.002),
    ("heun", 20, 3.0, 0.005),
  ],
)
def test_samplers_integrate_the_exact_velocity(sampler, num_steps, shift, exact_tol):
  x = S.sample(
    P.FlowMatching(shift=shift), _gaussian_velocity, jax.random.key(0), X_T.shape,
    sampler=sampler, num_steps=num_steps, x_T=X_T, clip_denoised=False,
  )  # fmt: skip
  # The same steps in float64: the sampler is the method, to float32 rounding.
  np.testing.assert_allclose(x, _reference_sample(sampler, num_steps, shift), atol=2e-5)
  # And the method lands on the data distribution: the ODE keeps z = (x_t - (1-t) MU) / sd_t.
  np.testing.assert_allclose(x, MU + SD * np.asarray(X_T, np.float64), atol=exact_tol)


def test_guidance_is_applied_to_the_velocity_in_one_call():
  """Class y has data mean MU_Y[y]; the null label's model is the mixture's mean MU_Y[2]. The
  guided velocity uncond + g (cond - uncond) integrated in float64 is what Heun returns."""
  mu_y = jnp.array([-0.5, 0.5, 0.0])
  calls = []

  def model_fn(x, s, y):
    calls.append(x.shape[0])
    t = (s / P.TIME_SCALE).reshape(-1, 1, 1, 1)
    mu = mu_y[y].reshape(-1, 1, 1, 1)
    var = (1 - t) ** 2 * SD**2 + t**2
    r = (x - (1 - t) * mu) / var
    return t * r - (mu + (1 - t) * SD**2 * r)

  labels = jnp.arange(16) % 2
  x = S.sample(
    P.FlowMatching(), model_fn, jax.random.key(0), X_T.shape, sampler="heun", num_steps=10,
    x_T=X_T, labels=labels, guidance_scale=3.0, null_label=2, clip_denoised=False,
  )  # fmt: skip
  assert set(calls) == {32}  # one call on the doubled batch, traced per evaluation
  mu_c = np.asarray(mu_y)[np.asarray(labels)].reshape(-1, 1, 1, 1)

  def guided(x, t):
    cond = refc.flow_gaussian_velocity(x, t, mu_c, SD)
    uncond = refc.flow_gaussian_velocity(x, t, 0.0, SD)
    return uncond + 3.0 * (cond - uncond)

  np.testing.assert_allclose(x, _reference_sample("heun", 10, 1.0, guided), atol=2e-5)


def test_a_flow_sampler_compiles_once_for_any_grid_and_parameters():
  chex.clear_trace_counter()
  apply = lambda p, x, s: p["w"] * x + p["b"] * s.reshape(-1, 1, 1, 1)  # noqa: E731
  fn = jax.jit(chex.assert_max_traces(S.make_sampler("heun"), n=1))
  grids = [P.FlowMatching().grid(4), P.FlowMatching(shift=3.0).grid(4)]
  outs = [
    fn(g, jax.tree_util.Partial(apply, {"w": w, "b": 1e-4}), jax.random.key(0), X_T)
    for g, w in zip(grids, (0.1, 0.2), strict=True)
  ]
  chex.assert_tree_all_finite(outs)
  assert not np.allclose(*outs)
  # The final sample is clipped to the data range by default.
  assert float(jnp.max(jnp.abs(outs[0]))) <= 1.0


def test_samplers_and_processes_refuse_each_other():
  key, flow = jax.random.key(0), P.FlowMatching()
  model = lambda x, s: x  # noqa: E731
  with pytest.raises(ValueError, match=r"^sampler 'ddpm' does not sample the flow process; its"
                     r" samplers: ddim, dpm\+\+2m, euler, heun$"):  # fmt: skip
    S.sample(flow, model, key, X_T.shape, sampler="ddpm", num_steps=4)
  for name in set(S.samplers_for("ddpm")) - set(S.samplers_for("flow")):
    with pytest.raises(ValueError, match=rf"sampler '{re.escape(name)}' does not sample the flow"):
      S.sample(flow, model, key, X_T.shape, sampler=name, num_steps=4)
  # euler and heun sample ddpm too, on its sigma grid (tests/test_edm.py); edm_stochastic not flow.
  with pytest.raises(ValueError, match=r"^sampler 'edm_stochastic' does not sample the flow"):
    S.sample(flow, model, key, X_T.shape, sampler="edm_stochastic", num_steps=4)
  with pytest.raises(ValueError, match=r"spacing='trailing' is the ddpm chain's; a flow steps"):
    S.sample(flow, model, key, X_T.shape, sampler="euler", num_steps=4, spacing="trailing")
  with pytest.raises(ValueError, match=r"num_steps=None: the flow process needs a number"):
    S.sample(flow, model, key, X_T.shape, sampler="euler")


# ----------------------------------------------------------------------------- config


def _flow_config(image_dir, **overrides):
  flow = dict(diffusion__process="flow", sampling__sampler="heun", sampling__num_steps=3)
  return tiny_config(image_dir, **{**flow, **overrides})


def test_a_flow_config_builds_its_process(image_dir):
  config = _flow_config(
    image_dir, diffusion__t_sampler="logit_normal", diffusion__logit_mean=0.5,
    diffusion__logit_std=0.8, diffusion__time_shift=3.0, sampling__num_steps=50,
  )  # fmt: skip
  assert validation.problems(config, num_devices=8) == []  # 50 steps > T = 20: T is ddpm's
  assert P.from_config(config.diffusion) == P.FlowMatching("logit_normal", 0.5, 0.8, 3.0)
  assert S.sampler_kwargs(config)["sampler"] == "heun"
  with pytest.raises(ValueError, match=r"sampler 'ddpm' does not sample the flow process"):
    S.sampler_kwargs(config, sampler="ddpm")


def test_every_bad_flow_field_is_one_line_at_once(image_dir):
  """One validation pass (the model traced once) names each bad field of a flow run."""
  config = _flow_config(
    image_dir, diffusion__t_sampler="importance", diffusion__loss_type="kl",
    diffusion__var_type="learned_range", diffusion__time_shift=0.0, diffusion__logit_std=-1.0,
    diffusion__min_snr_gamma=5.0, diffusion__zero_terminal_snr=True, sampling__sampler="pc",
    sampling__spacing="trailing", eval__every=1, eval__bpd_examples=8,
  )  # fmt: skip
  flow = "for process 'flow'"
  assert validation.problems(config, num_devices=8) == [
    f"diffusion.t_sampler='importance': must be '' or one of uniform, logit_normal {flow}",
    "diffusion.logit_std=-1.0: must be a number > 0",
    "diffusion.time_shift=0.0: must be a number > 0 (1: no shift)",
    f"diffusion.loss_type='kl': must be one of mse, l1, huber {flow} (kl and hybrid are the ddpm"
    " chain's)",
    f"diffusion.var_type='learned_range': must be fixed_small or fixed_large {flow} (no variance"
    " output)",
    f"diffusion.min_snr_gamma=5.0: must be 0 {flow} (a ddpm weighting)",
    f"diffusion.zero_terminal_snr=True: must be False {flow} (a ddpm rescaling)",
    "sampling.sampler='pc': allowed for diffusion.process='flow': ddim, dpm++2m, euler, heun",
    "sampling.spacing='trailing': '' for diffusion.process='flow' (its own grid)",
  ]
  config.diffusion.process = "rf"
  config.sampling.sampler, config.sampling.spacing = "heun", ""
  config.eval.bpd_examples, config.eval.every = 0, 0
  assert validation.problems(config, num_devices=8) == [
    "diffusion.process='rf': must be one of ddpm, vdm, edm, flow"
  ]


def test_a_ddpm_run_refuses_the_flow_options(image_dir):
  config = _flow_config(
    image_dir, diffusion__process="ddpm", diffusion__t_sampler="logit_normal",
    sampling__num_steps=5, sampling__spacing="trailing",
  )  # fmt: skip
  assert validation.problems(config, num_devices=8) == [
    "diffusion.t_sampler='logit_normal': must be '' (uniform) or one of uniform, importance",
    "sampling.spacing='trailing': '' for sampler 'heun' (it steps on the chain's sigma grid)",
  ]


# ----------------------------------------------------------------------------- end to end


def test_a_flow_config_trains_a_step_and_samples_with_guidance(image_dir):
  """One sharded train step of a class-conditional flow DiT (logit-normal, shifted t), then
  guided Heun samples through the config's sampling driver."""
  config = _flow_config(
    image_dir, model__name="dit", model__class_conditional=True, sampling__guidance_scale=2.0,
    diffusion__t_sampler="logit_normal", diffusion__time_shift=2.0,
  )  # fmt: skip
  assert validation.problems(config, num_devices=8) == []
  metrics, samples = train_step_and_sample(config)
  assert set(metrics) >= {"loss", "simple", "grad_norm"} and "vb" not in metrics
  assert samples.shape == (4, 8, 8, 1) and np.abs(samples).max() <= 1.0


@pytest.mark.slow  # two CLI processes that each compile a model (~1 min)
def test_jaxdiff_train_and_sample_a_flow_config(image_dir, tmp_path):
  from tests.conftest import jaxdiff_cli, tiny_config_file

  config_file = tiny_config_file(
    tmp_path / "flow.py", image_dir, model__name="dit", diffusion__process="flow",
    diffusion__t_sampler="logit_normal", sampling__sampler="euler", training__num_steps=2,
  )  # fmt: skip
  workdir, out = tmp_path / "run", tmp_path / "grid"
  train = jaxdiff_cli("train", "--config", str(config_file), "--workdir", str(workdir))
  assert train.returncode == 0, train.stderr[-2000:]
  sample = jaxdiff_cli(
    "sample", "--workdir", str(workdir), "--out", str(out), "--num_samples", "4",
    "--sampler", "heun", "--steps", "4",
  )  # fmt: skip
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert (out / "samples.png").exists()
  wrong = jaxdiff_cli("sample", "--workdir", str(workdir), "--out", str(out), "--sampler", "ddpm")
  assert wrong.returncode == 1
  allowed = "sampling.sampler='ddpm': allowed for diffusion.process='flow': ddim, dpm++2m, euler,"

  assert allowed in wrong.stderr
  bpd = jaxdiff_cli("evaluate", "--workdir", str(workdir), "--metric", "bpd")
  assert bpd.returncode == 1
  assert "--metric bpd: the flow process has no variational bound; use --metric ode_bpd" in (
    bpd.stderr
  )


def test_evaluation_inside_training_gives_a_flow_run_its_ode_bits_per_dim(image_dir, monkeypatch):
  """eval.bpd_examples of a process without a bound is the probability-flow ODE's bits/dim
  (eval.ode_steps RK4 steps, cut to 2 here; spied on); the same parameters give the same
  number."""
  from flax import nnx

  from jaxdiff import models, parallel
  from jaxdiff.training import evaluator

  steps = []
  ode_bits_per_dim = evaluator.evaluation.ode_bits_per_dim

  def spy(*args, num_steps, **kwargs):
    steps.append(num_steps)
    return ode_bits_per_dim(*args, num_steps=num_steps, **kwargs)

  monkeypatch.setattr(evaluator.evaluation, "ode_bits_per_dim", spy)
  config = _flow_config(
    image_dir, model__name="dit", eval__every=1, eval__bpd_examples=4, eval__batch_size=8,
    eval__ode_steps=2,
  )  # fmt: skip
  assert validation.problems(config, num_devices=8) == []
  graphdef, params = nnx.split(models.build_model(config, rngs=nnx.Rngs(0)))
  loop_eval = evaluator.LoopEvaluator(
    config, graphdef, P.from_config(config.diffusion), parallel.make_mesh()
  )
  record = loop_eval(params)
  assert set(record) == {"eval_bpd", "eval_bpd_stderr"} and np.isfinite(record["eval_bpd"])
  assert loop_eval(params) == record
  assert steps == [2, 2]
