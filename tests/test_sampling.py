"""Samplers: one-step maths against float64 references, and whole chains on a known distribution.

The known distribution is data x_0 ~ N(MU, SD^2) per dimension, for which the
Bayes-optimal denoiser is affine in x_t (``_gaussian_model``). With it:

- the probability-flow ODE is the affine map that keeps the standardised value
  z = (x_t - sqrt(ab) MU) / sqrt(ab SD^2 + 1 - ab), so ODE samplers (DDIM eta=0,
  DPM-Solver++) are checked sample by sample against ``MU + SD z(x_T)``;
- every sampler's output mean and std should be (MU, SD). Tolerances are the
  sampler's discretisation bias on this target (measured with 160k values per
  sampler, listed in ``_DISTRIBUTION_CASES``) plus 4 standard errors of the
  8000 values used here (SE 0.0056 for the mean, 0.004 for the std).

Float32 samplers against float64 references: atol 1e-5 on O(1) values unless
stated, looser where 1 / sqrt(alpha_bar) (up to ~160) multiplies rounding errors.
"""

import doctest
import functools
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from configs import tiny
from jaxdiff import sampling as S
from jaxdiff.core import diffusion as D
from jaxdiff.core import process as P
from jaxdiff.core import schedules
from tests import reference as ref

T = 1000
BETAS = schedules.get_betas("linear", T)
AB = ref.alpha_bar(BETAS)
MU, SD = 0.3, 0.5
TS = np.array([0, 1, 2, 500, T - 2, T - 1])


@functools.cache
def _diffusion(mean_type="eps", var_type="fixed_small"):
  return D.make_diffusion(BETAS, mean_type=mean_type, var_type=var_type)


def _gaussian_model(mean_type="eps", alpha_bar=AB):
  """E[target | x_t] for x_0 ~ N(MU, SD^2); ``t`` is the original-schedule step of the schedule
  with cumulative products ``alpha_bar`` (at alpha_bar = 0, x0_hat = MU and v = -MU)."""
  ab_all = jnp.asarray(alpha_bar, jnp.float32)

  def model_fn(x, t):
    ab = ab_all[t].reshape(-1, *([1] * (x.ndim - 1)))
    denom = ab * SD**2 + 1 - ab
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / denom
    x0 = MU + jnp.sqrt(ab) * SD**2 * (x - jnp.sqrt(ab) * MU) / denom
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[mean_type]

  return model_fn


# One model function per mean type, defined once: sample() caches its compiled
# sampler by the model function's identity.
GAUSSIAN = {m: _gaussian_model(m) for m in D.MEAN_TYPES}


def _flow_endpoint(x_T, first_step):
  """Where the exact probability-flow ODE takes x_T (at index first_step) at t = 0."""
  ab = AB[first_step]
  z = (np.asarray(x_T, np.float64) - np.sqrt(ab) * MU) / np.sqrt(ab * SD**2 + 1 - ab)
  return MU + SD * z


def _toy_model(x, t, y=None):
  """A cheap model with some dependence on x, t and the label."""
  out = 0.3 * x + 1e-3 * t.reshape(-1, 1, 1, 1).astype(x.dtype)
  if y is not None:
    out = out + 0.1 * y.reshape(-1, 1, 1, 1).astype(x.dtype)
  return out


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_eta1_step_is_the_ddpm_fixed_small_posterior(mean_type, clip):
  """DDIM (eq. 12) with eta = 1 has the mean and std of DDPM's q(x_{t-1} | x_t, x0_hat)."""
  d = _diffusion(mean_type, "fixed_small")
  shape = (len(TS), 3, 3, 2)
  x, out, z = (
    jnp.asarray(a, jnp.float32) for a in (_rand(shape, 0), _rand(shape, 1), _rand(shape, 2))
  )
  t = jnp.asarray(TS)
  ddim = jax.jit(S.ddim_step, static_argnames=("eta", "clip_denoised"))(
    d, out, x, t, z, eta=1.0, clip_denoised=clip
  )
  ddpm = S.ddpm_step(d, out, x, t, z, clip_denoised=clip)
  for i, ti in enumerate(TS):
    _, _, x0 = ref.p_mean_var(
      BETAS, mean_type, "fixed_small", np.asarray(out[i]), np.asarray(x[i]), ti, clip
    )
    mean, var = ref.posterior(BETAS, x0, np.asarray(x[i]), ti)  # var = 0 at t = 0
    scale = 1 / np.sqrt(AB[ti]) if mean_type == "eps" and not clip else 1.0
    for step in (ddim, ddpm):
      np.testing.assert_allclose(step["mean"][i], mean, rtol=1e-5, atol=1e-5 * scale)
      np.testing.assert_allclose(step["std"][i], np.sqrt(var), rtol=1e-5, atol=1e-12)
      np.testing.assert_allclose(step["sample"][i], mean + np.sqrt(var) * z[i], atol=1e-5 * scale)
  chex.assert_trees_all_close(ddim["std"], ddpm["std"], rtol=1e-6)


