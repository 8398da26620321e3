"""The FID InceptionV3 in Flax NNX: 2048 pool3 features and 1008 logits per image.

A port of the network pytorch-fid uses (``pytorch_fid.inception.fid_inception_v3``), which is
itself a port of TensorFlow's 2015-12-05 Inception graph, the one behind the reference FID:

* every convolution is a ``BasicConv2d``: conv without bias, BatchNorm (``eps=1e-3``), ReLU.
  BatchNorm runs in eval mode from the stored running statistics, folded at load time into a
  per-channel ``scale`` and ``shift`` applied after the convolution;
* in the Inception-A/C/E blocks the pooling branch averages a 3x3 window (stride 1, padding 1)
  over the in-image pixels only (``count_include_pad=False``, TF's behaviour), except
  ``Mixed_7c``, which max-pools instead (a quirk of the TF graph that pytorch-fid reproduces);
* pool3 is the global average of ``Mixed_7c`` (2048 features); ``fc`` maps it to 1008 logits.

:func:`feature_net` resizes images to 299x299 with half-pixel bilinear interpolation and no
antialiasing, like ``F.interpolate(mode="bilinear", align_corners=False)``. All convolutions and
matmuls run in float32 at ``Precision.HIGHEST`` whatever the global default.

Weight file format
------------------
The weights cannot be downloaded by jaxdiff; supply pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` converted to an ``.npz`` whose keys are exactly that
file's PyTorch ``state_dict`` keys, in PyTorch layout:

* ``<block>.conv.weight``: the conv kernel, ``[out, in, kh, kw]`` (OIHW);
* ``<block>.bn.weight``, ``.bn.bias``, ``.bn.running_mean``, ``.bn.running_var``: ``[out]``;
* ``fc.weight``: ``[1008, 2048]``; ``fc.bias``: ``[1008]``.

``<block>`` is e.g. ``Conv2d_1a_3x3`` or ``Mixed_5b.branch1x1``; :func:`state_dict_shapes`
lists every key with its shape. ``*.num_batches_tracked`` entries are ignored. Convert with::

  jaxdiff convert-inception --weights pt_inception-2015-12-05-6726825d.pth --out weights/

(needs ``torch``), or equivalently, anywhere torch is installed::

  import numpy as np, torch
  sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
  np.savez("inception.npz", **{k: v.numpy() for k, v in sd.items()})

Example::

  net = feature_net("inception.npz")       # a jaxdiff.evaluation.FeatureNet
  out = net.apply(images)                  # images: [B, H, W, 1 or 3] in [-1, 1]
  out["features"], out["logits"]           # [B, 2048], [B, 1008]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.evaluation.featurenet import FeatureNet, file_digest
from jaxdiff.io import files

BN_EPS = 1e-3
FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # the smallest size for which Mixed_7a still has a 1x1 output

_HIGHEST = jax.lax.Precision.HIGHEST
_IGNORED_SUFFIX = ".num_batches_tracked"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _to_device(x: np.ndarray) -> jax.Array:
  # Cast on the host: jnp.asarray(x, dtype) would compile a conversion per distinct shape.
  return jax.device_put(np.ascontiguousarray(x, np.float32))


def max_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
  """Max over ``size``x``size`` windows of NHWC ``x``; padding never wins (it is ``-inf``)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad
  )


