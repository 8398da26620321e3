"""A small CNN classifier of a labelled dataset, used as a feature network.

For MNIST-like data the ImageNet-trained Inception features are a poor fit, so sample quality
is better measured in the feature space of a classifier trained on the data itself.
``jaxdiff.training.classifier.train`` fits one and writes it with ``save`` to a single ``.npz``;
``feature_net`` loads it behind the ``FeatureNet`` interface. Train one with::

  jaxdiff train-classifier --config configs/fashion_mnist.py --out weights/

The network (``Classifier``, LeNet-like): stages of 3x3 convolutions (GroupNorm, SiLU), each
stage ending in a 2x2 max-pool, then the flattened map goes through a dense layer whose SiLU
output are the ``features`` (D = ``feature_dim``) and a dense layer to the ``logits``. Flattening
(rather than a global average pool) keeps where things are in the image, which on 2 CPU cores
makes it learn Fashion-MNIST several times faster; it ties the network to one image size, which
the file records. It has no batch statistics, so evaluating it is a pure function of the weights
and the images; it can be built for any image size and channel count.

File format: one ``.npz`` holding every parameter under its ``/``-joined path in the NNX model
(e.g. ``convs/0/kernel``) and, under ``__meta__``, a JSON string with the dataset, input shape,
architecture, training steps and test accuracy, and ``format_version``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from jaxdiff import data, parallel
from jaxdiff.evaluation.featurenet import FeatureNet, file_digest
from jaxdiff.io import files

FORMAT_VERSION = 1
META_KEY = "__meta__"

# Sized for a 2-core CPU (see jaxdiff.training.classifier for the training defaults).
DEFAULT_WIDTHS = (32, 64)
DEFAULT_CONVS_PER_STAGE = 1
DEFAULT_FEATURE_DIM = 128
DEFAULT_NUM_GROUPS = 8
DEFAULT_EVAL_BATCH_SIZE = 1000


class Classifier(nnx.Module):
  """Conv stages -> flatten -> dense ``features`` -> dense ``logits``.

  Args:
    channels: input channels C.
    num_classes: K, the number of logits.
    widths: output channels of each stage; each stage halves the spatial size.
    convs_per_stage: 3x3 convolutions per stage.
    feature_dim: D, the width of the feature layer.
    num_groups: GroupNorm groups after each convolution (fewer if a width is not divisible);
      0 disables normalisation.
    image_size: H = W of the input (sets the flattened width).
    rngs: initialisation keys.
  """

  def __init__(
    self,
    channels: int,
    num_classes: int,
    *,
    widths: Sequence[int] = DEFAULT_WIDTHS,
    convs_per_stage: int = DEFAULT_CONVS_PER_STAGE,
    feature_dim: int = DEFAULT_FEATURE_DIM,
    num_groups: int = DEFAULT_NUM_GROUPS,
    image_size: int,
    rngs: nnx.Rngs,
  ):
    self.convs_per_stage = convs_per_stage
    convs, norms = [], []
    c_in = channels
    for width in widths:
      for _ in range(convs_per_stage):
        convs.append(nnx.Conv(c_in, width, (3, 3), rngs=rngs))
        if num_groups > 0:
          norms.append(nnx.GroupNorm(width, num_groups=math.gcd(num_groups, width), rngs=rngs))
        c_in = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms) if norms else None
    size = image_size
    for _ in widths:
      size = -(-size // 2)
    self.feature = nnx.Linear(size * size * c_in, feature_dim, rngs=rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """``images`` float32 [B, H, W, C] in [-1, 1] -> ``{"features": [B, D], "logits": [B, K]}``."""
    x = images
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if self.norms is not None:
        x = self.norms[i](x)
      x = nnx.silu(x)
      if (i + 1) % self.convs_per_stage == 0:
        # SAME padding keeps odd and tiny sizes (7 -> 4, 1 -> 1) from shrinking to nothing.
        x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    features = nnx.silu(self.feature(x))
    return {"features": features, "logits": self.head(features)}


def architecture(meta: dict[str, Any]) -> dict[str, Any]:
  """The ``build_model`` keyword arguments recorded in a file's metadata."""
  return {
    "image_size": meta["image_size"],
    "widths": tuple(meta["widths"]),
    "convs_per_stage": meta["convs_per_stage"],
    "feature_dim": meta["feature_dim"],
    "num_groups": meta["num_groups"],
  }


def build_model(
  channels: int, num_classes: int, key: jax.Array | None = None, **architecture: Any
) -> Classifier:
  """A ``Classifier`` initialised from ``key``; with ``key=None`` an abstract one (no memory)."""
  if key is None:
    return nnx.eval_shape(
      lambda: build_model(channels, num_classes, jax.random.key(0), **architecture)
    )
  return Classifier(channels, num_classes, rngs=nnx.Rngs(params=key), **architecture)


# ---------------------------------------------------------------- save / load


def _flat_params(params: nnx.State) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(params)}


