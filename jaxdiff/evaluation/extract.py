"""Applying a feature network to many images, batch by batch, on every device and process."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff import data, parallel
from jaxdiff.evaluation.featurenet import FeatureNet


@jax.jit
def _apply(apply: jax.tree_util.Partial, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  out = apply(images)
  return out["features"], out["logits"]


def _images_and_mask(batch: Any) -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [b, H, W, C], mask bool [b]) of a batch dict or a bare image array."""
  images = batch["image"] if isinstance(batch, Mapping) else batch
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image batches must be NHWC [B, H, W, C], got shape {images.shape}")
  mask = batch.get("mask") if isinstance(batch, Mapping) else None
  mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
  return images, mask


def _progress(items: Iterable[Any], desc: str) -> Iterable[Any]:
  """``items`` under a tqdm bar labelled ``desc``, drawn on process 0 only."""
  from tqdm import tqdm

  total = len(items) if hasattr(items, "__len__") else None
  return tqdm(items, total=total, desc=desc, unit="batch", disable=jax.process_index() != 0)


def compute_features(
  feature_net: FeatureNet,
  batches: np.ndarray | Iterable[Any],
  mesh: Mesh | None = None,
  *,
  batch_size: int = 256,
  progress: bool = False,
  desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
  """Applies ``feature_net`` to images, batch by batch, under one ``jax.jit``.

  Each batch is split over the mesh's ``data`` axis; rows whose ``mask`` is False (the split
  reader's padding) are dropped after gathering. A batch whose size is not a multiple of this
  process's devices is padded (and the padding masked); a short batch is padded to the size of
  the batches before it, so it reuses their compiled program instead of compiling another.

  Args:
    feature_net: the network; its ``apply`` (a ``jax.tree_util.Partial``) is passed to the
      jitted function as an argument, so its weights are not baked into the program.
    batches: this process's batches, in the same sizes on every process: dicts with an
      ``"image"`` entry (float32 ``[b, H, W, C]`` in ``[-1, 1]``) and optionally a ``"mask"``,
      such as ``jaxdiff.data.SplitReader`` yields, or bare image arrays. Or all the images as
      one array ``[N, H, W, C]`` (uint8, or floats in ``[-1, 1]``) held whole by every process:
      it is read with a ``SplitReader`` in global batches of ``batch_size``.
    mesh: defaults to ``parallel.make_mesh()``.
    batch_size: global batch size when ``batches`` is one array.
    progress: show a tqdm bar over the batches (on process 0).
    desc: the bar's label, which says what is being extracted (e.g. ``"sample features"``);
      the network's name is appended.

  Returns:
    NumPy ``features [N, D]`` and ``logits [N, K]`` of the unmasked rows on every process, step
    by step and process 0's rows first within a step: for a ``SplitReader`` (and an array),
    example order.

  Raises:
    ValueError: no images, or a batch that is not NHWC.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  if isinstance(batches, np.ndarray | jax.Array):
    source = data.ArraySource(np.asarray(batches))
    batches = data.SplitReader(source, batch_size=batch_size, multiple=mesh.size, prefetch=0)
  items = _progress(batches, f"{desc} ({feature_net.name})") if progress else batches
  local_devices = len(mesh.local_devices)
  padded_size = 0
  features, logits = [], []
  for batch in items:
    images, mask = _images_and_mask(batch)
    if len(images) == 0:
      continue
    padded_size = max(padded_size, parallel.round_up(len(images), local_devices))
    mask = np.concatenate([mask, np.zeros(padded_size - len(mask), bool)])
    x = parallel.global_batch(mesh, {"image": parallel.pad_to(images, padded_size), "mask": mask})
    f, g, keep = parallel.to_host((*_apply(feature_net.apply, x["image"]), x["mask"]))
    features.append(f[keep])
    logits.append(g[keep])
  if not features:
    raise ValueError("compute_features got no images")
  return np.concatenate(features), np.concatenate(logits)
