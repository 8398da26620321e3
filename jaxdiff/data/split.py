"""One ordered, padded-and-masked reader of a whole split: what every evaluator reads.

``SplitReader`` walks the first N examples of a source (all of them by default) once, in
order, without shuffling or flips, in global batches of B examples: global batch ``s`` holds
examples ``[s B, (s + 1) B)``. Process ``p`` of ``P`` gets the contiguous slice
``[s B + p b, s B + (p + 1) b)`` with ``b = B / P``, so gathering the processes' rows in process
order (what ``jax.make_array_from_process_local_data`` and ``parallel.to_host`` do) restores
example order. The last batch is padded to full size with zero pixels (black) whose ``mask`` is
False; ``index`` is each row's global position (``>= N`` on padding). B is the requested batch
size capped at N, then rounded up (``parallel.round_up``) to a multiple of the device count and
the process count, so a small split is one batch with little padding.

Batches are ``{"image": float32 [b, H, W, C] in [-1, 1] (exactly io.images.from_uint8),
"label": int32 [b], "mask": bool [b], "index": int64 [b]}``.

Example::

  reader = split_reader(config.data, "test", batch_size=256, multiple=mesh.size)
  for batch in reader:                                # this process's rows
    batch = parallel.global_batch(mesh, batch)        # global arrays, in example order
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from jaxdiff import parallel
from jaxdiff.data.sources import make_source, read_records
from jaxdiff.io.images import model_space


class _ReadStep:
  """Global batch number -> this process's rows of it (one batched read, zero padding)."""

  def __init__(self, source: Sequence[Any], num: int, batch: int, local: int, p: int, pixels: bool):
    self.source, self.num, self.batch, self.local = source, num, batch, local
    self.process_index, self.pixels = p, pixels

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    start = step * self.batch + self.process_index * self.local
    index = np.arange(start, start + self.local, dtype=np.int64)  # [b]
    mask = index < self.num
    records = read_records(self.source, index[mask])
    template = np.asarray((records[0] if records else self.source[0])["image"])
    image = np.zeros((self.local, *template.shape), template.dtype)  # [b, H, W, C]
    label = np.zeros(self.local, np.int32)
    if records:
      image[mask] = np.stack([r["image"] for r in records])
      label[mask] = [r["label"] for r in records]
    return {
      "image": image if self.pixels else model_space(image),
      "label": label,
      "mask": mask,
      "index": index,
    }


class SplitReader:
  """This process's ordered, padded and masked batches over the first N examples of ``source``.

  Args:
    source: random-access source of ``{"image": [H, W, C], "label": int}``.
    batch_size: global batch size B wanted (rounded up and capped, see the module docstring).
    num_examples: N, the first examples to read; None for all.
    multiple: B is a multiple of this (the mesh's device count).
    process_index: p; defaults to ``jax.process_index()``.
    process_count: P; defaults to ``jax.process_count()``.
    prefetch: batches read ahead by reader threads; 0 reads synchronously.
    pixels: keep images as the source holds them (uint8) instead of scaling to [-1, 1].
    name: what the source is, for error messages.

  Attributes:
    num_examples: N.
    batch_size: the global B after rounding.
    local_batch_size: b = B / P rows per process per batch.

  Raises:
    ValueError: ``num_examples`` outside ``1..len(source)``, or ``batch_size < 1``.
  """

  def __init__(
    self,
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    num_examples: int | None = None,
    multiple: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    pixels: bool = False,
    name: str = "the source",
  ):
    available = len(source)
    n = available if num_examples is None else num_examples
    if not 1 <= n <= available:
      raise ValueError(f"num_examples={num_examples}; {name} has 1..{available}")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    self.source, self.num_examples = source, n
    self.batch_size = parallel.round_up(min(batch_size, n), math.lcm(multiple, count))
    self.local_batch_size = self.batch_size // count
    self.prefetch = prefetch
    self._read = _ReadStep(source, n, self.batch_size, self.local_batch_size, p, pixels)

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    ds = grain.MapDataset.range(len(self)).map(self._read)
    # Two reader threads, as in the training pipeline: enough to hide reading behind compute.
    threads = max(1, min(2, self.prefetch))
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch)
    return iter(ds.to_iter_dataset(options))


def split_reader(
  data: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  num_examples: int | None = None,
  multiple: int = 1,
  process_index: int | None = None,
  process_count: int | None = None,
  pixels: bool = False,
) -> SplitReader:
  """``SplitReader`` over ``split`` of the dataset of ``data`` (the ``config.data`` section).

  Raises:
    DatasetNotPreparedError: the tfds dataset is not prepared.
    ValueError: see ``SplitReader``.
  """
  return SplitReader(
    make_source(data, split=split),
    batch_size=batch_size,
    num_examples=num_examples,
    multiple=multiple,
    process_index=process_index,
    process_count=process_count,
    prefetch=data.get("prefetch", 2),
    pixels=pixels,
    name=f"split {split!r}",
  )


def read_examples(
  data: ml_collections.ConfigDict, split: str, num_examples: int | None = None
) -> np.ndarray:
  """The first ``num_examples`` (all if None) images of a split, uint8 ``[N, H, W, C]``, on
  every process (each reads them all: for evaluation sets held in memory).

  Raises:
    DatasetNotPreparedError: the tfds dataset is not prepared.
    ValueError: ``num_examples`` < 1 or more than the split holds.
  """
  reader = split_reader(
    data, split, batch_size=1024, num_examples=num_examples, process_index=0, process_count=1,
    pixels=True,
  )  # fmt: skip
  return np.concatenate([b["image"][b["mask"]] for b in reader])