def avg_pool_exclude_pad(x: jax.Array, size: int = 3, padding: int = 1) -> jax.Array:
  """Stride-1 average pool that divides by the in-image window size.

  Matches ``F.avg_pool2d(..., count_include_pad=False)`` and TF's ``SAME`` average pool, so
  border outputs are not pulled towards zero by the padding.
  """
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  window, strides = (1, size, size, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


class BasicConv2d(nnx.Module):
  """Conv (no bias) + eval-mode BatchNorm (as ``scale``, ``shift``) + ReLU, NHWC.

  Parameters start at zero; :func:`load_params` fills them from a PyTorch state dict.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
  ):
    self.kernel_size = _pair(kernel_size)
    self.stride = stride
    self.padding = _pair(padding)
    self.in_channels = in_channels
    self.out_channels = out_channels
    kh, kw = self.kernel_size
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_channels, out_channels), jnp.float32))
    self.scale = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
    self.shift = nnx.Param(jnp.zeros((out_channels,), jnp.float32))

  def torch_shapes(self) -> dict[str, tuple[int, ...]]:
    """This block's state-dict entries (key suffix -> PyTorch shape)."""
    kh, kw = self.kernel_size
    vec = (self.out_channels,)
    return {
      "conv.weight": (self.out_channels, self.in_channels, kh, kw),
      "bn.weight": vec,
      "bn.bias": vec,
      "bn.running_mean": vec,
      "bn.running_var": vec,
    }

  def load_torch(self, get) -> None:
    """Sets the parameters from ``get(suffix) -> np.ndarray`` (shapes already checked)."""
    # Fold BN in float64 so the folding adds no error beyond the final float32 rounding.
    gamma, beta = get("bn.weight"), get("bn.bias")
    mean, var = get("bn.running_mean"), get("bn.running_var")
    scale = gamma / np.sqrt(var + BN_EPS)
    self.kernel.set_value(_to_device(get("conv.weight").transpose(2, 3, 1, 0)))
    self.scale.set_value(_to_device(scale))
    self.shift.set_value(_to_device(beta - mean * scale))

  def __call__(self, x: jax.Array) -> jax.Array:
    (ph, pw), s = self.padding, self.stride
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[...],
      window_strides=(s, s),
      padding=((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST,
    )
    return jax.nn.relu(y * self.scale[...] + self.shift[...])


class InceptionA(nnx.Module):
  """``Mixed_5b``..``Mixed_5d`` (FIDInceptionA)."""

  def __init__(self, in_channels: int, pool_features: int):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """``Mixed_6a``: the 35x35 -> 17x17 reduction."""

  def __init__(self, in_channels: int):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, b3d, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  """``Mixed_6b``..``Mixed_6e`` (FIDInceptionC): factorised 7x7 convolutions."""

  def __init__(self, in_channels: int, channels_7x7: int):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    b7d = self.branch7x7dbl_1(x)
    for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
      b7d = conv(b7d)
    b7d = self.branch7x7dbl_5(b7d)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, b7d, bp], axis=-1)


class InceptionD(nnx.Module):
  """``Mixed_7a``: the 17x17 -> 8x8 reduction."""

  def __init__(self, in_channels: int):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = conv(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """``Mixed_7b`` (FIDInceptionE_1, ``pool="avg"``) and ``Mixed_7c`` (E_2, ``pool="max"``)."""

  def __init__(self, in_channels: int, pool: str):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    b3d = jnp.concatenate([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], axis=-1)
    pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, b3d, bp], axis=-1)


class Dense(nnx.Module):
  """``x @ kernel + bias`` at HIGHEST precision; ``kernel`` is ``[in, out]``."""

  def __init__(self, in_features: int, out_features: int):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(jnp.zeros((in_features, out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

  def torch_shapes(self) -> dict[str, tuple[int, ...]]:
    """This layer's state-dict entries (key suffix -> PyTorch shape)."""
    return {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}

  def load_torch(self, get) -> None:
    """Sets the parameters from ``get(suffix) -> np.ndarray`` (shapes already checked)."""
    self.kernel.set_value(_to_device(get("weight").T))
    self.bias.set_value(_to_device(get("bias")))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x, self.kernel[...], precision=_HIGHEST) + self.bias[...]


class InceptionV3(nnx.Module):
  """The FID InceptionV3; attribute names follow pytorch-fid's so state-dict keys map 1:1.

  Call it on ``[B, H, W, 3]`` float32 images in ``[-1, 1]`` (already at the size wanted, 299
  for the standard FID; at least 75) to get ``{"features": [B, 2048], "logits": [B, 1008]}``.
  Parameters start at zero: build it with :func:`load_model`.
  """

  def __init__(self):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = InceptionA(192, pool_features=32)
    self.Mixed_5c = InceptionA(256, pool_features=64)
    self.Mixed_5d = InceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, channels_7x7=128)
    self.Mixed_6c = InceptionC(768, channels_7x7=160)
    self.Mixed_6d = InceptionC(768, channels_7x7=160)
    self.Mixed_6e = InceptionC(768, channels_7x7=192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, pool="avg")
    self.Mixed_7c = InceptionE(2048, pool="max")
    self.fc = Dense(FEATURE_DIM, NUM_CLASSES)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected [B, H, W, 3] images, got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {x.shape}")
    x = x.astype(jnp.float32)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, 3, 2)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    # Dropout sits between pool3 and fc in the PyTorch model; it is the identity in eval mode.
    return {"features": pool3, "logits": self.fc(pool3)}


