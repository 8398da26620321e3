"""Tests for jaxdiff.evaluation's statistics, feature extraction and reference statistics.

References are independent float64 NumPy/SciPy computations: the Fréchet distance through
``scipy.linalg.sqrtm(S1 @ S2)`` (real part, the usual FID code), covariances through ``np.cov``,
the Inception score through a direct softmax/KL loop.
"""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from configs import tiny
from jaxdiff import data, evaluation
from jaxdiff.evaluation import FeatureNet, reference
from jaxdiff.evaluation import stats as metrics


def _reference_fid(mu1, cov1, mu2, cov2) -> float:
  covmean = scipy.linalg.sqrtm(np.asarray(cov1, np.float64) @ np.asarray(cov2, np.float64))
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean.real))


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
  a = rng.normal(size=(d, 2 * d))
  return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def _stats(x: np.ndarray) -> metrics.FeatureStats:
  x = np.asarray(x, np.float64)
  return metrics.FeatureStats(mean=x.mean(0), cov=np.cov(x, rowvar=False), num=len(x))


# ------------------------------------------------------------------------ Fréchet distance


def test_frechet_matches_scipy_reference_full_rank():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  cov1, cov2 = _random_cov(rng, d), _random_cov(rng, d)
  got = metrics.frechet_distance_from_moments(mu1, cov1, mu2, cov2)
  want = _reference_fid(mu1, cov1, mu2, cov2)
  # Both are float64; they differ only in how the matrix square root is rounded.
  np.testing.assert_allclose(got, want, rtol=1e-9)
  stats1 = metrics.FeatureStats(mu1, cov1, 100)
  stats2 = metrics.FeatureStats(mu2, cov2, 100)
  assert metrics.frechet_distance(stats1, stats2) == got
  # Symmetric in its arguments, though the trace term is computed asymmetrically.
  np.testing.assert_allclose(metrics.frechet_distance(stats2, stats1), got, rtol=1e-9)


def test_frechet_of_identical_stats_is_zero_never_negative():
  rng = np.random.default_rng(1)
  for d in (1, 8, 64):
    cov = _random_cov(rng, d)
    mu = rng.normal(size=d) * 100
    d2 = metrics.frechet_distance_from_moments(mu, cov, mu, cov)
    assert 0.0 <= d2 < 1e-9 * np.trace(cov), (d, d2)


def test_frechet_of_shift_only_is_squared_mean_difference():
  rng = np.random.default_rng(2)
  d = 32
  cov = _random_cov(rng, d)
  mu1 = rng.normal(size=d)
  delta = rng.normal(size=d)
  d2 = metrics.frechet_distance_from_moments(mu1, cov, mu1 + delta, cov)
  np.testing.assert_allclose(d2, delta @ delta, rtol=1e-9)


def test_frechet_rank_deficient_is_finite_and_matches_reference():
  rng = np.random.default_rng(3)
  n, d = 10, 32  # N < D: both covariances have rank 9
  s1 = _stats(rng.normal(size=(n, d)))
  s2 = _stats(rng.normal(loc=0.5, size=(n, d)) * 1.5)
  assert np.linalg.matrix_rank(s1.cov) == n - 1
  got = metrics.frechet_distance(s1, s2)
  assert np.isfinite(got)
  # sqrtm of a singular product is itself less accurate, hence the looser tolerance.
  np.testing.assert_allclose(got, _reference_fid(s1.mean, s1.cov, s2.mean, s2.cov), rtol=1e-6)


def test_float64_pipeline_survives_large_means_where_naive_float32_fails():
  rng = np.random.default_rng(4)
  n, d = 400, 64
  # Feature networks emit float32: both pipelines see the same float32 features.
  x1 = (1e3 + rng.normal(size=(n, d))).astype(np.float32)
  x2 = (1e3 + 0.05 + 1.1 * rng.normal(size=(n, d))).astype(np.float32)
  s1, s2 = _stats(x1), _stats(x2)
  want = _reference_fid(s1.mean, s1.cov, s2.mean, s2.cov)

  def naive_float32_stats(x):
    mu = x.mean(0, dtype=np.float32)
    second = (x.T @ x) / np.float32(n)  # E[x x^T] - mu mu^T: cancels ~1e6 down to ~1
    return mu, (second - np.outer(mu, mu)) * np.float32(n / (n - 1))

  (m1, c1), (m2, c2) = naive_float32_stats(x1), naive_float32_stats(x2)
  covmean = scipy.linalg.sqrtm(c1 @ c2).real.astype(np.float32)
  naive = float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))
  assert abs(naive - want) > 0.1 * want, (naive, want)

  acc = metrics.FeatureAccumulator()
  for lo in range(0, n, 64):
    acc.update(x1[lo : lo + 64])
  got = metrics.frechet_distance(acc.result(), metrics.feature_stats(x2))
  np.testing.assert_allclose(got, want, rtol=1e-8)


