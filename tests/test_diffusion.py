"""The Gaussian diffusion maths against the float64 reference.

Tolerances: buffers are float32 casts of float64 values, so rtol 2e-6 (a few
ulps). Functions of float32 inputs are compared with rtol 1e-5 and an atol
scaled by the largest coefficient involved (1/sqrt(alpha_bar) reaches ~160 at
t = T-1 of the linear schedule).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import diffusion as D
from jaxdiff.core import schedules
from tests import reference as ref

T = 1000
BETAS = schedules.get_betas("linear", T)
TS = np.array([0, 1, 2, 500, T - 2, T - 1])  # the edges and the middle


SHAPE = (len(TS), 4, 4, 3)


def _data(shape=SHAPE, seed=0, n=1):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape) for _ in range(n)]


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


@pytest.fixture(scope="module")
def d():
  return D.make_diffusion(BETAS, mean_type="eps", var_type="fixed_small")


def test_buffers_match_reference(d):
  ab = ref.alpha_bar(BETAS)
  ab_prev = np.append(1.0, ab[:-1])
  post_var = np.array([ref.posterior(BETAS, np.zeros(1), np.zeros(1), t)[1] for t in range(T)])
  expected = {
    "betas": BETAS,
    "alphas_cumprod": ab,
    "alphas_cumprod_prev": ab_prev,
    "one_minus_alphas_cumprod": 1 - ab,
    "sqrt_alphas_cumprod": np.sqrt(ab),
    "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
    "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
    "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ab - 1),
    "posterior_variance": post_var,
    "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
    "fixed_large_variance": np.append(post_var[1], BETAS[1:]),
  }
  for name, want in expected.items():
    got = getattr(d, name)
    assert got.dtype == jnp.float32, name
    np.testing.assert_allclose(
      np.asarray(got, np.float64), want, rtol=2e-6, atol=1e-30, err_msg=name
    )
  np.testing.assert_array_equal(d.timestep_map, np.arange(T))


def test_float32_buffers_keep_small_values(d):
  # 1 - alpha_bar_0 = beta_0 = 1e-4; formed in float32 it would keep ~3 digits.
  assert float(d.one_minus_alphas_cumprod[0]) == pytest.approx(1e-4, rel=1e-6)
  assert float(d.sqrt_one_minus_alphas_cumprod[0]) ** 2 == pytest.approx(1e-4, rel=1e-6)
  assert float(d.posterior_variance[1]) == pytest.approx(
    ref.posterior(BETAS, np.zeros(1), np.zeros(1), 1)[1], rel=1e-6
  )


@pytest.mark.parametrize("jit", [False, True])
def test_q_functions(d, jit):
  x0, noise, xt = _data(n=3)
  t = jnp.asarray(TS)
  mean, var, log_var = _maybe_jit(D.q_mean_variance, jit)(d, jnp.asarray(x0), t)
  sample = _maybe_jit(D.q_sample, jit)(d, jnp.asarray(x0), t, jnp.asarray(noise))
  pmean, pvar, plog = _maybe_jit(D.q_posterior_mean_variance, jit)(
    d, jnp.asarray(x0), jnp.asarray(xt), t
  )
  for arr in (mean, var, log_var, sample, pmean, pvar, plog):
    chex.assert_shape(arr, x0.shape)
  for i, ti in enumerate(TS):
    m, v = ref.q_mean_var(BETAS, x0[i], ti)
    np.testing.assert_allclose(mean[i], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[i], v, rtol=2e-6)
    np.testing.assert_allclose(log_var[i], np.log(v), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(sample[i], m + np.sqrt(v) * noise[i], rtol=1e-5, atol=1e-5)
    pm, pv = ref.posterior(BETAS, x0[i], xt[i], ti)
    np.testing.assert_allclose(pmean[i], pm, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pvar[i], pv, rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(plog[i], np.log(ref.posterior_var_clipped(BETAS, ti)), rtol=2e-6)


def test_posterior_at_t0_is_x0_with_clipped_log_variance(d):
  x0, xt = _data(shape=(2, 3, 3, 1), n=2)
  t = jnp.zeros((2,), jnp.int32)
  mean, var, log_var = D.q_posterior_mean_variance(d, jnp.asarray(x0), jnp.asarray(xt), t)
  np.testing.assert_allclose(mean, x0, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(var, 0.0)
  np.testing.assert_allclose(log_var, np.log(ref.posterior_var_clipped(BETAS, 1)), rtol=2e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_predictions_and_v(d, jit):
  x0, eps = _data(n=2)
  t = jnp.asarray(TS)
  xt = np.stack([ref.q_mean_var(BETAS, x0[i], ti)[0] for i, ti in enumerate(TS)])
  xt = xt + np.stack([np.sqrt(ref.q_mean_var(BETAS, 0, ti)[1]) * eps[i] for i, ti in enumerate(TS)])
  j = lambda f: _maybe_jit(f, jit)  # noqa: E731
  got_x0 = j(D.predict_x0_from_eps)(d, jnp.asarray(xt), t, jnp.asarray(eps))
  got_eps = j(D.predict_eps_from_x0)(d, jnp.asarray(xt), t, jnp.asarray(x0))
  got_v = j(D.predict_v)(d, jnp.asarray(x0), t, jnp.asarray(eps))
  for i, ti in enumerate(TS):
    scale = 1 / np.sqrt(ref.alpha_bar(BETAS)[ti])  # error grows like 1/sqrt(alpha_bar)
    np.testing.assert_allclose(
      got_x0[i], ref.x0_from_eps(BETAS, xt[i], ti, eps[i]), atol=3e-6 * scale
    )
    np.testing.assert_allclose(got_x0[i], x0[i], atol=3e-6 * scale)
    # eps from x0 divides by sqrt(1 - alpha_bar), ~0.01 at t = 0.
    tol = 3e-6 / np.sqrt(1 - ref.alpha_bar(BETAS)[ti])
    np.testing.assert_allclose(got_eps[i], ref.eps_from_x0(BETAS, xt[i], ti, x0[i]), atol=tol)
    np.testing.assert_allclose(got_v[i], ref.v_target(BETAS, x0[i], ti, eps[i]), atol=1e-5)
  x0_v = j(D.predict_x0_from_v)(d, jnp.asarray(xt), t, got_v)
  eps_v = j(D.predict_eps_from_v)(d, jnp.asarray(xt), t, got_v)
  np.testing.assert_allclose(x0_v, x0, atol=2e-5)
  np.testing.assert_allclose(eps_v, eps, atol=2e-5)


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
@pytest.mark.parametrize("var_type", D.VAR_TYPES)
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance(mean_type, var_type, clip):
  d = D.make_diffusion(BETAS, mean_type=mean_type, var_type=var_type)
  (xt,) = _data(n=1)
  c = xt.shape[-1]
  rng = np.random.default_rng(1)
  out = rng.standard_normal(xt.shape[:-1] + (2 * c if d.learned_variance else c,))
  if var_type == "learned_range":
    out[..., c:] = np.tanh(out[..., c:])  # the interpolation weight lives in [-1, 1]
  if var_type == "learned":
    out[..., c:] = -3 + out[..., c:]  # a log-variance
  t = jnp.asarray(TS)
  got = jax.jit(D.p_mean_variance, static_argnames="clip_denoised")(
    d, jnp.asarray(out), jnp.asarray(xt), t, clip_denoised=clip
  )
  assert set(got) >= {"mean", "variance", "log_variance", "pred_x0"}
  for i, ti in enumerate(TS):
    mean, log_var, x0 = ref.p_mean_var(BETAS, mean_type, var_type, out[i], xt[i], ti, clip)
    scale = 1 / np.sqrt(ref.alpha_bar(BETAS)[ti]) if mean_type == "eps" and not clip else 1.0
    np.testing.assert_allclose(got["pred_x0"][i], x0, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got["mean"][i], mean, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got["log_variance"][i], log_var, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["variance"][i], np.exp(log_var), rtol=1e-5)
  if clip:
    assert float(jnp.max(jnp.abs(got["pred_x0"]))) <= 1.0


def test_p_mean_variance_rejects_wrong_output_shapes():
  d = D.make_diffusion(BETAS, var_type="learned")
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="needs a model output with 2\\*C channels, got 3"):
    D.p_mean_variance(d, x, x, jnp.zeros((2,), jnp.int32))
  d = D.make_diffusion(BETAS)
  with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 6\), expected \(2, 4, 4, 3\)"):
    D.p_mean_variance(d, jnp.zeros((2, 4, 4, 6)), x, jnp.zeros((2,), jnp.int32))


def test_q_sample_matches_iterating_the_forward_chain(d):
  """x_t from q(x_t|x_0) in one jump has the law of t single steps q(x_s|x_{s-1})."""
  n, x0_value = 200_000, 0.7
  rng = np.random.default_rng(0)
  checkpoints = [0, 9, 99, 499, T - 1]
  x = np.full(n, x0_value)
  iterated = {}
  for s in range(T):
    x = np.sqrt(1 - BETAS[s]) * x + np.sqrt(BETAS[s]) * rng.standard_normal(n)
    if s in checkpoints:
      iterated[s] = x.copy()
  key = jax.random.key(0)
  for s in checkpoints:
    t = jnp.full((n,), s, jnp.int32)
    jumped = np.asarray(
      D.q_sample(d, jnp.full((n, 1, 1, 1), x0_value), t, jax.random.normal(key, (n, 1, 1, 1)))
    ).ravel()
    sd = np.sqrt(1 - ref.alpha_bar(BETAS)[s])
    # Means agree within 5 standard errors of their difference; sds within 2%.
    se = sd * np.sqrt(2 / n)
    assert abs(jumped.mean() - iterated[s].mean()) < 5 * se, s
    assert jumped.std() == pytest.approx(iterated[s].std(), rel=0.02), s
    assert iterated[s].std() == pytest.approx(sd, rel=0.02), s
    # And the quartiles of the two samples agree.
    np.testing.assert_allclose(
      np.quantile(jumped, [0.25, 0.5, 0.75]),
      np.quantile(iterated[s], [0.25, 0.5, 0.75]),
      atol=6 * se + 1e-3,
    )


def test_jit_traces_once_and_diffusion_is_a_pytree(d):
  leaves = jax.tree.leaves(d)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert "mean_type" not in str([type(x) for x in leaves])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(dd, x0, t, noise):
    return D.q_sample(dd, x0, t, noise)

  x = jnp.ones((2, 4, 4, 1))
  t = jnp.array([0, T - 1])
  f(d, x, t, x)
  f(d, x * 2, t[::-1], x)
  # Another schedule of the same length reuses the compiled code: it is data.
  f(D.make_diffusion(schedules.get_betas("cosine", T)), x, t, x)


def test_make_diffusion_errors():
  with pytest.raises(ValueError, match=r"unknown mean_type 'epsilon'; allowed: eps, x0, v"):
    D.make_diffusion(BETAS, mean_type="epsilon")
  with pytest.raises(ValueError, match=r"unknown var_type 'fixed'; allowed: fixed_small"):
    D.make_diffusion(BETAS, var_type="fixed")
  with pytest.raises(ValueError, match=r"beta\[1\] = 1.2"):
    D.make_diffusion([0.1, 1.2])
  with pytest.raises(ValueError, match=r"timestep_map must have shape \(3,\)"):
    D.make_diffusion([0.1, 0.2, 0.3], timestep_map=[0, 1])


def test_single_step_diffusion_is_well_defined():
  d = D.make_diffusion([0.5])
  assert np.isfinite(np.asarray(d.posterior_log_variance_clipped)).all()
  np.testing.assert_allclose(d.fixed_large_variance, [0.5])


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps():
  assert D.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert D.space_timesteps(1000, "ddim1000") == list(range(1000))
  assert D.space_timesteps(10, 1) == [0]
  assert D.space_timesteps(10, 10) == list(range(10))
  assert D.space_timesteps(100, 5) == [0, 25, 50, 74, 99]
  # Two sections of 50: 10 steps in the first, 2 in the second.
  kept = D.space_timesteps(100, "10,2")
  assert len(kept) == 12 and kept[:10] == [round(i * 49 / 9) for i in range(10)]
  assert kept[10:] == [50, 99]
  assert D.space_timesteps(100, [10, 2]) == kept


@pytest.mark.parametrize(
  "T,counts,match",
  [
    (1000, "ddim600", r"cannot keep exactly 600 of 1000 steps with a fixed stride"),
    (10, 11, r"cannot keep 11 steps in a section of 10 steps"),
    (10, 0, r"each count must be in 1..10"),
    (10, "fast", r"cannot parse timestep spacing 'fast'"),
    (10, [], r"section_counts is empty"),
  ],
)
def test_space_timesteps_errors(T, counts, match):
  with pytest.raises(ValueError, match=match):
    D.space_timesteps(T, counts)


@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("spacing", ["ddim50", "ddim10", 25, [5, 10, 20], "ddim1000"])
def test_respace_reproduces_alpha_bar_at_kept_steps(var_type, spacing):
  d = D.make_diffusion(BETAS, mean_type="v", var_type=var_type)
  keep = D.space_timesteps(T, spacing)
  r = D.respace(d, keep)
  assert r.num_timesteps == len(keep) and (r.mean_type, r.var_type) == ("v", var_type)
  np.testing.assert_array_equal(r.timestep_map, keep)
  np.testing.assert_allclose(r.alphas_cumprod, ref.alpha_bar(BETAS)[keep], rtol=2e-6)
  ab = ref.alpha_bar(BETAS)[keep]
  np.testing.assert_allclose(r.betas, 1 - ab / np.append(1.0, ab[:-1]), rtol=5e-6)
  if len(keep) == T:
    np.testing.assert_allclose(r.betas, d.betas, rtol=1e-6)


def test_respace_composes_and_checks_indices():
  d = D.make_diffusion(BETAS)
  r1 = D.respace(d, D.space_timesteps(T, "ddim100"))  # steps 0, 10, ..., 990
  r2 = D.respace(r1, [0, 5, 99])
  np.testing.assert_array_equal(r2.timestep_map, [0, 50, 990])
  np.testing.assert_allclose(r2.alphas_cumprod, ref.alpha_bar(BETAS)[[0, 50, 990]], rtol=3e-6)
  np.testing.assert_array_equal(D.model_timesteps(r2, jnp.array([2, 0])), [990, 0])
  with pytest.raises(ValueError, match=r"non-empty subset of 0..99"):
    D.respace(r1, [0, 100])
  with pytest.raises(ValueError, match=r"non-empty subset"):
    D.respace(r1, [])


def test_from_config():
  from configs import tiny
  from jaxdiff import config as default

  c = default.get_config()
  d = D.from_config(c.diffusion)
  np.testing.assert_allclose(d.betas, BETAS, rtol=1e-7)
  assert (d.mean_type, d.var_type) == (c.diffusion.mean_type, c.diffusion.var_type)
  c = tiny.get_config()
  assert D.from_config(c.diffusion).num_timesteps == c.diffusion.num_timesteps