def test_ddim_step_matches_eq12_in_float64():
  """eta = 0.5 on a respaced schedule, against eq. 12 / 16 written with alpha_bar."""
  keep = D.space_timesteps(T, "ddim50")
  d = D.respace(_diffusion("eps"), keep)
  ab = AB[keep]
  ts = np.array([0, 1, 25, 49])
  shape = (len(ts), 2, 2, 1)
  x, eps, z = _rand(shape, 3), _rand(shape, 4), _rand(shape, 5)
  got = S.ddim_step(d, *(jnp.asarray(a) for a in (eps, x, ts, z)), eta=0.5, clip_denoised=False)
  for i, ti in enumerate(ts):
    a, a_prev = ab[ti], (ab[ti - 1] if ti > 0 else 1.0)
    x0 = (x[i] - np.sqrt(1 - a) * eps[i]) / np.sqrt(a)
    sigma = 0.5 * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    want = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps[i] + sigma * z[i]
    np.testing.assert_allclose(got["sample"][i], want, rtol=1e-5, atol=1e-5 / np.sqrt(a))


@pytest.mark.parametrize("var_type", ["fixed_large", "learned", "learned_range"])
def test_ddpm_step_uses_the_diffusions_variance(var_type):
  d = _diffusion("eps", var_type)
  c = 2
  shape = (len(TS), 2, 2, c)
  x, z = _rand(shape, 0), _rand(shape, 2)
  out = _rand(shape[:-1] + (2 * c if d.learned_variance else c,), 1)
  if var_type == "learned_range":
    out[..., c:] = np.tanh(out[..., c:])
  elif var_type == "learned":
    out[..., c:] = -4 + 0.5 * out[..., c:]
  got = S.ddpm_step(d, *(jnp.asarray(a) for a in (out, x, TS, z)), temperature=0.5)
  for i, ti in enumerate(TS):
    mean, log_var, _ = ref.p_mean_var(BETAS, "eps", var_type, out[i], x[i], ti, True)
    std = 0.0 if ti == 0 else 0.5 * np.exp(0.5 * log_var)  # no noise at index 0
    np.testing.assert_allclose(got["sample"][i], mean + std * z[i], rtol=1e-5, atol=1e-5)


def test_dpmpp_2m_step_is_ddim_when_first_order():
  d = _diffusion("eps")
  shape = (len(TS), 2, 2, 1)
  x, eps = jnp.asarray(_rand(shape, 0)), jnp.asarray(_rand(shape, 1))
  t = jnp.asarray(TS)
  out = D.p_mean_variance(d, eps, x, t, clip_denoised=False)
  got, _ = S.dpmpp_2m_step(d, out["pred_x0"], x, t, x * 0, jnp.zeros(len(TS)), jnp.asarray(True))
  want = S.ddim_step(d, eps, x, t, x * 0, eta=0.0, clip_denoised=False)["sample"]
  # Both go through x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab): errors scale like 1 / sqrt(ab).
  err = np.abs(np.asarray(got) - np.asarray(want)) * np.sqrt(AB[TS]).reshape(-1, 1, 1, 1)
  assert err.max() < 2e-6


