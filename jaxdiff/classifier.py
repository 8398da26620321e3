"""A small CNN classifier trained on a labelled dataset, used as a feature network.

For MNIST-like data the ImageNet-trained Inception features are a poor fit, so sample quality
is better measured in the feature space of a classifier trained on the data itself. ``train``
fits one and writes it to a single ``.npz``; ``feature_net`` loads it behind the
``jaxdiff.features.FeatureNet`` interface::

  python -m jaxdiff.classifier --config configs/fashion_mnist.py --out fmnist_classifier.npz

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
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxdiff import data, files, parallel
from jaxdiff.features import FeatureNet, file_digest

FORMAT_VERSION = 1
META_KEY = "__meta__"

# Defaults sized for a 2-core CPU: about 3/4 of an epoch of Fashion-MNIST in under two minutes,
# which reaches ~89% test accuracy; a short run favours small batches and a high learning rate.
DEFAULT_WIDTHS = (32, 64)
DEFAULT_CONVS_PER_STAGE = 1
DEFAULT_FEATURE_DIM = 128
DEFAULT_NUM_GROUPS = 8
DEFAULT_STEPS = 700
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_WEIGHT_DECAY = 1e-4
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


def _architecture(meta: dict[str, Any]) -> dict[str, Any]:
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


def save(path: str | Path, params: nnx.State, meta: dict[str, Any]) -> Path:
  """Writes ``params`` and ``meta`` to one ``.npz`` at ``path``, atomically.

  The file is written under a temporary name in the same directory and renamed into place, so
  a crash or error midway leaves any earlier file at ``path`` intact and no partial file behind.
  """
  path = Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = _flat_params(params)
  meta = {**meta, "format_version": FORMAT_VERSION}
  arrays[META_KEY] = np.array(json.dumps(meta, sort_keys=True))
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    _write_npz(f, arrays)
  return path


def load(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
  """Loads a classifier written by ``train`` / ``save``: ``(model, metadata)``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a jaxdiff classifier file, an unknown format version, or parameters that do
      not match the recorded architecture.
  """
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"no classifier file at {path}")
  with np.load(path, allow_pickle=False) as npz:
    if META_KEY not in npz.files:
      raise ValueError(f"{path} is not a jaxdiff classifier file (no {META_KEY!r} entry)")
    meta = json.loads(str(npz[META_KEY]))
    arrays = {k: npz[k] for k in npz.files if k != META_KEY}
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path} has classifier format version {meta.get('format_version')!r}; this jaxdiff reads"
      f" version {FORMAT_VERSION}"
    )
  model = build_model(meta["channels"], meta["num_classes"], **_architecture(meta))
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


def _safe_name(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def feature_net(path: str | Path) -> FeatureNet:
  """The classifier at ``path`` as a ``FeatureNet`` (features = the penultimate dense layer).

  ``apply`` takes float32 NHWC images in [-1, 1] at the trained size and channel count and
  raises ValueError naming the expected and actual shapes otherwise.
  """
  model, meta = load(path)
  graphdef, params = nnx.split(model)
  shape = (meta["image_size"], meta["image_size"], meta["channels"])
  return FeatureNet(
    name=f"classifier-{_safe_name(meta['dataset'])}-{file_digest(path)}",
    apply=jax.tree_util.Partial(_Apply(graphdef, shape), params),
    feature_dim=meta["feature_dim"],
    num_classes=meta["num_classes"],
  )


# ---------------------------------------------------------------- training


def _cross_entropy(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array]):
  logits = nnx.merge(graphdef, params)(batch["image"])["logits"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))


def loss(model: Classifier, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on one batch (a scalar)."""
  graphdef, params = nnx.split(model)
  return _cross_entropy(graphdef, params, {"image": images, "label": labels})


def _check_positive(**values: float) -> None:
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{name} must be positive, got {value!r}")


def _check_finite(step: int, value: float) -> float:
  if not math.isfinite(value):
    raise FloatingPointError(
      f"classifier training loss is {value} at step {step}; lower the learning rate"
    )
  return value