def test_sqrtm_psd_and_trace_sqrt_product():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    a = _random_cov(rng, 12)
    root = metrics.sqrtm_psd(jnp.asarray(a))
    assert root.dtype == jnp.float64
    chex.assert_trees_all_close(root @ root, jnp.asarray(a), rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(root, root.T)
    np.testing.assert_allclose(root, scipy.linalg.sqrtm(a).real, rtol=1e-9, atol=1e-12)
    # Singular, with rounding-level negative eigenvalues: clipped, no NaN.
    v = rng.normal(size=(12, 3))
    singular = v @ v.T
    root = metrics.sqrtm_psd(jnp.asarray(singular))
    assert np.isfinite(root).all()
    chex.assert_trees_all_close(root @ root, jnp.asarray(singular), atol=1e-9)
    b = _random_cov(rng, 12)
    t = metrics.trace_sqrt_product(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(t, np.trace(scipy.linalg.sqrtm(a @ b).real), rtol=1e-10)
    # Traceable: usable inside jit.
    np.testing.assert_allclose(jax.jit(metrics.trace_sqrt_product)(a, b), t, rtol=1e-12)
  assert not jax.config.jax_enable_x64  # the context restored the global setting


def test_frechet_errors():
  rng = np.random.default_rng(6)
  s8 = _stats(rng.normal(size=(20, 8)))
  s6 = _stats(rng.normal(size=(20, 6)))
  with pytest.raises(ValueError, match=r"\(8,\).*\(6,\)"):
    metrics.frechet_distance(s8, s6)
  with pytest.raises(ValueError, match=r"\(8,\).*\(6,\)"):
    metrics.frechet_distance_from_moments(s8.mean, s8.cov, s6.mean, s6.cov)
  one = metrics.FeatureStats(s8.mean, s8.cov, 1)
  with pytest.raises(ValueError, match="1 sample"):
    metrics.frechet_distance(s8, one)
  with pytest.raises(ValueError, match="cov"):
    metrics.frechet_distance_from_moments(s8.mean, s8.cov[:, :7], s8.mean, s8.cov)
  with pytest.raises(ValueError, match="NaN"):
    metrics.frechet_distance_from_moments(s8.mean * np.nan, s8.cov, s8.mean, s8.cov)
  with pytest.raises(ValueError, match="mean"):
    metrics.FeatureStats(s8.mean, s6.cov, 20)


# ------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("sizes", [(100,), (1, 99), (37, 0, 50, 13), (2,) * 50])
def test_accumulator_matches_np_cov_for_any_batching(sizes):
  rng = np.random.default_rng(7)
  x = 5e3 + rng.normal(size=(100, 6)) @ rng.normal(size=(6, 6))
  acc = metrics.FeatureAccumulator()
  for chunk in np.split(x, np.cumsum(sizes)[:-1]):
    acc.update(chunk)
  stats = acc.result()
  assert stats.num == 100
  chex.assert_shape((stats.mean, stats.cov), ((6,), (6, 6)))
  assert stats.mean.dtype == stats.cov.dtype == np.float64
  np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
  np.testing.assert_array_equal(stats.cov, stats.cov.T)


def test_accumulator_errors():
  acc = metrics.FeatureAccumulator()
  with pytest.raises(ValueError, match="at least 2"):
    acc.result()
  acc.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    acc.result()
  with pytest.raises(ValueError, match=r"\(2, 4\).*D=3"):
    acc.update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    acc.update(np.zeros(3))
  with pytest.raises(ValueError, match="NaN"):
    acc.update(np.array([[0.0, np.nan, 0.0]]))


def test_stats_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(8)
  stats = metrics.feature_stats(rng.normal(size=(30, 5)))
  path = tmp_path / "sub" / "stats.npz"
  metrics.save_stats(path, stats)
  metrics.save_stats(path, stats)  # overwriting is fine
  assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # no temp files left behind
  loaded = metrics.load_stats(path)
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_array_equal(loaded.cov, stats.cov)
  assert loaded.num == 30
  np.savez(tmp_path / "bad.npz", mean=stats.mean)
  with pytest.raises(ValueError, match="cov, num"):
    metrics.load_stats(tmp_path / "bad.npz")


# ------------------------------------------------------------------------ Inception score


def _reference_is(logits: np.ndarray, num_splits: int) -> tuple[float, float]:
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  n = len(p)
  scores = []
  for k in range(num_splits):
    part = p[k * n // num_splits : (k + 1) * n // num_splits]
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
  return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_extremes():
  mean, std = metrics.inception_score(np.zeros((40, 7)), num_splits=4)
  np.testing.assert_allclose((mean, std), (1.0, 0.0), atol=1e-12)
  k = 10
  # Confident one-hot predictions, every class equally often within every split.
  logits = 100.0 * np.eye(k)[np.arange(200) % k]
  mean, std = metrics.inception_score(logits, num_splits=5)
  np.testing.assert_allclose(mean, k, rtol=1e-9)
  assert std < 1e-9
  # Logits this large would overflow a float32 softmax without the log-space computation.
  mean, _ = metrics.inception_score(1e4 * np.eye(k)[np.arange(200) % k], num_splits=5)
  np.testing.assert_allclose(mean, k, rtol=1e-12)


@pytest.mark.parametrize("num_splits", [1, 3, 10])
def test_inception_score_matches_numpy_reference(num_splits):
  rng = np.random.default_rng(9)
  logits = 3 * rng.normal(size=(103, 12))  # 103: splits of unequal size
  got = metrics.inception_score(logits, num_splits=num_splits)
  np.testing.assert_allclose(got, _reference_is(logits, num_splits), rtol=1e-10, atol=1e-12)


def test_inception_score_errors():
  with pytest.raises(ValueError, match="num_splits=10.*5 samples"):
    metrics.inception_score(np.zeros((5, 3)), num_splits=10)
  with pytest.raises(ValueError, match="num_splits=0"):
    metrics.inception_score(np.zeros((5, 3)), num_splits=0)
  with pytest.raises(ValueError, match=r"\[N, K\]"):
    metrics.inception_score(np.zeros(5))


# ---------------------------------------------------------------------- feature extraction


def _fake_feature_net(image_size: int = 8, channels: int = 1, dim: int = 6) -> FeatureNet:
  """A fixed random projection of the flattened image; logits are its first 3 features."""
  proj = jax.random.normal(jax.random.key(0), (image_size * image_size * channels, dim))

  def apply(w, images):
    features = images.reshape(images.shape[0], -1) @ w
    return {"features": features, "logits": features[:, :3]}

  net = FeatureNet(
    name="fake-proj", apply=jax.tree_util.Partial(apply, proj), feature_dim=dim, num_classes=3
  )
  return net, np.asarray(proj)


def _config(image_dir):
  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(image_dir)
  config.data.image_size = 8
  config.data.channels = 1
  return config


def test_compute_features_pads_and_keeps_order():
  net, proj = _fake_feature_net()
  rng = np.random.default_rng(10)
  images = rng.uniform(-1, 1, size=(13, 8, 8, 1)).astype(np.float32)
  want = images.reshape(13, -1) @ proj
  features, logits = evaluation.compute_features(net, images, batch_size=5)
  chex.assert_shape((features, logits), ((13, 6), (13, 3)))
  np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logits, features[:, :3])
  # An iterable of data-pipeline-style batches of varying sizes gives the same.
  batches = [{"image": images[:8]}, {"image": images[8:8]}, {"image": images[8:]}]
  features2, _ = evaluation.compute_features(net, batches, progress=True)
  np.testing.assert_allclose(features2, features, rtol=1e-6, atol=1e-6)
  # Rows the split reader masked out (padding) are dropped.
  masked = [{"image": images, "mask": np.arange(13) % 3 != 0}]
  features3, _ = evaluation.compute_features(net, masked)
  np.testing.assert_allclose(features3, features[np.arange(13) % 3 != 0], rtol=1e-6, atol=1e-6)
  # uint8 pixels are scaled exactly as the data pipeline scales them.
  pixels = rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8)
  features4, _ = evaluation.compute_features(net, pixels, batch_size=16)
  scaled = pixels.astype(np.float32) / np.float32(127.5) - 1
  np.testing.assert_allclose(features4, scaled.reshape(9, -1) @ proj, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no images"):
    evaluation.compute_features(net, [])
  with pytest.raises(ValueError, match="NHWC"):
    evaluation.compute_features(net, np.zeros((4, 8, 8)))


def test_reference_stats_computes_then_loads_cache(image_dir, tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO, logger="jaxdiff")
  config = _config(image_dir)
  config.data.random_flip = True  # must be ignored: reference statistics are unflipped
  net, proj = _fake_feature_net()
  source = data.make_source(config.data, split="train")
  images = np.stack([source[i]["image"] for i in range(len(source))])
  images = images.astype(np.float32) / np.float32(127.5) - np.float32(1)
  want = _stats(images.reshape(len(images), -1) @ proj)

  # 48 images in batches of 20 (not a multiple of the 8 devices): rounded up, last one padded.
  stats, logits = evaluation.reference_stats(
    net, config.data, split="test[:50%]", cache_dir=tmp_path, batch_size=20
  )
  assert stats.num == 48
  chex.assert_shape(logits, (48, 3))
  np.testing.assert_allclose(stats.mean, want.mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.cov, want.cov, rtol=1e-4, atol=1e-4)
  path = evaluation.reference_cache_path(net, config.data, split="test[:50%]", cache_dir=tmp_path)
  assert path.parent == tmp_path and path.is_file()
  assert path.name.startswith("image_folder_") and path.name.endswith("-test_50-8-fake-proj.npz")
  assert "computed" in caplog.text

  def fail(*args, **kwargs):
    raise AssertionError("reference statistics were recomputed despite the cache")

  monkeypatch.setattr(reference, "compute_features", fail)
  caplog.clear()
  cached, logits = evaluation.reference_stats(
    net, config.data, split="test[:50%]", cache_dir=tmp_path, batch_size=20
  )
  assert logits is None
  assert str(path) in caplog.text and "loaded" in caplog.text
  np.testing.assert_array_equal(cached.mean, stats.mean)
  np.testing.assert_array_equal(cached.cov, stats.cov)
  assert cached.num == 48
  assert metrics.frechet_distance(cached, stats) < 1e-9