def test_sde_steps_match_the_score_sde_formulas():
  """EM (eq. 6 with beta dt ~ beta_t), the ancestral predictor and the Langevin corrector
  (Algorithm 5, norms averaged over the batch), written with the score in float64."""
  d = _diffusion("eps")
  ts = np.array([1, 2, 500, T - 2])  # index 0 adds no noise; checked by the chain tests
  shape = (len(ts), 3, 3, 1)
  x, eps, z = _rand(shape, 0), _rand(shape, 1), _rand(shape, 2)
  b = BETAS[ts].reshape(-1, 1, 1, 1)
  score = -eps / np.sqrt(1 - AB[ts]).reshape(-1, 1, 1, 1)
  args = [jnp.asarray(eps, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(ts)]
  args.append(jnp.asarray(z, jnp.float32))
  kw = dict(clip_denoised=False, temperature=0.7)
  em = S.euler_maruyama_step(d, *args, **kw)["sample"]
  np.testing.assert_allclose(em, x + 0.5 * b * x + b * score + 0.7 * np.sqrt(b) * z, atol=2e-5)
  anc = S.ancestral_step(d, *args, **kw)["sample"]
  want = (x + b * score) / np.sqrt(1 - b) + 0.7 * np.sqrt(b) * z
  np.testing.assert_allclose(anc, want, atol=5e-5)
  lan = S.langevin_step(d, *args, snr=0.16, **kw)["sample"]
  norm = lambda a: np.sqrt((a**2).sum(axis=(1, 2, 3))).mean()  # noqa: E731
  step = 2 * (1 - b) * (0.16 * norm(z) / norm(score)) ** 2
  np.testing.assert_allclose(lan, x + step * score + 0.7 * np.sqrt(2 * step) * z, atol=2e-5)


# ----------------------------------------------------------------------------- guidance


def test_guidance_combines_cond_and_uncond_in_one_call():
  calls = []

  def model(x, t, y):
    calls.append(x.shape[0])
    mean = jnp.sin(x) + 0.2 * y.reshape(-1, 1, 1, 1) + 1e-3 * t.reshape(-1, 1, 1, 1)
    var = jnp.cos(x) + y.reshape(-1, 1, 1, 1)  # "variance" channels depend on the label too
    return jnp.concatenate([mean, var], axis=-1)

  x, t, y = jnp.asarray(_rand((3, 2, 2, 2))), jnp.array([5, 6, 7]), jnp.array([1, 2, 3])
  null = 10
  got = S.guided_model_output(model, x, t, y, guidance_scale=3.0, null_label=null)
  assert calls == [6]  # one call on the doubled batch
  cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, null))
  np.testing.assert_allclose(
    got[..., :2], uncond[..., :2] + 3.0 * (cond[..., :2] - uncond[..., :2]), atol=1e-6
  )
  np.testing.assert_array_equal(got[..., 2:], cond[..., 2:])  # conditional variance kept
  calls.clear()
  np.testing.assert_array_equal(S.guided_model_output(model, x, t, y, guidance_scale=1.0), cond)
  assert calls == [3]  # g = 1: the conditional model on the batch as it is


