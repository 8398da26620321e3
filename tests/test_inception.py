"""Tests for the FID InceptionV3 port (jaxdiff.evaluation.inception) on random weights.

The comparison against pytorch-fid itself lives in benchmarks/check_inception.py (it needs
torch); here each layer type is checked against an independent float64 NumPy reference, and the
whole network at 75x75 (its minimum size) to keep the file fast.
"""

import importlib.util
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff.evaluation import featurenet, inception

SIZE = 75  # the smallest input Inception accepts: the cheapest full forward pass

# Float32 layers against float64 references: a few ulps of the O(1) outputs per accumulation.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def state_dict():
  return inception.random_state_dict(0)


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory, state_dict):
  path = tmp_path_factory.mktemp("inception") / "weights.npz"
  np.savez(path, **state_dict)
  return path


@pytest.fixture(scope="module")
def net(weights_path):
  return inception.feature_net(weights_path, resize_to=SIZE)


def _images(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ---- weight format ---------------------------------------------------------------------------


def test_state_dict_shapes_cover_the_fid_network():
  shapes = inception.state_dict_shapes()
  # 94 BasicConv2d blocks x 5 entries + fc weight and bias.
  assert len(shapes) == 94 * 5 + 2
  assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert shapes["fc.weight"] == (1008, 2048)
  assert shapes["fc.bias"] == (1008,)


def test_random_state_dict_is_plausible(state_dict):
  assert {k: v.shape for k, v in state_dict.items()} == inception.state_dict_shapes()
  assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in state_dict.values())
  assert all(v.min() > 0 for k, v in state_dict.items() if k.endswith("running_var"))
  np.testing.assert_array_equal(inception.random_state_dict(0)["fc.bias"], state_dict["fc.bias"])


def test_missing_key_is_named(state_dict):
  broken = dict(state_dict)
  del broken["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
  with pytest.raises(ValueError, match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_mean'"):
    inception.load_params(broken)


def test_unexpected_key_is_named(state_dict):
  broken = {**state_dict, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected key 'AuxLogits\.fc\.weight'"):
    inception.load_params(broken)


def test_wrong_shape_is_reported_with_both_shapes(state_dict, tmp_path):
  broken = {**state_dict, "fc.weight": np.zeros((1000, 2048), np.float32)}
  path = tmp_path / "broken.npz"
  np.savez(path, **broken)
  with pytest.raises(
    ValueError, match=r"'fc\.weight' has shape \(1000, 2048\), expected \(1008, 2048\)"
  ):
    inception.load_params(path)


def test_num_batches_tracked_is_ignored_and_pth_is_refused(state_dict, tmp_path):
  extra = {**state_dict, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0)}
  chex.assert_trees_all_equal(inception.load_params(extra), inception.load_params(state_dict))
  with pytest.raises(ValueError, match="convert it first"):
    inception.load_params(tmp_path / "pt_inception.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_convert_without_torch_fails_clearly(tmp_path):
  weights = tmp_path / "in.pth"
  weights.write_bytes(b"")
  cmd = [sys.executable, "-m", "jaxdiff", "convert-inception", f"--weights={weights}"]
  proc = subprocess.run([*cmd, f"--out={tmp_path / 'o'}"], capture_output=True, text=True)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("error: converting a .pth file needs PyTorch")
  assert not (tmp_path / "o" / "inception.npz").exists()


# ---- layers against float64 NumPy references ------------------------------------------------


def _np_conv_bn_relu(x, w, gamma, beta, mean, var, stride, padding):
  """NHWC input, OIHW weight, symmetric (ph, pw) zero padding; everything in float64."""
  (ph, pw), (o, _, kh, kw) = padding, w.shape
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], out_h, out_w, o))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride, :]
      y += patch @ w[:, :, i, j].T
  y = (y - mean) / np.sqrt(var + 1e-3) * gamma + beta
  return np.maximum(y, 0.0)


def test_basic_conv2d_matches_numpy_reference():
  rng = np.random.default_rng(1)
  c_in, c_out, kernel, stride, padding = 4, 6, (3, 2), 2, (1, 0)
  params = {
    "conv.weight": rng.normal(0, 0.5, (c_out, c_in, *kernel)),
    "bn.weight": rng.uniform(0.5, 1.5, c_out),
    "bn.bias": rng.normal(0, 0.5, c_out),
    "bn.running_mean": rng.normal(0, 0.5, c_out),
    "bn.running_var": rng.uniform(0.01, 2.0, c_out),
  }
  params = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
  layer = inception.BasicConv2d(c_in, c_out, kernel, stride=stride, padding=padding)
  assert layer.torch_shapes() == {k: v.shape for k, v in params.items()}
  layer.load_torch(params.__getitem__)
  x = _images((2, 9, 8, c_in), seed=2)

  got = layer(jnp.asarray(x))
  want = _np_conv_bn_relu(
    x.astype(np.float64),
    params["conv.weight"],
    params["bn.weight"],
    params["bn.bias"],
    params["bn.running_mean"],
    params["bn.running_var"],
    stride,
    padding,
  )
  chex.assert_shape(got, (2, 5, 4, c_out))
  assert (want == 0).any() and (want > 0).any()  # both sides of the ReLU are exercised
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def _np_pool(x, size, stride, padding, op):
  """Pools over in-image pixels only: the average divides by the in-image count."""
  b, h, w, c = x.shape
  out_h = (h + 2 * padding - size) // stride + 1
  out_w = (w + 2 * padding - size) // stride + 1
  y = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    for j in range(out_w):
      top, left = i * stride - padding, j * stride - padding
      window = x[:, max(top, 0) : top + size, max(left, 0) : left + size, :]
      y[:, i, j] = op(window, axis=(1, 2))
  return y


