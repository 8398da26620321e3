"""Training the classifier feature network (``jaxdiff.evaluation.classifier``) on a dataset.

AdamW with a linear warm-up (5% of the steps) and cosine decay; the global batch is split over
the mesh and the parameters replicated. The result is measured on a held-out split and written
with ``jaxdiff.evaluation.classifier.save``. From the command line::

  jaxdiff train-classifier --config configs/fashion_mnist.py --out weights/
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm import tqdm

from jaxdiff import data, parallel
from jaxdiff.evaluation import classifier as clf
from jaxdiff.io import files

# Defaults sized for a 2-core CPU: about 3/4 of an epoch of Fashion-MNIST in under two minutes,
# which reaches ~89% test accuracy; a short run favours small batches and a high learning rate.
DEFAULT_STEPS = 700
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_WEIGHT_DECAY = 1e-4


def _check_arguments(
  steps: int, widths: Sequence[int], convs_per_stage: int, **positive: float
) -> None:
  if not isinstance(steps, int | np.integer) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  positive.update({f"widths[{i}]": w for i, w in enumerate(widths)})
  for name, value in positive.items():
    if not value > 0:
      raise ValueError(f"{name} must be positive, got {value!r}")
  if not widths or convs_per_stage < 1:
    raise ValueError(
      f"need at least one stage and one conv per stage, got {widths=}, {convs_per_stage=}"
    )


def _labelled_shape(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], int]:
  """(image shape [H, W, C], number of classes), refusing a dataset with fewer than 2."""
  _, shape, num_classes = data.dataset_info(data_config)
  if num_classes < 2:
    raise ValueError(
      f"dataset {data_config.name!r} has {num_classes} class(es): training a classifier needs"
      " labels with at least two classes (for an image folder, one subfolder per class)"
    )
  return shape, num_classes


def _check_finite(step: int, value: float) -> float:
  if not math.isfinite(value):
    raise FloatingPointError(
      f"classifier training loss is {value} at step {step}; lower the learning rate"
    )
  return value


def _make_train_step(
  graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> Callable[..., tuple[Any, Any, jax.Array]]:
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``, donating the state."""
  rep, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  grad_fn = jax.value_and_grad(functools.partial(clf.cross_entropy, graphdef))

  @functools.partial(
    jax.jit, in_shardings=(rep, rep, sharded), out_shardings=(rep, rep, rep), donate_argnums=(0, 1)
  )
  def train_step(params, opt_state, batch):
    value, grads = grad_fn(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return train_step


def _optimizer(
  steps: int, learning_rate: float, weight_decay: float
) -> optax.GradientTransformation:
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=learning_rate * 0.01
  )
  return optax.adamw(schedule, weight_decay=weight_decay)


def _fit(train_step, params, opt_state, batches, mesh, steps: int, progress: bool):
  """Runs ``steps`` train steps under a bar (process 0) with the last finished step's loss:
  (params, final loss, seconds)."""
  start = time.perf_counter()
  pending = None  # the previous step's loss
  quiet = not progress or jax.process_index() != 0
  bar = tqdm(total=steps, desc="classifier training", unit="step", disable=quiet)
  for step in range(1, steps + 1):
    batch = parallel.global_batch(mesh, next(batches))
    params, opt_state, value = train_step(params, opt_state, batch)
    # Waiting for the previous step keeps at most two in flight: with many queued steps, XLA's
    # CPU devices can deadlock in their all-reduce rendezvous (seen with 8 simulated devices).
    if pending is not None:
      loss = _check_finite(step - 1, float(pending))
      bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # shown at tqdm's next redraw
    bar.update(1)
    pending = value
  final_loss = _check_finite(steps, float(pending))
  bar.set_postfix(loss=f"{final_loss:.4f}")
  bar.close()
  return params, final_loss, time.perf_counter() - start


def _init(
  channels: int, num_classes: int, arch: dict[str, Any], seed: int, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, nnx.State]:
  """The classifier's graphdef and its parameters from ``key(seed)``, replicated over ``mesh``."""
  graphdef, _ = nnx.split(clf.build_model(channels, num_classes, **arch))
  init = lambda k: nnx.state(clf.build_model(channels, num_classes, k, **arch))
  return graphdef, jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(seed))


