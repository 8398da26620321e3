"""The training input pipeline: a checkpointable grain pipeline over a source.

``make_dataset`` is a ``grain.MapDataset`` over record indices: shuffle by seed (a fresh
permutation each epoch), cut each epoch to a whole number of global batches, repeat, draw
horizontal flips by (seed, position in the stream), shard, batch, then read each host batch with
one batched read. Host ``p`` of ``P`` takes stream elements ``p, p + P, ...``, so global batch
``s`` is always stream elements ``[s * B, (s + 1) * B)`` whatever the number of hosts, and hosts
never overlap. Images come out NHWC float32 in ``[-1, 1]``, exactly
``jaxdiff.io.images.from_uint8``; labels int32. Each host gets ``[B // P, H, W, C]`` NumPy
batches; build the global ``jax.Array`` with ``jaxdiff.parallel.global_batch``.

Checkpointing: the iterator is a ``grain.DatasetIterator``. ``it.get_state()`` is a small
JSON-able dict (``{"next_index": n}``; per-worker indices when ``data.num_workers > 0``) and
``it.set_state(state)`` on a fresh iterator built from the same config, seed, hosts and
``num_workers`` resumes with exactly the same batches. With orbax, save it next to the train
state::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state), data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))

Evaluation reads whole splits in order through ``jaxdiff.data.split`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from jaxdiff.data.sources import make_source, read_records
from jaxdiff.io.images import model_space


def _draw_flip(index: int, rng: np.random.Generator) -> tuple[int, bool]:
  return index, bool(rng.random() < 0.5)


def _no_flip(index: int) -> tuple[int, bool]:
  return index, False


class _DrawDrop:
  """(index, flip) -> (index, flip, drop): drop the caption with probability ``rate``."""

  def __init__(self, rate: float):
    self.rate = rate

  def __call__(self, item: tuple[int, bool], rng: np.random.Generator) -> tuple[int, bool, bool]:
    return (*item, bool(rng.random() < self.rate))


class _ReadBatch:
  """(record indices [b], flips [b], caption drops [b]) -> model batch: one batched read, flip,
  scale to [-1, 1]; with a caption table, each example's caption row (row 0, the empty prompt,
  where dropped)."""

  def __init__(self, source: Sequence[Mapping[str, Any]], text: Any = None):
    self.source = source
    self.text = text

  def __call__(self, batch: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
    indices, flips, *drops = batch  # drops only with text
    records = read_records(self.source, indices)
    image = np.stack([r["image"] for r in records])  # [b, H, W, C] uint8
    image = np.where(flips[:, None, None, None], image[:, :, ::-1], image)
    out = {
      "image": model_space(image),  # [b, H, W, C]
      "label": np.array([r["label"] for r in records], np.int32),  # [b]
    }
    if self.text is not None:
      rows = np.where(drops[0], 0, self.text.index[np.asarray(indices)])
      out.update(self.text.rows(rows))  # tokens [b, L, D], mask [b, L], pooled [b, D]
    return out


def _check_worker_flags() -> None:
  # grain 0.2.18 reads an absl flag when it starts worker processes and fails deep inside its
  # workers unless flags are parsed (google/grain#1355, fixed upstream by #1362). Marking them
  # parsed here would change global absl state behind the caller's back, so say how instead.
  if not flags.FLAGS.is_parsed():
    raise RuntimeError(
      "data.num_workers > 0 starts grain worker processes, which (grain 0.2.18) need absl flags"
      " to be parsed: run under absl.app.run (as jaxdiff's command lines do), or call"
      " absl.flags.FLAGS.mark_as_parsed() once yourself, or set data.num_workers = 0"
    )


def make_dataset(
  source: Sequence[Mapping[str, Any]],
  *,
  seed: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
  num_epochs: int | None = None,
  random_flip: bool = False,
  prefetch: int = 2,
  num_threads: int = 2,
  num_workers: int = 0,
  text: Any = None,
  caption_dropout: float = 0.0,
) -> grain.IterDataset:
  """Builds the per-host batch pipeline over ``source`` (see the module docstring).

  grain shuffles, repeats and shards record indices; each host batch is then read with one
  batched read, which for array_record is several times faster than reading records one by one.

  Args:
    source: random-access source of ``{"image": uint8 [H, W, C], "label": int}``.
    seed: shuffle and flip seed, in [0, 2**32).
    batch_size: global batch size B, a multiple of process_count.
    process_index: this host's index p.
    process_count: number of hosts P.
    shuffle: shuffle globally (a different permutation each epoch).
    num_epochs: None repeats forever.
    random_flip: flip images horizontally with probability 1/2.
    prefetch: batches buffered ahead by reader threads; 0 reads synchronously.
    num_threads: reader threads per process.
    num_workers: > 0 moves reading into that many worker processes (needs parsed absl flags).
    text: a :class:`jaxdiff.prompts.CaptionTable` of ``source``: batches also hold each
      example's caption encoding.
    caption_dropout: the probability of an example's caption being the empty prompt (row 0).

  Returns:
    Dataset of ``{"image": float32 [B // P, H, W, C] in [-1, 1], "label": int32 [B // P]}``
    (and ``tokens``, ``mask``, ``pooled`` with ``text``).

  Raises:
    ValueError: a batch size that does not fit.
    RuntimeError: ``num_workers > 0`` outside absl with unparsed flags (the message says what
      to do).
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not a multiple of process_count {process_count}")
  steps_per_epoch = len(source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} examples")
  if num_workers > 0:
    _check_worker_flags()
  ds = grain.MapDataset.range(len(source))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Drop each epoch's remainder before sharding so every host runs the same number of steps.
  ds = ds[: steps_per_epoch * batch_size].repeat(num_epochs)
  if random_flip:
    # Drawn per position in the global stream: the same on resume and for any host count.
    flip_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    ds = ds.random_map(_draw_flip, seed=flip_seed)
  else:
    ds = ds.map(_no_flip)
  if text is not None:  # (a run without text keeps its pipeline, and its iterator state, as was)
    # Like the flips: per position in the global stream, from a stream of its own.
    drop_seed = int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])
    ds = ds.random_map(_DrawDrop(caption_dropout), seed=drop_seed)
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_ReadBatch(source, text))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def make_iterator(
  config: ml_collections.ConfigDict,
  *,
  split: str = "train",
  seed: int | None = None,
  batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  shuffle: bool = True,
  num_epochs: int | None = None,
  source: Sequence[Mapping[str, Any]] | None = None,
  text: Any = None,
) -> grain.DatasetIterator:
  """Returns this host's checkpointable iterator of batches for ``config``.

  Args:
    config: full config; reads ``config.data`` (and the defaults below).
    split: tfds split, e.g. "train" or "test[:1000]".
    seed: defaults to ``config.seed``.
    batch_size: global batch size; defaults to ``config.training.batch_size``.
    process_index: defaults to ``jax.process_index()``.
    process_count: defaults to ``jax.process_count()``.
    shuffle: shuffle globally by seed.
    num_epochs: None repeats forever.
    source: read this source instead of ``config.data``'s (e.g. a latent run's cached latents).
    text: the split's :class:`jaxdiff.prompts.CaptionTable` (a text run), dropped at
      ``config.text.caption_dropout``.

  Returns:
    ``grain.DatasetIterator`` of ``{"image": float32 [b, H, W, C], "label": int32 [b]}`` with
    ``b = batch_size // process_count``; ``get_state()`` / ``set_state()`` resume it exactly.
  """
  data = config.data
  ds = make_dataset(
    make_source(data, split=split) if source is None else source,
    seed=config.seed if seed is None else seed,
    batch_size=config.training.batch_size if batch_size is None else batch_size,
    process_index=jax.process_index() if process_index is None else process_index,
    process_count=jax.process_count() if process_count is None else process_count,
    shuffle=shuffle,
    num_epochs=num_epochs,
    random_flip=data.random_flip,
    prefetch=data.prefetch,
    num_workers=data.num_workers,
    text=text,
    caption_dropout=config.text.caption_dropout if text is not None else 0.0,
  )
  return iter(ds)
