"""Losses and the variational bound against the float64 reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.core import diffusion as D
from jaxdiff.core import likelihood as LK
from jaxdiff.core import losses as L
from jaxdiff.core import schedules
from jaxdiff.core import timesteps as TSamp
from tests import reference as ref

T = 50
BETAS = schedules.get_betas("linear", T)
SHAPE = (3, 4, 4, 2)


def _pixels(shape, seed=0, with_edges=True):
  """Data on the 8-bit grid, including the -1 and +1 edge values."""
  rng = np.random.default_rng(seed)
  k = rng.integers(0, 256, size=shape)
  if with_edges:
    k.reshape(-1)[:4] = [0, 255, 0, 255]
  return k / 127.5 - 1.0


# ----------------------------------------------------------------------------- KL and decoder


def test_normal_kl_matches_reference_and_vanishes_for_identical_gaussians():
  rng = np.random.default_rng(0)
  m1, m2, lv1, lv2 = rng.standard_normal((4, 100))
  np.testing.assert_allclose(
    LK.normal_kl(m1, lv1, m2, lv2), ref.normal_kl(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(LK.normal_kl(m1, lv1, m1, lv1), 0.0, atol=1e-7)
  assert float(jnp.min(LK.normal_kl(m1, lv1, m2, lv2))) >= 0.0


@pytest.mark.parametrize("jit", [False, True])
def test_discretized_loglik_matches_reference(jit):
  x = _pixels((6, 5, 5, 1))
  rng = np.random.default_rng(1)
  means = np.clip(x + 0.05 * rng.standard_normal(x.shape), -1.2, 1.2)
  log_scales = rng.uniform(-6, 0, x.shape)
  fn = (
    jax.jit(LK.discretized_gaussian_log_likelihood)
    if jit
    else LK.discretized_gaussian_log_likelihood
  )
  got = fn(jnp.asarray(x), jnp.asarray(means), jnp.asarray(log_scales))
  chex.assert_shape(got, x.shape)
  np.testing.assert_allclose(
    got, ref.discretized_loglik(x, means, log_scales), rtol=1e-4, atol=1e-5
  )


def test_discretized_edge_buckets_extend_to_infinity():
  # A Gaussian far below -1 puts all its mass in the -1 bucket, and far above +1 in the +1 bucket.
  x = jnp.array([-1.0, 1.0, -1.0, 1.0])
  means = jnp.array([-9.0, 9.0, 9.0, -9.0])
  got = LK.discretized_gaussian_log_likelihood(x, means, jnp.zeros(4))
  np.testing.assert_allclose(got[:2], 0.0, atol=1e-6)
  np.testing.assert_allclose(
    LK.discretized_gaussian_log_likelihood(x, means / 3, jnp.zeros(4)),
    ref.discretized_loglik(np.asarray(x), np.asarray(means) / 3, 0.0),
    rtol=1e-4,
  )
  # The opposite edge gets the floor, log(1e-12), and no NaN or -inf.
  np.testing.assert_allclose(got[2:], math.log(1e-12), rtol=1e-6)
  # The bucket just inside an edge is an ordinary bin of width 2/255.
  x_in = jnp.array([-1.0 + 2 / 255, 1.0 - 2 / 255])
  got_in = LK.discretized_gaussian_log_likelihood(x_in, x_in, jnp.full(2, math.log(0.01)))
  np.testing.assert_allclose(
    got_in, ref.discretized_loglik(np.asarray(x_in), np.asarray(x_in), math.log(0.01)), rtol=1e-5
  )


@pytest.mark.parametrize(
  "mean,log_scale", [(0.0, 0.0), (0.3, -3.0), (-0.99, -6.0), (1.0, -8.0), (2.5, 0.5), (-0.5, -5.5)]
)
def test_decoder_bins_sum_to_one(mean, log_scale):
  grid = jnp.arange(256) / 127.5 - 1.0
  logp = LK.discretized_gaussian_log_likelihood(grid, mean, log_scale)
  total = float(jnp.sum(jnp.exp(logp.astype(jnp.float64) if jax.config.x64_enabled else logp)))
  # Bins below the 1e-12 floor add at most 256e-12.
  assert total == pytest.approx(1.0, abs=2e-5)


def test_decoder_is_accurate_in_the_right_tail():
  # Both bin edges far above the mean: the naive Phi(hi) - Phi(lo) is 1 - 1 = 0 in float32.
  x = jnp.array([0.6])
  got = float(
    LK.discretized_gaussian_log_likelihood(x, jnp.array([0.0]), jnp.array([math.log(0.1)]))[0]
  )
  want = float(ref.discretized_loglik(np.array([0.6]), np.array([0.0]), math.log(0.1))[0])
  assert got == pytest.approx(want, rel=1e-4)
  assert want > math.log(1e-12)  # the true value is well above the floor


def test_decoder_gradients_are_finite_at_the_edges():
  x = jnp.asarray(_pixels((64,)))
  g = jax.grad(
    lambda m, s: jnp.sum(LK.discretized_gaussian_log_likelihood(x, m, s)), argnums=(0, 1)
  )(x * 0.9, jnp.full(x.shape, -2.0))
  chex.assert_tree_all_finite(g)


# ----------------------------------------------------------------------------- the bound


def _model_output(var_type, shape, seed=2):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  learned = var_type in ("learned", "learned_range")
  out = 0.5 * rng.standard_normal(shape[:-1] + (2 * c if learned else c,))
  if var_type == "learned_range":
    out[..., c:] = np.tanh(out[..., c:])
  if var_type == "learned":
    out[..., c:] -= 4.0
  return out


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
@pytest.mark.parametrize("var_type", D.VAR_TYPES)
def test_vb_terms_bpd_matches_reference(mean_type, var_type):
  d = D.make_diffusion(BETAS, mean_type=mean_type, var_type=var_type)
  x0 = _pixels(SHAPE)
  ts = np.array([0, 1, T - 1])  # decoder, first KL, last KL
  rng = np.random.default_rng(3)
  xt = np.stack([ref.q_mean_var(BETAS, x0[i], t)[0] for i, t in enumerate(ts)])
  xt += np.stack([math.sqrt(ref.q_mean_var(BETAS, 0, t)[1]) for t in ts])[
    :, None, None, None
  ] * rng.standard_normal(SHAPE)
  out = _model_output(var_type, SHAPE)
  for jit in (False, True):
    fn = jax.jit(LK.vb_terms_bpd, static_argnames="clip_denoised") if jit else LK.vb_terms_bpd
    got = fn(
      d, jnp.asarray(out), jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(ts), clip_denoised=True
    )
    chex.assert_shape(got, (3,))
    want = [
      ref.vb_term_bpd(BETAS, mean_type, var_type, out[i], x0[i], xt[i], t) for i, t in enumerate(ts)
    ]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)


def test_prior_bpd_matches_reference():
  d = D.make_diffusion(BETAS)
  x0 = _pixels(SHAPE)
  got = LK.prior_bpd(d, jnp.asarray(x0))
  np.testing.assert_allclose(got, [ref.prior_bpd(BETAS, x) for x in x0], rtol=1e-4, atol=1e-7)


def _perfect_eps_model(d, x0):
  """Knows x_0, so it returns the exact noise in x_t: the optimum of the eps loss."""
  return lambda x_t, t: D.predict_eps_from_x0(d, x_t, t, x0)


def test_calc_bpd_loop_total_is_sum_of_terms_and_matches_per_term_calls():
  d = D.make_diffusion(BETAS, var_type="fixed_large")
  x0 = jnp.asarray(_pixels(SHAPE))
  key = jax.random.key(7)
  model = lambda x, t: 0.3 * x  # noqa: E731  a crude eps-model

  run = jax.jit(chex.assert_max_traces(n=1)(lambda x, k: LK.calc_bpd_loop(d, model, x, k)))
  out = run(x0, key)
  run(x0 * 0.5, jax.random.key(8))  # no retrace
  for name in ("vb", "xstart_mse", "mse"):
    chex.assert_shape(out[name], (SHAPE[0], T))
  chex.assert_shape([out["total_bpd"], out["prior_bpd"]], [(SHAPE[0],)] * 2)
  np.testing.assert_allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-6)
  # Term t uses noise from fold_in(key, t): recompute three terms one by one.
  for t_val in (0, 17, T - 1):
    t = jnp.full((SHAPE[0],), t_val)
    noise = jax.random.normal(jax.random.fold_in(key, t_val), x0.shape)
    x_t = D.q_sample(d, x0, t, noise)
    want = LK.vb_terms_bpd(d, model(x_t, t), x0, x_t, t)
    np.testing.assert_allclose(out["vb"][:, t_val], want, rtol=1e-5)
    p = D.p_mean_variance(d, model(x_t, t), x_t, t)
    np.testing.assert_allclose(
      out["xstart_mse"][:, t_val], LK.mean_flat((p["pred_x0"] - x0) ** 2), rtol=1e-5
    )
  chex.assert_tree_all_finite(out)


def test_calc_bpd_terms_chunks_and_batches_do_not_change_an_examples_terms():
  d = D.make_diffusion(BETAS, var_type="fixed_large")
  x0 = jnp.asarray(_pixels(SHAPE))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(SHAPE[0]))
  model = lambda x, t: 0.3 * x  # noqa: E731
  run = jax.jit(lambda x, k, ts: LK.calc_bpd_terms(d, model, x, k, ts))
  full = run(x0, keys, jnp.arange(T))
  for name in ("vb", "xstart_mse", "mse"):
    chex.assert_shape(full[name], (SHAPE[0], T))
  # Chunks of t (the edges t=0 and t=T-1 included) reassemble the whole.
  parts = [run(x0, keys, jnp.arange(s, min(s + 16, T))) for s in range(0, T, 16)]
  for name in ("vb", "xstart_mse", "mse"):
    np.testing.assert_allclose(
      np.concatenate([p[name] for p in parts], axis=1), full[name], rtol=1e-6
    )
  # Example 1 alone, with its own key, has the same terms as inside the batch.
  alone = run(x0[1:2], keys[1:2], jnp.arange(T))
  np.testing.assert_allclose(alone["vb"][0], full["vb"][1], rtol=1e-5, atol=1e-8)
  # Term t of example i uses noise fold_in(keys[i], t): recompute the edge terms directly.
  for t_val in (0, T - 1):
    t = jnp.full((SHAPE[0],), t_val)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, t_val), SHAPE[1:]) for k in keys])
    x_t = D.q_sample(d, x0, t, noise)
    want = LK.vb_terms_bpd(d, model(x_t, t), x0, x_t, t)
    np.testing.assert_allclose(full["vb"][:, t_val], want, rtol=1e-5)


def test_perfect_eps_predictor_beats_a_bad_one():
  d = D.make_diffusion(BETAS, var_type="fixed_small")
  x0 = jnp.asarray(_pixels(SHAPE))
  key = jax.random.key(0)
  good = LK.calc_bpd_loop(d, _perfect_eps_model(d, x0), x0, key)
  bad = LK.calc_bpd_loop(d, lambda x, t: jnp.zeros_like(x), x0, key)
  assert np.all(np.asarray(good["total_bpd"]) < np.asarray(bad["total_bpd"]))
  # With the exact mean and the true posterior variance, every KL term vanishes.
  np.testing.assert_allclose(good["vb"][:, 1:], 0.0, atol=2e-3)
  np.testing.assert_allclose(good["mse"], 0.0, atol=1e-3)


def test_calc_bpd_loop_uses_the_original_timesteps_after_respacing():
  d = D.respace(D.make_diffusion(BETAS), [0, 10, 49])
  seen = []

  def model(x, t):
    seen.append(t)
    return jnp.zeros_like(x)

  LK.calc_bpd_loop(d, model, jnp.zeros((1, 2, 2, 1)), jax.random.key(0))
  # Traced once inside the scan: check the mapping on concrete values instead.
  np.testing.assert_array_equal(D.model_timesteps(d, jnp.arange(3)), [0, 10, 49])
  assert len(seen) == 1


# ----------------------------------------------------------------------------- training losses


def _linear_model(a, b, c):
  """A tiny 'network': mean part a * x, variance part b everywhere."""

  def fn(x, t):
    del t
    mean = a * x
    return mean if c is None else jnp.concatenate([mean, jnp.full_like(x, b)], -1)

  return fn


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber"])
def test_simple_losses_match_reference(mean_type, loss_type):
  d = D.make_diffusion(BETAS, mean_type=mean_type)
  x0 = _pixels(SHAPE, with_edges=False)
  rng = np.random.default_rng(5)
  noise = rng.standard_normal(SHAPE)
  t = np.array([0, 20, T - 1])
  out = L.training_losses(
    d,
    _linear_model(0.7, None, None),
    jnp.asarray(x0),
    loss_type=loss_type,
    t=jnp.asarray(t),
    noise=jnp.asarray(noise),
  )
  for i, ti in enumerate(t):
    m, v = ref.q_mean_var(BETAS, x0[i], ti)
    xt = m + math.sqrt(v) * noise[i]
    target = {"eps": noise[i], "x0": x0[i], "v": ref.v_target(BETAS, x0[i], ti, noise[i])}[
      mean_type
    ]
    err = 0.7 * xt - target
    want = {
      "mse": np.mean(err**2),
      "l1": np.mean(np.abs(err)),
      "huber": np.mean(np.where(np.abs(err) < 1, 0.5 * err**2, np.abs(err) - 0.5)),
    }[loss_type]
    assert float(out["loss"][i]) == pytest.approx(want, rel=1e-5)
  np.testing.assert_array_equal(out["t"], t)


@pytest.mark.parametrize("mean_type", D.MEAN_TYPES)
def test_min_snr_weighting(mean_type):
  d = D.make_diffusion(BETAS, mean_type=mean_type)
  x0 = jnp.asarray(_pixels(SHAPE, with_edges=False))
  t = jnp.array([0, 25, T - 1])
  kw = dict(t=t, noise=jnp.ones(SHAPE))
  plain = L.training_losses(d, _linear_model(0.5, None, None), x0, **kw)["loss"]
  weighted = L.training_losses(d, _linear_model(0.5, None, None), x0, min_snr_gamma=5.0, **kw)[
    "loss"
  ]
  ab = ref.alpha_bar(BETAS)[np.asarray(t)]
  snr = ab / (1 - ab)
  w = np.minimum(snr, 5.0) / {"eps": snr, "x0": 1.0, "v": snr + 1}[mean_type]
  np.testing.assert_allclose(weighted, np.asarray(plain) * w, rtol=1e-5)


def test_kl_loss_is_T_times_the_bound_term():
  d = D.make_diffusion(BETAS, var_type="learned_range")
  x0 = jnp.asarray(_pixels(SHAPE))
  t, noise = jnp.array([0, 3, T - 1]), jax.random.normal(jax.random.key(1), SHAPE)
  model = _linear_model(0.2, 0.1, SHAPE[-1])
  out = L.training_losses(d, model, x0, t, noise, loss_type="kl")
  x_t = D.q_sample(d, x0, t, noise)
  want = LK.vb_terms_bpd(d, model(x_t, t), x0, x_t, t, clip_denoised=False) * T
  np.testing.assert_allclose(out["loss"], want, rtol=1e-6)


def test_hybrid_loss_trains_the_variance_through_vb_only():
  d = D.make_diffusion(BETAS, var_type="learned_range")
  x0 = jnp.asarray(_pixels(SHAPE))
  t, noise = jnp.array([0, 3, T - 1]), jax.random.normal(jax.random.key(1), SHAPE)

  def part(a, b, name):
    out = L.training_losses(d, _linear_model(a, b, SHAPE[-1]), x0, t, noise, loss_type="hybrid")
    return jnp.sum(out[name])

  g_vb = jax.grad(part, argnums=(0, 1))(0.3, 0.2, "vb")
  assert float(g_vb[0]) == 0.0  # the mean's gradient is stopped in the vb term
  assert abs(float(g_vb[1])) > 0.0
  g_simple = jax.grad(part, argnums=(0, 1))(0.3, 0.2, "simple")
  assert float(g_simple[1]) == 0.0 and abs(float(g_simple[0])) > 0.0
  out = L.training_losses(
    d,
    _linear_model(0.3, 0.2, SHAPE[-1]),
    x0,
    t,
    noise,
    loss_type="hybrid",
  )
  np.testing.assert_allclose(out["loss"], out["simple"] + out["vb"], rtol=1e-6)
  x_t = D.q_sample(d, x0, t, noise)
  vb = LK.vb_terms_bpd(
    d, _linear_model(0.3, 0.2, SHAPE[-1])(x_t, t), x0, x_t, t, clip_denoised=False
  )
  np.testing.assert_allclose(out["vb"], vb * T / 1000, rtol=1e-6)


def test_training_losses_checks_its_choices():
  x0 = jnp.zeros(SHAPE)
  t, noise = jnp.zeros((SHAPE[0],), jnp.int32), jnp.zeros(SHAPE)
  model = _linear_model(1.0, 0.0, SHAPE[-1])
  with pytest.raises(
    ValueError, match=r"unknown loss_type 'mae'; allowed: mse, l1, huber, kl, hybrid"
  ):
    L.training_losses(D.make_diffusion(BETAS), model, x0, t, noise, loss_type="mae")
  with pytest.raises(ValueError, match=r"gives the learned variance .* no training signal"):
    L.training_losses(D.make_diffusion(BETAS, var_type="learned"), model, x0, t, noise)
  with pytest.raises(
    ValueError, match=r"'hybrid' trains a learned variance, but var_type is 'fixed_small'"
  ):
    L.training_losses(D.make_diffusion(BETAS), model, x0, t, noise, loss_type="hybrid")


def test_random_t_and_noise_are_reproducible_and_cover_the_range():
  x0 = jnp.zeros((512, 2, 2, 1))
  fn = jax.jit(lambda a, b: TSamp.draw(a, b, x0, T))
  a = fn(jax.random.key(3), jax.random.key(4))
  chex.assert_trees_all_equal(a, fn(jax.random.key(3), jax.random.key(4)))
  t = np.asarray(a.t)
  assert t.min() == 0 and t.max() == T - 1
  chex.assert_shape(a.noise, x0.shape)
  np.testing.assert_array_equal(a.weights, 1.0)  # uniform t: no importance weights
  assert abs(float(jnp.mean(a.noise))) < 0.1 and float(jnp.std(a.noise)) == pytest.approx(1, 0.1)
  # t and the noise come from their own keys: a new noise key leaves t alone.
  b = fn(jax.random.key(3), jax.random.key(5))
  np.testing.assert_array_equal(a.t, b.t)
  assert not np.array_equal(a.noise, b.noise)


# ----------------------------------------------------------------------------- importance sampling


def test_importance_sampler_is_uniform_until_warm_then_follows_the_losses():
  hist = TSamp.init(4, history_per_term=2)
  np.testing.assert_allclose(TSamp.probabilities(hist), 0.25)
  hist = TSamp.update(
    hist, jnp.array([0, 0, 1, 1, 2, 2]), jnp.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
  )
  np.testing.assert_allclose(TSamp.probabilities(hist), 0.25)  # t = 3 has no history yet
  hist = TSamp.update(hist, jnp.array([3, 3]), jnp.array([4.0, 4.0]))
  p = np.asarray(TSamp.probabilities(hist))
  want = np.array([1.0, 2.0, 3.0, 4.0]) / 10 * (1 - 0.001) + 0.001 / 4
  np.testing.assert_allclose(p, want, rtol=1e-6)
  t, w = TSamp.sample(hist, jax.random.key(0), 20_000)
  counts = np.bincount(np.asarray(t), minlength=4) / 20_000
  np.testing.assert_allclose(counts, want, atol=0.015)
  # The weights 1 / (T p_t) keep the loss unbiased: E_p[w] = 1.
  assert float(jnp.mean(w)) == pytest.approx(1.0, rel=0.05)


def test_importance_history_is_a_ring_buffer():
  hist = TSamp.init(3, history_per_term=2)
  hist = TSamp.update(hist, jnp.array([1, 1, 1]), jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(hist.counts, [0, 3, 0])
  np.testing.assert_array_equal(hist.losses[1], [3.0, 2.0])  # the oldest, 1.0, was overwritten


def test_training_losses_with_importance_sampling_is_jittable():
  d = D.make_diffusion(BETAS, var_type="learned_range")
  hist = TSamp.init(T)
  x0 = jnp.zeros((8, 2, 2, 1))

  @jax.jit
  def step(hist, key):
    draw = TSamp.draw(*jax.random.split(key), x0, T, hist)
    out = L.training_losses(d, _linear_model(0.5, 0.0, 1), x0, draw.t, draw.noise, loss_type="kl")
    return TSamp.update(hist, out["t"], out["loss"]), draw

  hist, draw = step(hist, jax.random.key(0))
  assert int(hist.counts.sum()) == 8
  np.testing.assert_allclose(draw.weights, 1.0)  # uniform while cold: weight 1