def _leaf_layers(model: InceptionV3):
  """(torch key prefix, layer) for every layer holding weights, in module order."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, BasicConv2d | Dense):
      yield ".".join(str(p) for p in path), module


@functools.cache
def _abstract_model() -> InceptionV3:
  # Shapes only: lets state_dict_shapes() and graph_def() avoid allocating ~24M zeros.
  return nnx.eval_shape(InceptionV3)


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """Every key the weight file must hold, mapped to its PyTorch-layout shape."""
  shapes = {}
  for prefix, layer in _leaf_layers(_abstract_model()):
    for suffix, shape in layer.torch_shapes().items():
      shapes[f"{prefix}.{suffix}"] = shape
  return shapes


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Random float32 weights in the weight-file layout, for tests and benchmarks.

  He-scaled kernels and BN statistics near identity keep activations O(1) through all 94
  conv layers, so the outputs are a meaningful numerical test; ``running_var`` is positive.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in state_dict_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = int(np.prod(shape[1:]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif key == "fc.weight":
      value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    elif key.endswith(("bn.weight", "bn.running_var")):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bn.bias, bn.running_mean, fc.bias
      value = rng.normal(0.0, 0.1, shape)
    out[key] = value.astype(np.float32)
  return out


def _read_state_dict(
  path_or_dict: str | os.PathLike | Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
  if isinstance(path_or_dict, Mapping):
    return {k: np.asarray(v) for k, v in path_or_dict.items()}
  path = files.as_path(path_or_dict)
  if path.suffix in (".pth", ".pt"):
    raise ValueError(
      f"{path} looks like a PyTorch checkpoint; convert it first with "
      f"`jaxdiff convert-inception --weights {path} --out DIR`"
    )
  with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def check_state_dict(state_dict: Mapping[str, np.ndarray]) -> None:
  """Raises ``ValueError`` naming the first missing or unexpected key, or mismatched shape."""
  expected = state_dict_shapes()
  given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
  missing = [k for k in expected if k not in given]
  if missing:
    raise ValueError(
      f"Inception weights: missing key {missing[0]!r} ({len(missing)} missing in all)"
    )
  unexpected = sorted(k for k in given if k not in expected)
  if unexpected:
    raise ValueError(
      f"Inception weights: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
    )
  for key, shape in expected.items():
    got = tuple(np.shape(given[key]))
    if got != shape:
      raise ValueError(f"Inception weights: {key!r} has shape {got}, expected {shape}")


def load_model(path_or_dict: str | os.PathLike | Mapping[str, np.ndarray]) -> InceptionV3:
  """An :class:`InceptionV3` holding the weights from an ``.npz`` file or a state dict.

  Args:
    path_or_dict: an ``.npz`` in the format described in the module docstring, or a mapping
      with the same keys and shapes (arrays in PyTorch layout).

  Raises:
    ValueError: a key is missing or unexpected, or an array has the wrong shape.
  """
  state_dict = _read_state_dict(path_or_dict)
  check_state_dict(state_dict)
  # Start from shapes only: every parameter is overwritten below, so zeros would be wasted work.
  model = nnx.eval_shape(InceptionV3)
  for prefix, layer in _leaf_layers(model):
    layer.load_torch(lambda suffix, p=prefix: np.asarray(state_dict[f"{p}.{suffix}"], np.float64))
  return model


def load_params(path_or_dict: str | os.PathLike | Mapping[str, np.ndarray]) -> nnx.State:
  """The parameters of :func:`load_model` as a pytree (an ``nnx.State``).

  ``nnx.merge(graph_def(), params)`` rebuilds the :class:`InceptionV3`; raises like
  :func:`load_model`.
  """
  return nnx.state(load_model(path_or_dict))


def graph_def() -> nnx.GraphDef:
  """The static structure of :class:`InceptionV3`, to ``nnx.merge`` with :func:`load_params`."""
  graphdef, _ = nnx.split(_abstract_model())
  return graphdef


@jax.jit
def _network(params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
  return nnx.merge(graph_def(), params)(images)


def prepare_images(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Grey -> RGB, then half-pixel bilinear resize (no antialiasing) to ``size``x``size``.

  Matches ``F.interpolate(x, (size, size), mode="bilinear", align_corners=False)``; images
  already at ``size`` pass through unchanged.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected [B, H, W, 1 or 3] images, got shape {images.shape}")
  images = jnp.asarray(images, jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.broadcast_to(images, (*images.shape[:3], 3))
  if images.shape[1:3] != (size, size):
    shape = (images.shape[0], size, size, 3)
    images = jax.image.resize(images, shape, "bilinear", antialias=False, precision=_HIGHEST)
  return images


@dataclasses.dataclass(frozen=True)
class _Apply:
  # A frozen dataclass (not a closure) so equal settings compare equal: jit then reuses one
  # trace for every FeatureNet built with the same resize_to.
  resize_to: int

  def __call__(self, params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    return _network(params, prepare_images(images, self.resize_to))


def feature_net(path: str | os.PathLike, *, resize_to: int = INPUT_SIZE) -> FeatureNet:
  """The FID Inception as a :class:`jaxdiff.evaluation.FeatureNet`.

  Args:
    path: the ``.npz`` weight file (format in the module docstring).
    resize_to: the side images are resized to; keep 299 for the standard FID (smaller sizes,
      down to 75, only make tests cheap).

  Returns:
    A ``FeatureNet`` whose ``apply`` maps ``[B, H, W, 1 or 3]`` float images in ``[-1, 1]``
    to ``{"features": [B, 2048], "logits": [B, 1008]}``.

  Raises:
    ValueError: bad weights (see :func:`load_model`) or ``resize_to < 75``.
  """
  if resize_to < MIN_INPUT_SIZE:
    raise ValueError(f"resize_to must be at least {MIN_INPUT_SIZE}, got {resize_to}")
  name = f"inception-{file_digest(path)}"
  if resize_to != INPUT_SIZE:
    name += f"-r{resize_to}"
  apply = jax.tree_util.Partial(_Apply(resize_to), load_params(path))
  return FeatureNet(name=name, apply=apply, feature_dim=FEATURE_DIM, num_classes=NUM_CLASSES)


def convert(torch_path: str | os.PathLike, npz_path: str | os.PathLike) -> None:
  """Converts pytorch-fid's ``.pth`` state dict to the ``.npz`` format (needs ``torch``).

  Raises:
    ImportError: torch is not installed.
    ValueError: the checkpoint does not have the FID Inception's keys and shapes.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      "converting a .pth file needs PyTorch (`pip install torch`); alternatively run the "
      "three-line snippet in the jaxdiff.evaluation.inception docstring wherever torch is"
      " installed"
    ) from e
  state_dict = torch.load(torch_path, map_location="cpu")
  arrays = {
    k: v.detach().cpu().numpy() for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)
  }
  check_state_dict(arrays)
  with files.atomic_path(npz_path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)