def test_guided_sample_in_one_step():
  """One DDIM step from index 0 returns x0_hat of the guided eps."""
  d = _diffusion("eps")
  shape, null, g = (4, 2, 2, 1), 7, 2.5
  x_T = jnp.asarray(_rand(shape), jnp.float32)
  y = jnp.array([0, 1, 2, 3])
  key = jax.random.key(0)
  kw = dict(sampler="ddim", num_steps=1, labels=y, clip_denoised=False, x_T=x_T)
  got = S.sample(d, _toy_model, key, shape, guidance_scale=g, null_label=null, **kw)
  t = jnp.zeros(4, jnp.int32)
  cond, uncond = _toy_model(x_T, t, y), _toy_model(x_T, t, jnp.full_like(y, null))
  eps = uncond + g * (cond - uncond)
  want = (np.asarray(x_T, np.float64) - np.sqrt(1 - AB[0]) * eps) / np.sqrt(AB[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # guidance_scale = 1 is the conditional model, exactly.
  one = S.sample(d, _toy_model, key, shape, guidance_scale=1.0, null_label=null, **kw)
  cond_only = S.sample(d, _toy_model, key, shape, **kw)
  np.testing.assert_array_equal(one, cond_only)
  want = (np.asarray(x_T, np.float64) - np.sqrt(1 - AB[0]) * cond) / np.sqrt(AB[0])
  np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- whole chains

SHAPE = (8, 2, 2, 1)


def _steps_for(sampler):
  return {"ddpm": 10, "ddim": 10, "dpm++2m": 10, "euler_maruyama": 10, "pc": 5}.get(sampler, 5)


def _run(sampler, key=0, **overrides):
  """The options most chain tests share (so they share one compiled sampler each):
  labels with guidance, eta = 1, and the trajectory."""
  opts = dict(
    sampler=sampler,
    num_steps=_steps_for(sampler),
    eta=1.0,
    labels=jnp.arange(SHAPE[0]) % 3,
    guidance_scale=2.0,
    null_label=3,
    return_trajectory=True,
  )
  opts.update(overrides)
  return S.sample(_diffusion("eps"), _toy_model, jax.random.key(key), SHAPE, **opts)


@pytest.mark.parametrize("sampler", S.samplers_for("ddpm"))  # flow's: tests/test_flow.py
def test_sampler_traces_once(sampler):
  """The jitted sampler compiles once: new schedule, params, key and x_T are all data."""
  chex.clear_trace_counter()

  def apply(params, x, t):
    return params["w"] * x + params["b"] * t.reshape(-1, 1, 1, 1)

  cosine = D.make_diffusion(schedules.get_betas("cosine", T), var_type="fixed_large")
  if S.get_sampler(sampler).spacing == "sigma":  # the chain seen on a sigma grid
    d, d2 = (P.vp_sigma_grid(c, 4) for c in (_diffusion("eps", "fixed_large"), cosine))
  else:
    keep = D.space_timesteps(T, _steps_for(sampler))
    d, d2 = (D.respace(c, keep) for c in (_diffusion("eps", "fixed_large"), cosine))
  fn = jax.jit(chex.assert_max_traces(S.make_sampler(sampler, eta=0.5), n=1))
  x = fn(d, jax.tree_util.Partial(apply, {"w": 0.1, "b": 1e-4}), jax.random.key(0), jnp.ones(SHAPE))
  x2 = fn(
    d2,
    jax.tree_util.Partial(apply, {"w": 0.2, "b": 0.0}),
    jax.random.key(1),
    jnp.full(SHAPE, -0.5, jnp.float32),
  )
  chex.assert_shape([x, x2], SHAPE)
  chex.assert_tree_all_finite([x, x2])
  assert not np.allclose(x, x2)


def test_sample_reuses_its_compiled_sampler():
  """sample() called again with a new key / x_T / schedule traces the model no more."""
  chex.clear_trace_counter()
  counted = chex.assert_max_traces(_toy_model, n=1)
  cosine = D.make_diffusion(schedules.get_betas("cosine", T))
  for seed, d in enumerate([_diffusion("eps"), _diffusion("eps"), cosine]):
    x = S.sample(d, counted, jax.random.key(seed), (2, 2, 2, 1), sampler="ddim", num_steps=7)
    chex.assert_tree_all_finite(x)


@pytest.mark.parametrize("sampler", S.samplers_for("ddpm"))  # flow's: tests/test_flow.py
def test_same_seed_same_images_different_seed_different(sampler):
  a, _ = _run(sampler, key=0)
  b, _ = _run(sampler, key=0)
  c, _ = _run(sampler, key=1)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("sampler", S.samplers_for("ddpm"))  # flow's: tests/test_flow.py
def test_trajectory_starts_at_x_T_and_ends_at_the_sample(sampler):
  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  x, traj = _run(sampler, x_T=x_T)
  chex.assert_shape(traj, (_steps_for(sampler) + 1, *SHAPE))
  np.testing.assert_array_equal(traj[0], x_T)
  np.testing.assert_array_equal(traj[-1], x)


def test_eta0_ddim_is_deterministic_given_x_T():
  x_T = jax.random.normal(jax.random.key(5), SHAPE)
  a, _ = _run("ddim", key=0, eta=0.0, x_T=x_T)
  b, _ = _run("ddim", key=1, eta=0.0, x_T=x_T)
  np.testing.assert_array_equal(a, b)
  c, _ = _run("ddim", key=1, eta=1.0, x_T=x_T)
  assert not np.allclose(a, c)  # eta > 0 injects noise


def test_clip_denoised_keeps_ddim_and_dpmpp_in_range():
  d = _diffusion("x0")
  wild = lambda x, t: 5.0 * jnp.sign(x) + x  # noqa: E731  x0 estimates far outside [-1, 1]
  for sampler in ("ddim", "dpm++2m"):
    x = S.sample(d, wild, jax.random.key(0), SHAPE, sampler=sampler, num_steps=5)
    assert float(jnp.max(jnp.abs(x))) <= 1.0
  x = S.sample(d, wild, jax.random.key(0), SHAPE, num_steps=5, clip_denoised=False)
  assert float(jnp.max(jnp.abs(x))) > 1.0


def test_temperature_scales_the_injected_noise():
  x_T = jax.random.normal(jax.random.key(3), SHAPE)
  a, _ = _run("ddpm", key=0, x_T=x_T, temperature=0.0)
  b, _ = _run("ddpm", key=1, x_T=x_T, temperature=0.0)
  np.testing.assert_array_equal(a, b)  # no noise: the chain of means


# (sampler, options, whether it injects noise): every registered sampler.
_TEMPERATURE_CASES = [
  ("ddpm", {}, True),
  ("ddim", {"eta": 0.0}, False),
  ("ddim", {"eta": 0.3}, True),
  ("dpm++2m", {}, False),
  ("euler_maruyama", {}, True),
  ("pc", {}, True),
  ("euler", {}, False),
  ("heun", {}, False),
  ("edm_stochastic", {}, False),  # s_churn absent: 0, Heun's steps
  ("edm_stochastic", {"s_churn": 2.0}, True),
  ("vdm", {}, True),
  ("vdm_ddim", {}, False),
]


@pytest.mark.parametrize("sampler, options, noisy", _TEMPERATURE_CASES)
def test_temperature_only_where_noise_is_injected(sampler, options, noisy):
  """Every registered sampler is in the table. A temperature other than 1 is refused, naming the
  value and the sampler, where it would scale no noise; 1.0 is always allowed."""
  assert S.injects_noise(sampler, options) is noisy
  S.make_sampler(sampler, temperature=1.0, **options)
  if noisy:
    S.make_sampler(sampler, temperature=0.5, **options)
  else:
    want = rf"^temperature=0\.5: sampler '{re.escape(sampler)}' is deterministic here "
    with pytest.raises(ValueError, match=want + r".*allowed: 1\.0, or a sampler that adds noise"):
      S.make_sampler(sampler, temperature=0.5, **options)


def test_the_temperature_table_covers_the_registry():
  tested = {case[0] for case in _TEMPERATURE_CASES}
  assert tested == set(S.SAMPLERS)


# ----------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def mesh8():
  assert len(jax.devices()) == 8, "tests/conftest.py simulates 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("sampler", S.samplers_for("ddpm"))  # flow's: tests/test_flow.py
def test_sharded_sampling_matches_one_device(sampler, mesh8):
  x1, traj1 = _run(sampler)
  x8, traj8 = _run(sampler, mesh=mesh8)
  assert len(x8.sharding.device_set) == 8
  np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(traj8, traj1, rtol=1e-5, atol=1e-5)


def test_sharding_accepts_explicit_meshes_and_checks_the_batch():
  explicit = jax.make_mesh((8,), ("data",))  # Explicit axes by default in JAX 0.10
  x1, _ = _run("ddim")
  x8, _ = _run("ddim", mesh=explicit)
  np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-5)
  d, key = _diffusion("eps"), jax.random.key(0)
  with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the 8 devices"):
    S.sample(d, _toy_model, key, (6, 2, 2, 1), num_steps=5, mesh=explicit)
  with pytest.raises(ValueError, match=r"mesh needs a 'data' axis"):
    S.sample(d, _toy_model, key, SHAPE, mesh=jax.make_mesh((8,), ("batch",)))


def test_sample_in_chunks_pads_the_last_chunk_and_reuses_one_compilation(mesh8):
  chex.clear_trace_counter()
  d = _diffusion("eps")
  counted = chex.assert_max_traces(_toy_model, n=1)  # also proves one compilation
  labels = np.arange(20) % 4
  kw = dict(sampler="ddim", num_steps=4, guidance_scale=1.5, null_label=4, mesh=mesh8)
  key = jax.random.key(0)
  out = S.sample_in_chunks(d, counted, key, 20, (2, 2, 1), batch_size=8, labels=labels, **kw)
  assert out.shape == (20, 2, 2, 1) and isinstance(out, np.ndarray)
  first = S.sample(d, counted, jax.random.fold_in(key, 0), SHAPE, labels=labels[:8], **kw)
  np.testing.assert_array_equal(out[:8], first)
  last_labels = np.resize(labels[16:], 8)
  last = S.sample(d, counted, jax.random.fold_in(key, 2), SHAPE, labels=last_labels, **kw)
  np.testing.assert_array_equal(out[16:], last[:4])


# ----------------------------------------------------------------------------- known distribution


@pytest.mark.parametrize(
  "sampler,num_steps,mean_type,tol",
  [
    # DDIM (first order) on the full schedule; measured max error 0.0032.
    ("ddim", 1000, "eps", 5e-3),
    # DPM-Solver++(2M): measured max error 0.022 at 20 steps, 0.0035 at 50 (second order).
    ("dpm++2m", 20, "eps", 0.03),
    ("dpm++2m", 20, "v", 0.03),
    ("dpm++2m", 50, "x0", 6e-3),
  ],
)
def test_ode_samplers_follow_the_exact_flow(sampler, num_steps, mean_type, tol):
  """For Gaussian data the PF-ODE maps x_T to MU + SD z(x_T); checked sample by sample."""
  d = _diffusion(mean_type)
  x_T = jnp.linspace(-3.0, 3.0, 64).reshape(16, 2, 2, 1)  # |z| up to 3
  steps = S.sampler_timesteps(d, num_steps, sampler=sampler)
  x = S.sample(
    d,
    GAUSSIAN[mean_type],
    jax.random.key(0),
    x_T.shape,
    sampler=sampler,
    num_steps=num_steps,
    clip_denoised=False,
    x_T=x_T,
  )
  np.testing.assert_allclose(x, _flow_endpoint(x_T, steps[-1]), atol=tol)


_DISTRIBUTION_CASES = [
  # sampler, options, (measured mean bias, measured std bias)
  ("ddpm", dict(), (0.000, -0.005)),  # all 1000 steps, fixed_small
  ("ddpm", dict(num_steps=100, var_type="fixed_large"), (-0.001, 0.009)),
  ("ddim", dict(num_steps=50), (-0.001, -0.027)),  # first order, 50 time-uniform steps
  ("dpm++2m", dict(num_steps=20), (-0.001, 0.008)),
  ("euler_maruyama", dict(num_steps=250), (-0.001, 0.005)),
  ("pc", dict(num_steps=200), (0.000, 0.006)),
]


@pytest.mark.parametrize("sampler,opts,bias", _DISTRIBUTION_CASES, ids=lambda v: str(v))
def test_samples_have_the_data_mean_and_std(sampler, opts, bias):
  opts = dict(opts)
  d = _diffusion("eps", opts.pop("var_type", "fixed_small"))
  x = S.sample(
    d,
    GAUSSIAN["eps"],
    jax.random.key(1),
    (2000, 2, 2, 1),
    sampler=sampler,
    clip_denoised=False,
    **opts,
  )
  x = np.asarray(x, np.float64)
  assert abs(x.mean() - MU) < abs(bias[0]) + 4 * 0.0056, x.mean()
  assert abs(x.std() - SD) < abs(bias[1]) + 4 * 0.004, x.std()


def test_mean_types_give_the_same_steps():
  """eps, x0 and v predictions of the same optimal model give every step the same update."""
  shape = (len(TS), 2, 2, 1)
  x = jnp.asarray(_rand(shape, 0), jnp.float32)
  z = jnp.asarray(_rand(shape, 1), jnp.float32)
  t = jnp.asarray(TS)
  kw = dict(clip_denoised=False)
  steps = {
    "ddpm": lambda d, o: S.ddpm_step(d, o, x, t, z, **kw)["sample"],
    "ddim": lambda d, o: S.ddim_step(d, o, x, t, z, eta=0.5, **kw)["sample"],
    "euler_maruyama": lambda d, o: S.euler_maruyama_step(d, o, x, t, z, **kw)["sample"],
    "ancestral": lambda d, o: S.ancestral_step(d, o, x, t, z, **kw)["sample"],
    "langevin": lambda d, o: S.langevin_step(d, o, x, t, z, **kw)["sample"],
    "pred_x0": lambda d, o: D.p_mean_variance(d, o, x, t, **kw)["pred_x0"],
  }
  results = {
    m: {k: f(_diffusion(m), GAUSSIAN[m](x, t)) for k, f in steps.items()} for m in D.MEAN_TYPES
  }
  for m in ("x0", "v"):
    # x0 from eps divides by sqrt(alpha_bar) (~0.006 at t = T-1): scale the tolerance.
    scale = 1 / np.sqrt(AB[TS]).reshape(-1, 1, 1, 1)
    for k in steps:
      err = np.abs(np.asarray(results[m][k]) - np.asarray(results["eps"][k])) / scale
      assert err.max() < 1e-5, (m, k, err.max())


# ----------------------------------------------------------------------------- spacing and errors


def test_sampler_timesteps():
  d = _diffusion()
  assert S.sampler_timesteps(d, None, sampler="ddim") == list(range(T))
  assert S.sampler_timesteps(d, 50, sampler="ddim") == list(range(0, T, 20))
  # No stride gives exactly 600 of 1000 steps: DDIM falls back to sections.
  assert S.sampler_timesteps(d, 600, sampler="ddim") == D.space_timesteps(T, 600)
  assert S.sampler_timesteps(d, 25, sampler="ddpm") == D.space_timesteps(T, 25)
  for n in (1, 2, 20, 300, 999):
    kept = S.sampler_timesteps(d, n, sampler="dpm++2m")
    assert len(kept) == n and kept[-1] == T - 1 and (n == 1 or kept[0] == 0)
    assert all(a < b for a, b in zip(kept, kept[1:], strict=False))
  kept = S.sampler_timesteps(d, 20, sampler="dpm++2m")
  lam = 0.5 * np.log(AB[kept] / (1 - AB[kept]))
  gaps = -np.diff(lam)
  assert gaps.max() < 1.5 * gaps.mean()  # roughly uniform in logSNR


def test_errors():
  d = _diffusion()
  key, shape = jax.random.key(0), (2, 2, 2, 1)
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; allowed: ddpm, ddim, dpm\+\+2m"):
    S.sample(d, _toy_model, key, shape, sampler="lms")
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; allowed: ddpm, ddim"):
    S.make_sampler("lms")
  with pytest.raises(
    ValueError, match=r"guidance_scale=3.0 needs class labels .* labels not given"
  ):
    S.sample(d, _toy_model, key, shape, guidance_scale=3.0, null_label=10)
  with pytest.raises(ValueError, match=r"null_label not given"):
    S.sample(d, _toy_model, key, shape, guidance_scale=3.0, labels=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"num_steps=2000 must be in 1..1000"):
    S.sample(d, _toy_model, key, shape, num_steps=2000)
  with pytest.raises(
    ValueError, match=r"unknown spacing 'cosine'; allowed: sections, ddim, logsnr"
  ):
    S.sample(d, _toy_model, key, shape, num_steps=10, spacing="cosine")
  with pytest.raises(ValueError, match=r"x_T has shape \(3, 2, 2, 1\), expected \(2, 2, 2, 1\)"):
    S.sample(d, _toy_model, key, shape, x_T=jnp.zeros((3, 2, 2, 1)))
  with pytest.raises(ValueError, match=r"unknown predictor 'heun'"):
    S.make_sampler("pc", predictor="heun")


# ----------------------------------------------------------------------------- the registry


class _RenoiseCarry(NamedTuple):
  x: jax.Array
  steps: jax.Array  # a second field: the carry beyond x is the sampler's own


def _renoise_sampler(*, clip_denoised=True, scale=1.0):
  """A sampler defined outside the package: jump to x0_hat, then re-noise to the previous level,
  x_{t-1} = sqrt(ab_{t-1}) x0_hat + scale sqrt(1 - ab_{t-1}) z."""

  def init(x_T, chain):
    return _RenoiseCarry(x_T, jnp.zeros((), jnp.int32))

  def step(carry, i, t_index, chain):
    out, t = chain.model(carry.x, t_index)
    x0 = D.p_mean_variance(chain.d, out, carry.x, t, clip_denoised=clip_denoised)["pred_x0"]
    ab_prev = jnp.where(t > 0, chain.d.alphas_cumprod[jnp.maximum(t - 1, 0)], 1.0)
    ab_prev = ab_prev.reshape(-1, 1, 1, 1)
    z = chain.noise(jax.random.fold_in(chain.key, i))
    x = jnp.sqrt(ab_prev) * x0 + scale * jnp.sqrt(1 - ab_prev) * z
    return _RenoiseCarry(x, carry.steps + 1)

  return S.Sampler(init, step)


@pytest.fixture
def renoise():
  """The test's own sampler in the registry for one test: one call, no driver change."""
  S.register_sampler(
    "renoise", _renoise_sampler, spacing="ddim", options=("clip_denoised", "scale")
  )
  yield "renoise"
  del S.REGISTRY["renoise"]


def test_samplers_is_the_registrys_names(renoise):
  assert "ddim" in S.SAMPLERS and "lms" not in S.SAMPLERS
  assert ", ".join(S.SAMPLERS) == (
    "ddpm, ddim, dpm++2m, euler_maruyama, pc, euler, heun, edm_stochastic, vdm, vdm_ddim, renoise"
  )
  assert tuple(S.REGISTRY) == S.SAMPLERS and len(S.SAMPLERS) == 11 and S.SAMPLERS[-1] == renoise
  chain = ("ddpm", "ddim", "dpm++2m", "euler_maruyama", "pc")
  sigma = ("euler", "heun", "edm_stochastic")  # the sigma samplers run the chain too
  assert S.samplers_for("ddpm") == (*chain, *sigma, renoise)
  assert S.samplers_for("flow") == ("ddim", "dpm++2m", "euler", "heun")
  assert S.samplers_for("vdm") == ("dpm++2m", "vdm", "vdm_ddim")
  with pytest.raises(ValueError, match=r"sampler 'renoise' is already registered"):
    S.register_sampler("renoise", _renoise_sampler)


def test_every_registered_sampler_runs_through_sample():
  for sampler in S.samplers_for("ddpm"):  # the flow samplers: tests/test_flow.py
    x, traj = _run(sampler)  # compiled already by the chain tests above
    chex.assert_shape(traj, (_steps_for(sampler) + 1, *SHAPE))
    chex.assert_tree_all_finite(traj)
    np.testing.assert_array_equal(traj[-1], x)


def test_unknown_sampler_error_lists_the_registry(renoise):
  allowed = (
    r"allowed: ddpm, ddim, dpm\+\+2m, euler_maruyama, pc, euler, heun, edm_stochastic, vdm,"
    r" vdm_ddim, renoise$"
  )
  d, key = _diffusion(), jax.random.key(0)
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; " + allowed):
    S.sample(d, _toy_model, key, SHAPE, sampler="lms")
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; " + allowed):
    S.sampler_timesteps(d, 10, sampler="lms")
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; " + allowed):
    S.make_sampler("lms")


def test_a_sampler_registered_outside_runs_through_sample(renoise):
  d = _diffusion("eps")
  # Its registered spacing is DDIM's stride: 1000 / 5 steps apart.
  steps = S.sampler_timesteps(d, _steps_for(renoise), sampler=renoise)
  assert steps == [0, 200, 400, 600, 800]
  x_T = jnp.asarray(_rand(SHAPE, 7), jnp.float32)
  x, traj = _run(renoise, x_T=x_T, scale=0.5)  # scale: its own option, through sample()
  # The same chain in float64, with the driver's guidance and noise (step i: fold_in(key, i)).
  key_steps = jax.random.split(jax.random.key(0))[1]
  y, g, null = np.arange(SHAPE[0]) % 3, 2.0, 3
  want = np.asarray(x_T, np.float64)
  for i, k in enumerate(range(len(steps) - 1, -1, -1)):
    t, xf = jnp.full(SHAPE[0], steps[k]), jnp.asarray(want, jnp.float32)
    cond, uncond = (
      np.asarray(_toy_model(xf, t, jnp.asarray(c)), np.float64) for c in (y, np.full_like(y, null))
    )
    eps = uncond + g * (cond - uncond)
    x0 = np.clip((want - np.sqrt(1 - AB[steps[k]]) * eps) / np.sqrt(AB[steps[k]]), -1, 1)
    ab_prev = AB[steps[k - 1]] if k > 0 else 1.0
    z = np.asarray(jax.random.normal(jax.random.fold_in(key_steps, i), SHAPE), np.float64)
    want = np.sqrt(ab_prev) * x0 + 0.5 * np.sqrt(1 - ab_prev) * z
    np.testing.assert_allclose(traj[i + 1], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(x, traj[-1])
  with pytest.raises(ValueError, match=r"sampler 'ddim' takes no option scale; its options: eta"):
    S.sample(d, _toy_model, jax.random.key(0), SHAPE, sampler="ddim", scale=0.5)


def test_package_example_runs():
  result = doctest.testmod(S, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------- run configs


def _conditional_config(num_classes=3, guidance_scale=2.0):
  config = tiny.get_config()
  with config.unlocked():
    config.model.class_conditional = True
    config.data.num_classes = num_classes
    config.sampling.guidance_scale = guidance_scale
  return config


def test_sampler_kwargs_reads_the_config():
  config = tiny.get_config()  # unconditional, DDIM, 5 steps
  want = dict(sampler="ddim", num_steps=5, eta=0.0, clip_denoised=True, guidance_scale=1.0)
  want.update(null_label=None, temperature=1.0, spacing=None)  # "": the sampler's own spacing
  assert S.sampler_kwargs(config) == want
  # None means "the config's value"; anything else overrides it.
  assert S.sampler_kwargs(config, sampler=None, num_steps=None, eta=None) == want
  got = S.sampler_kwargs(config, sampler="pc", num_steps=7, eta=0.5, temperature=0.7)
  assert got == {**want, "sampler": "pc", "num_steps": 7, "eta": 0.5, "temperature": 0.7}
  assert S.sampler_kwargs(config, spacing="trailing")["spacing"] == "trailing"
  assert S.class_labels(config, 4) is None
  # Class-conditional: the null label is num_classes, guidance comes from the config.
  config = _conditional_config(num_classes=10, guidance_scale=3.0)
  got = S.sampler_kwargs(config)
  assert got == {**want, "guidance_scale": 3.0, "null_label": 10}
  assert S.sampler_kwargs(config, guidance_scale=1.0)["guidance_scale"] == 1.0
  np.testing.assert_array_equal(S.class_labels(config, 12), np.arange(12) % 10)
  np.testing.assert_array_equal(S.class_labels(config, 3, class_label=7), [7, 7, 7])


def test_sampler_kwargs_feed_sample():
  """A class-conditional config's kwargs and labels are the options of the chain tests."""
  config = _conditional_config(num_classes=3, guidance_scale=2.0)
  with config.unlocked():
    config.sampling.num_steps = 10
  kw = S.sampler_kwargs(config, eta=1.0)
  labels = S.class_labels(config, SHAPE[0])
  x, _ = S.sample(
    _diffusion("eps"), _toy_model, jax.random.key(0), SHAPE, labels=labels,
    return_trajectory=True, **kw,
  )  # fmt: skip
  np.testing.assert_array_equal(x, _run("ddim", key=0)[0])


def test_sampler_kwargs_errors():
  config = tiny.get_config()
  with pytest.raises(ValueError, match=r"guidance_scale=3.0 needs a class-conditional model"):
    S.sampler_kwargs(config, guidance_scale=3.0)
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; allowed: ddpm, ddim"):
    S.sampler_kwargs(config, sampler="lms")
  with pytest.raises(ValueError, match=r"class_label=1 needs a class-conditional model"):
    S.class_labels(config, 4, class_label=1)
  with pytest.raises(ValueError, match=r"class_label=3 must be in 0..2"):
    S.class_labels(_conditional_config(num_classes=3), 4, class_label=3)