def _write_npz(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
  np.savez(f, **arrays)


def save(path: str | os.PathLike, params: nnx.State, meta: dict[str, Any]) -> epath.Path:
  """Writes ``params`` and ``meta`` to one ``.npz`` at ``path`` (local or ``gs://``), atomically.

  Written through ``files.atomic_path``, so a crash or error midway leaves any earlier file at
  ``path`` intact and no partial file behind. Returns ``path`` as ``files.as_path`` gives it.
  """
  path = files.as_path(path)
  arrays = _flat_params(params)
  meta = {**meta, "format_version": FORMAT_VERSION}
  arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    _write_npz(f, arrays)
  return path


def _read_npz(path: epath.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  if not path.is_file():
    raise FileNotFoundError(f"no classifier file at {path}")
  with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    if META_KEY not in npz.files:
      raise ValueError(f"{path} is not a jaxdiff classifier file (no {META_KEY!r} entry)")
    meta = json.loads(str(npz[META_KEY]))
    arrays = {k: npz[k] for k in npz.files if k != META_KEY}
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path} has classifier format version {meta.get('format_version')!r}; this jaxdiff reads"
      f" version {FORMAT_VERSION}"
    )
  return arrays, meta


def load(path: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
  """Loads a classifier written by ``save`` (local or ``gs://``): ``(model, metadata)``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a jaxdiff classifier file, an unknown format version, or parameters that do
      not match the recorded architecture.
  """
  path = files.as_path(path)
  arrays, meta = _read_npz(path)
  model = build_model(meta["channels"], meta["num_classes"], **architecture(meta))
  graphdef, state = nnx.split(model)
  flat = {"/".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(state)}
  if set(flat) != set(arrays):
    raise ValueError(
      f"{path}: parameters do not match the recorded architecture; missing"
      f" {sorted(set(flat) - set(arrays))}, unexpected {sorted(set(arrays) - set(flat))}"
    )
  nested: dict[Any, Any] = {}
  for key, (p, var) in flat.items():
    if arrays[key].shape != var.shape:
      raise ValueError(f"{path}: {key} has shape {arrays[key].shape}, expected {var.shape}")
    node = nested
    for part in p[:-1]:
      node = node.setdefault(part, {})
    node[p[-1]] = jnp.asarray(arrays[key], var.dtype)
  nnx.replace_by_pure_dict(state, nested)
  return nnx.merge(graphdef, state), meta


# ---------------------------------------------------------------- as a feature network


@dataclasses.dataclass(frozen=True)
class _Apply:
  """The static half of ``FeatureNet.apply``: hashable, so equal networks share jit caches."""

  graphdef: nnx.GraphDef
  image_shape: tuple[int, int, int]

  def __call__(self, params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
    # Shapes are static under jit, so this check also fires while tracing.
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(
        f"the classifier expects images [B, {', '.join(map(str, self.image_shape))}] (the size"
        f" and channels it was trained at), got shape {tuple(images.shape)}"
      )
    return nnx.merge(self.graphdef, params)(images.astype(jnp.float32))


def feature_net(path: str | os.PathLike) -> FeatureNet:
  """The classifier at ``path`` as a ``FeatureNet`` (features = the penultimate dense layer).

  ``apply`` takes float32 NHWC images in [-1, 1] at the trained size and channel count and
  raises ValueError naming the expected and actual shapes otherwise.
  """
  model, meta = load(path)
  graphdef, params = nnx.split(model)
  shape = (meta["image_size"], meta["image_size"], meta["channels"])
  return FeatureNet(
    name=f"classifier-{files.slug(meta['dataset'])}-{file_digest(path)}",
    apply=jax.tree_util.Partial(_Apply(graphdef, shape), params),
    feature_dim=meta["feature_dim"],
    num_classes=meta["num_classes"],
  )


# ---------------------------------------------------------------- loss and accuracy


def cross_entropy(
  graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]
) -> jax.Array:
  """Mean softmax cross-entropy of the classifier ``graphdef`` + ``params`` on ``batch``."""
  logits = nnx.merge(graphdef, params)(batch["image"])["logits"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))


def loss(model: Classifier, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on one batch (a scalar)."""
  graphdef, params = nnx.split(model)
  return cross_entropy(graphdef, params, {"image": images, "label": labels})


@functools.cache
def _num_correct_fn(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
  """Jitted ``(params, batch) -> correct predictions``, replicated so every process can read it;
  cached, so evaluating again (another checkpoint, another split) reuses the compiled code."""

  def num_correct(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    logits = nnx.merge(graphdef, params)(batch["image"])["logits"]
    return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) & batch["mask"])

  return jax.jit(num_correct, out_shardings=parallel.replicated(mesh))


def accuracy(
  model: Classifier,
  data_config: ml_collections.ConfigDict,
  *,
  split: str = "test",
  batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[float, int]:
  """Accuracy of ``model`` on every example of ``split`` exactly once: ``(accuracy, count)``.

  Reads the split with ``jaxdiff.data.split_reader``: the last batch's padding is masked out,
  so the result does not depend on ``batch_size`` (rounded to a multiple of the mesh's devices
  and capped at the split's size).

  Raises:
    DatasetNotPreparedError: the tfds dataset is not prepared.
    ValueError: ``batch_size < 1``.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  reader = data.split_reader(data_config, split, batch_size=batch_size, multiple=mesh.size)
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, parallel.replicated(mesh))
  num_correct = _num_correct_fn(graphdef, mesh)
  correct = 0
  for batch in reader:
    batch = parallel.global_batch(mesh, {k: batch[k] for k in ("image", "label", "mask")})
    correct += int(num_correct(params, batch))
  return correct / reader.num_examples, reader.num_examples