def _save(out_path: str | Path, params: nnx.State, meta: dict[str, Any]) -> epath.Path:
  """Writes the file (local or ``gs://``) on process 0 once every process has its copy of the
  parameters."""
  path = files.as_path(out_path)
  host_params = parallel.to_host(params)  # collective with several processes: all must call it
  if jax.process_index() == 0:
    clf.save(path, host_params, meta)
  parallel.sync("classifier_saved")
  return path


def train(
  config: ml_collections.ConfigDict,
  out_path: str | Path,
  *,
  steps: int = DEFAULT_STEPS,
  batch_size: int = DEFAULT_BATCH_SIZE,
  learning_rate: float = DEFAULT_LEARNING_RATE,
  weight_decay: float = DEFAULT_WEIGHT_DECAY,
  widths: Sequence[int] = clf.DEFAULT_WIDTHS,
  convs_per_stage: int = clf.DEFAULT_CONVS_PER_STAGE,
  feature_dim: int = clf.DEFAULT_FEATURE_DIM,
  num_groups: int = clf.DEFAULT_NUM_GROUPS,
  eval_split: str = "test",
  seed: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Trains a classifier on ``config.data``, measures it on ``eval_split`` and saves it.

  Initialisation uses ``jax.random.key(seed)``; the data order ``seed``. An image folder is one
  split, so there ``eval_split`` is ignored and the accuracy is on the training images. Every
  process must call it; process 0 writes the file.

  Args:
    config: full jaxdiff config; reads ``config.data``.
    out_path: the ``.npz`` file to write (see ``jaxdiff.evaluation.classifier.save``).
    steps: optimizer steps, >= 1.
    batch_size: global batch, a multiple of the number of devices.
    learning_rate: peak learning rate.
    weight_decay: AdamW's decoupled weight decay.
    widths, convs_per_stage, feature_dim, num_groups: the architecture (see ``Classifier``).
    eval_split: tfds split the accuracy is measured on.
    seed: initialisation and data-order seed.
    progress: a tqdm bar with the loss (process 0 only).

  Returns:
    ``{"test_accuracy": float, "test_examples": int, "train_steps": int, "train_seconds": float,
    "final_loss": float, "path": str}``.

  Raises:
    ValueError: bad arguments, or a dataset without at least two classes.
  """
  _check_arguments(
    steps, widths, convs_per_stage,
    batch_size=batch_size, learning_rate=learning_rate, feature_dim=feature_dim,
  )  # fmt: skip
  shape, num_classes = _labelled_shape(config.data)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh, what="batch_size")
  arch = {
    "image_size": shape[0], "widths": tuple(int(w) for w in widths),
    "convs_per_stage": int(convs_per_stage), "feature_dim": int(feature_dim),
    "num_groups": int(num_groups),
  }  # fmt: skip
  graphdef, params = _init(shape[-1], num_classes, arch, seed, mesh)
  optimizer = _optimizer(steps, learning_rate, weight_decay)
  opt_state = jax.jit(optimizer.init, out_shardings=parallel.replicated(mesh))(params)
  batches = data.make_iterator(config, split=config.data.split, seed=seed, batch_size=batch_size)
  train_step = _make_train_step(graphdef, optimizer, mesh)
  params, final_loss, seconds = _fit(train_step, params, opt_state, batches, mesh, steps, progress)
  model = nnx.merge(graphdef, params)
  accuracy, count = clf.accuracy(model, config.data, split=eval_split, mesh=mesh)
  meta = {
    "dataset": config.data.name, "channels": shape[-1], "num_classes": num_classes, **arch,
    "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
    "eval_split": eval_split, "test_accuracy": accuracy, "test_examples": count,
  }  # fmt: skip
  path = _save(out_path, params, meta)
  return {
    "test_accuracy": accuracy, "test_examples": count, "train_steps": steps,
    "train_seconds": seconds, "final_loss": final_loss, "path": str(path),
  }  # fmt: skip