def _eval_batches(source, batch_size: int):
  """(images [B, H, W, C], labels [B], mask [B]) over every example once, the last padded."""
  n = len(source)
  for start in range(0, n, batch_size):
    indices = list(range(start, min(start + batch_size, n)))
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(indices)
    else:
      records = [source[i] for i in indices]
    # The same scaling as the training pipeline (jaxdiff.data).
    images = np.stack([r["image"] for r in records]).astype(np.float32) / np.float32(127.5) - 1
    labels = np.array([r["label"] for r in records], np.int32)
    pad = batch_size - len(indices)
    mask = np.concatenate([np.ones(len(indices), np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    yield images, labels, mask


def evaluate(
  model: Classifier,
  config: ml_collections.ConfigDict,
  *,
  split: str = "test",
  batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[float, int]:
  """Accuracy of ``model`` on every example of ``split`` exactly once: ``(accuracy, count)``.

  The last, partial batch is padded and the padding masked out, so the result does not depend
  on ``batch_size``. ``batch_size`` is capped at the split's size and rounded up to a multiple
  of the mesh's devices.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  source = data.make_source(config.data, split=split)
  # No bigger than the split (less padding), and a whole number of rows per device.
  batch_size = min(batch_size, len(source))
  batch_size = -(-batch_size // mesh.size) * mesh.size
  graphdef, params = nnx.split(model)
  rep, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(rep, sharded, sharded, sharded), out_shardings=rep)
  def correct(params, images, labels, mask):
    logits = nnx.merge(graphdef, params)(images)["logits"]
    return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)

  params = jax.device_put(params, rep)
  p, n_proc = jax.process_index(), jax.process_count()
  local = batch_size // n_proc
  total, count = 0.0, 0
  for images, labels, mask in _eval_batches(source, batch_size):
    # Every process reads the whole batch (cheap at eval sizes) and contributes its slice.
    cut = slice(p * local, (p + 1) * local)
    batch = parallel.global_batch(
      mesh, {"image": images[cut], "label": labels[cut], "mask": mask[cut]}
    )
    total += float(correct(params, batch["image"], batch["label"], batch["mask"]))
    count += int(mask.sum())
  return total / count, count


def train(
  config: ml_collections.ConfigDict,
  out_path: str | Path,
  *,
  steps: int = DEFAULT_STEPS,
  batch_size: int = DEFAULT_BATCH_SIZE,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  weight_decay: float = DEFAULT_WEIGHT_DECAY,
  widths: Sequence[int] = DEFAULT_WIDTHS,
  convs_per_stage: int = DEFAULT_CONVS_PER_STAGE,
  feature_dim: int = DEFAULT_FEATURE_DIM,
  num_groups: int = DEFAULT_NUM_GROUPS,
  eval_split: str = "test",
  seed: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains a classifier on ``config.data``, evaluates it on ``eval_split`` and saves it.

  AdamW with a linear warm-up (5% of the steps) and cosine decay; the global batch is split over
  ``parallel.make_mesh()`` and the parameters replicated. Initialisation uses
  ``jax.random.key(seed)``; the data order ``seed``. An image folder is one split, so there
  ``eval_split`` is ignored and the accuracy is on the training images.

  Args:
    config: full jaxdiff config; reads ``config.data``.
    out_path: the ``.npz`` file to write (see ``save``).
    steps: optimizer steps, >= 1.
    batch_size: global batch, a multiple of the number of devices.
    learning_rate: peak learning rate.
    weight_decay: AdamW's decoupled weight decay.
    widths, convs_per_stage, feature_dim, num_groups: the architecture (see ``Classifier``).
    eval_split: tfds split the accuracy is measured on.
    seed: initialisation and data-order seed.
    progress: print the loss to stderr every 100 steps (process 0 only).

  Returns:
    ``{"test_accuracy": float, "test_examples": int, "train_steps": int, "train_seconds": float,
    "final_loss": float, "path": str}``.

  Raises:
    ValueError: bad arguments, or a dataset without at least two classes.
  """
  if not isinstance(steps, int | np.integer) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  _check_positive(
    batch_size=batch_size,
    learning_rate=learning_rate,
    feature_dim=feature_dim,
    **{f"widths[{i}]": w for i, w in enumerate(widths)},
  )
  if not widths or convs_per_stage < 1:
    raise ValueError(
      f"need at least one stage and one conv per stage, got {widths=}, {convs_per_stage=}"
    )
  data_cfg = config.data
  _, shape, num_classes = data.dataset_info(data_cfg)
  if num_classes < 2:
    raise ValueError(
      f"dataset {data_cfg.name!r} has {num_classes} class(es): training a classifier needs labels"
      " with at least two classes (for an image folder, one subfolder per class)"
    )
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh)
  architecture = {
    "image_size": shape[0],
    "widths": tuple(int(w) for w in widths),
    "convs_per_stage": int(convs_per_stage),
    "feature_dim": int(feature_dim),
    "num_groups": int(num_groups),
  }

  rep, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  init_key = jax.random.key(seed)
  graphdef, _ = nnx.split(build_model(shape[-1], num_classes, **architecture))
  params = jax.jit(
    lambda k: nnx.state(build_model(shape[-1], num_classes, k, **architecture)), out_shardings=rep
  )(init_key)
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=learning_rate * 0.01
  )
  optimizer = optax.adamw(schedule, weight_decay=weight_decay)
  opt_state = jax.jit(optimizer.init, out_shardings=rep)(params)
  grad_fn = jax.value_and_grad(functools.partial(_cross_entropy, graphdef))

  @functools.partial(
    jax.jit, in_shardings=(rep, rep, sharded), out_shardings=(rep, rep, rep), donate_argnums=(0, 1)
  )
  def train_step(params, opt_state, batch):
    value, grads = grad_fn(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  it = data.make_iterator(
    config, split=data_cfg.split, seed=seed, batch_size=batch_size, shuffle=True, num_epochs=None
  )
  start = time.perf_counter()
  pending = None  # the previous step's loss
  for step in range(1, steps + 1):
    batch = parallel.global_batch(mesh, next(it))
    params, opt_state, value = train_step(params, opt_state, batch)
    # Waiting for the previous step keeps at most two in flight: with many queued steps, XLA's
    # CPU devices can deadlock in their all-reduce rendezvous (seen with 8 simulated devices).
    if pending is not None:
      _check_finite(step - 1, float(pending))
    pending = value
    if progress and jax.process_index() == 0 and (step % 100 == 0 or step == steps):
      print(f"classifier step {step}/{steps} loss {float(value):.4f}", file=sys.stderr, flush=True)
  final_loss = _check_finite(steps, float(pending))
  train_seconds = time.perf_counter() - start

  model = nnx.merge(graphdef, params)
  accuracy, count = evaluate(model, config, split=eval_split, mesh=mesh)
  meta = {
    "dataset": data_cfg.name,
    "channels": shape[-1],
    "num_classes": num_classes,
    **architecture,
    "steps": steps,
    "batch_size": batch_size,
    "learning_rate": learning_rate,
    "seed": seed,
    "eval_split": eval_split,
    "test_accuracy": accuracy,
    "test_examples": count,
  }
  path = Path(out_path).expanduser()
  host_params = parallel.to_host(params)  # collective with several processes: all must call it
  if jax.process_index() == 0:
    save(path, host_params, meta)
  parallel.sync("classifier_saved")
  return {
    "test_accuracy": accuracy,
    "test_examples": count,
    "train_steps": steps,
    "train_seconds": train_seconds,
    "final_loss": final_loss,
    "path": str(path),
  }


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str]) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  flags_ = flags.FLAGS
  result = train(
    flags_.config,
    flags_.out,
    steps=flags_.steps,
    batch_size=flags_.batch_size,
    learning_rate=flags_.learning_rate,
    seed=flags_.seed,
  )
  print(json.dumps(result), flush=True)


def _define_flags() -> None:
  # Only when run as a script: defining absl flags on import would clash with train.py's.
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string("out", None, "The .npz file to write.")
  flags.DEFINE_integer("steps", DEFAULT_STEPS, "Training steps.")
  flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Global batch size.")
  flags.DEFINE_float("learning_rate", DEFAULT_LEARNING_RATE, "Peak learning rate.")
  flags.DEFINE_integer("seed", 0, "Initialisation and data-order seed.")
  config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  parallel.use_all_cpu_cores()
  parallel.maybe_initialize_distributed()
  app.run(main)