def test_avg_pool_excludes_padding_like_numpy_reference():
  x = _images((2, 5, 6, 3), seed=3)
  got = inception.avg_pool_exclude_pad(jnp.asarray(x))
  want = _np_pool(x.astype(np.float64), 3, 1, 1, np.mean)
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=1e-6)
  # A corner averages its 2x2 in-image neighbourhood, not 4 pixels over 9.
  np.testing.assert_allclose(np.asarray(got)[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("stride,padding", [(2, 0), (1, 1)])
def test_max_pool_matches_numpy_reference(stride, padding):
  x = _images((2, 7, 8, 3), seed=4) - 2.0  # all negative: zero padding would win, -inf must not
  got = inception.max_pool(jnp.asarray(x), 3, stride, padding)
  np.testing.assert_array_equal(np.asarray(got), _np_pool(x, 3, stride, padding, np.max))


def _np_resize_half_pixel(x, size):
  """``F.interpolate(mode="bilinear", align_corners=False)`` on NHWC, in float64."""

  def taps(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  (h0, h1, wh), (w0, w1, ww) = taps(x.shape[1]), taps(x.shape[2])
  rows = x[:, h0] * (1 - wh)[None, :, None, None] + x[:, h1] * wh[None, :, None, None]
  return rows[:, :, w0] * (1 - ww)[None, None, :, None] + rows[:, :, w1] * ww[None, None, :, None]


@pytest.mark.parametrize("shape,size", [((2, 5, 7, 3), 9), ((2, 13, 11, 3), 6), ((1, 4, 4, 1), 4)])
def test_resize_matches_half_pixel_bilinear(shape, size):
  x = _images(shape, seed=5)
  got = inception.prepare_images(jnp.asarray(x), size)
  want = _np_resize_half_pixel(np.broadcast_to(x, (*shape[:3], 3)).astype(np.float64), size)
  chex.assert_shape(got, (shape[0], size, size, 3))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_prepare_images_rejects_bad_channel_counts():
  with pytest.raises(ValueError, match="1 or 3"):
    inception.prepare_images(jnp.zeros((2, 8, 8, 2)), SIZE)


# ---- the whole network ----------------------------------------------------------------------


def test_feature_net_outputs(net, weights_path, state_dict):
  assert net.name == f"inception-{featurenet.file_digest(weights_path)}-r{SIZE}"
  assert (net.feature_dim, net.num_classes) == (2048, 1008)
  assert isinstance(net.apply, jax.tree_util.Partial)
  out = net.apply(jnp.asarray(_images((2, 32, 32, 3))))
  chex.assert_shape(out["features"], (2, 2048))
  chex.assert_shape(out["logits"], (2, 1008))
  chex.assert_type(out["features"], jnp.float32)
  chex.assert_tree_all_finite(out)
  assert (out["features"] >= 0).all()  # the mean of post-ReLU activations
  # The logits are fc(pool3) in PyTorch layout: W [1008, 2048] applied as features @ W.T + b.
  feats = np.asarray(out["features"], np.float64)
  want = feats @ state_dict["fc.weight"].T.astype(np.float64) + state_dict["fc.bias"]
  np.testing.assert_allclose(np.asarray(out["logits"]), want, rtol=1e-5, atol=1e-4)


def test_grey_input_equals_replicated_rgb(net):
  grey = _images((2, 32, 32, 1), seed=6)
  rgb = np.repeat(grey, 3, axis=-1)
  chex.assert_trees_all_close(net.apply(grey), net.apply(rgb), rtol=1e-6, atol=1e-6)


def test_deterministic_and_same_from_dict_or_file(net, state_dict):
  x = _images((2, SIZE, SIZE, 3), seed=7)
  chex.assert_trees_all_equal(net.apply(x), net.apply(x))
  params = nnx.state(inception.load_model(state_dict))
  chex.assert_trees_all_equal(params, net.apply.args[0])


def test_apply_is_a_jit_argument(net, weights_path):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(apply, images):
    return apply(images)

  x = _images((2, 40, 40, 3), seed=8)
  got = run(net.apply, x)
  chex.assert_trees_all_close(got, net.apply(x), rtol=1e-5, atol=1e-5)
  # Same settings, fresh weights object: the jitted caller must not retrace.
  other = inception.feature_net(weights_path, resize_to=SIZE)
  chex.assert_trees_all_equal(run(other.apply, x), got)
