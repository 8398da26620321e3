"""Data input: tfds or image-folder sources feeding a checkpointable grain pipeline.

Sources (``make_source``) are grain random-access sources of ``{"image": uint8 [H, W, C],
"label": int}`` already at ``data.image_size`` and ``data.channels``:

* any tfds image dataset prepared as array_record (``prepare``), read through
  ``tfds.data_source``, which needs no TensorFlow. Images whose stored shape differs from the
  config are converted (grey <-> RGB) and center-cropped to their largest central square, then
  resized with PIL's antialiased bicubic filter (celeb_a 218x178 -> 178x178 -> 64x64).
  Datasets without a ``label`` feature get label 0.
* ``data.name == "image_folder"``: every PNG/JPEG under ``data.image_folder`` (recursively,
  sorted by path), cropped and resized the same way. If every image lies in a first-level
  subfolder, the label is that subfolder's index among the sorted subfolder names (torchvision's
  ImageFolder convention); otherwise every label is 0. The folder is one split: ``split`` is
  ignored.

The pipeline (``make_dataset``) is a ``grain.MapDataset`` over record indices: shuffle by seed
(a fresh permutation each epoch), cut each epoch to a whole
number of global batches, repeat, draw horizontal flips by (seed, position in the stream), shard,
batch, then read each host batch with one batched read. Host ``p`` of ``P`` takes stream elements
``p, p + P, ...``, so global batch ``s`` is always stream elements ``[s * B, (s + 1) * B)``
whatever the number of hosts, and hosts never overlap. Images come out NHWC float32 in
``[-1, 1]``, exactly ``x.astype(float32) / 127.5 - 1``; labels int32. Each host gets
``[B // P, H, W, C]`` NumPy batches; build the global ``jax.Array`` with
``jax.make_array_from_process_local_data``.

Checkpointing: the iterator is a ``grain.DatasetIterator``. ``it.get_state()`` is a small
JSON-able dict (``{"next_index": n}``; per-worker indices when ``data.num_workers > 0``) and
``it.set_state(state)`` on a fresh iterator built from the same config, seed, hosts and
``num_workers`` resumes with exactly the same batches. With orbax, save it next to the train
state::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state), data=grain.checkpoint.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(it)))

Training calls ``prepare(data.name, data_dir=data.data_dir, manual_dir=data.manual_dir)`` before
``make_iterator`` (a no-op once prepared; with several hosts sharing data_dir, on one host only,
then a barrier). Or prepare once by hand (needs ``pip install 'jaxdiff[prepare]'``)::

  python -m jaxdiff.data --name fashion_mnist --manual_dir ../shared/data/fashion_mnist \\
      --data_dir ~/tensorflow_datasets
"""

import argparse
import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class DatasetNotPreparedError(RuntimeError):
  """The tfds dataset is not prepared in data_dir and cannot be prepared here."""


def _abspath(path: str | os.PathLike | None) -> str | None:
  # Relative paths (as CI passes them) are taken against the current working directory.
  return os.path.abspath(os.path.expanduser(path)) if path else None


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  return tfds.builder(name, data_dir=_abspath(data_dir), file_format="array_record")


def _raw_files(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """Maps each raw file tfds expects in manual_dir to its URL ({} if tfds does not say)."""
  try:
    url_infos = builder.url_infos or {}
  except ImportError:  # tfds 4.9.10 needs importlib_resources here but does not declare it
    url_infos = {}
  return {info.filename: url for url, info in url_infos.items() if info.filename}


def _not_prepared(builder: tfds.core.DatasetBuilder, problems: Sequence[str]) -> str:
  files = ", ".join(sorted(_raw_files(builder))) or "the dataset's official raw files"
  return (
    f"dataset {builder.name!r} is not prepared in {builder.data_dir}; pass "
    f"--config.data.manual_dir=PATH to a folder holding {files} (and install TensorFlow, "
    f"needed only to prepare: pip install 'jaxdiff[prepare]'), or prepare it once with "
    f"`python -m jaxdiff.data --name {builder.name} --manual_dir PATH --data_dir DATA_DIR`. "
    f"Here: {'; '.join(problems)}."
  )


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _reachable(urls: Sequence[str], timeout: float = 5.0) -> bool:
  # Without this probe an offline machine spends minutes in tfds' download retries.
  host = urllib.parse.urlparse(urls[0]).hostname if urls else None
  if host is None:
    return True
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def prepare(name: str, *, data_dir: str | None, manual_dir: str | None = None) -> None:
  """Prepares tfds dataset ``name`` as array_record in ``data_dir``; a no-op if already there.

  tfds writes into a temporary ``incomplete.*`` folder and renames it only on success, so a failed
  or killed prepare never leaves a folder that looks prepared. Extracted raw files go to a
  temporary download dir that is removed afterwards.

  Args:
    name: tfds dataset name, e.g. "fashion_mnist". "image_folder" needs no preparing.
    data_dir: tfds data_dir; None or "" for tfds' default (~/tensorflow_datasets).
    manual_dir: folder with the official raw files (offline); None to download them.

  Raises:
    DatasetNotPreparedError: not prepared and not preparable here (one message says what to pass).
  """
  if name == "image_folder":
    return
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return
  manual_dir = _abspath(manual_dir)
  raw_files = _raw_files(builder)
  problems = []
  if manual_dir and not os.path.isdir(manual_dir):
    problems.append(f"manual_dir {manual_dir} does not exist")
  elif manual_dir and (missing := [f for f in raw_files if not Path(manual_dir, f).exists()]):
    problems.append(f"manual_dir {manual_dir} lacks {', '.join(sorted(missing))}")
  if not _has_tensorflow():
    problems.append("TensorFlow is not installed")
  if not manual_dir and not problems and not _reachable(list(raw_files.values())):
    problems.append("no manual_dir was given and the download host is unreachable")
  if problems:
    raise DatasetNotPreparedError(_not_prepared(builder, problems))
  downloads = Path(builder.data_dir_root) / "downloads"
  downloads.mkdir(parents=True, exist_ok=True)
  # One download dir per call: tfds names extracted files after the archive, and mnist and
  # fashion_mnist archives share their names.
  download_dir = tempfile.mkdtemp(prefix=f"{name}.", dir=downloads)
  try:
    builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
  except Exception as e:
    raise DatasetNotPreparedError(_not_prepared(builder, [f"preparing failed: {e!r}"])) from e
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)


def _to_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """uint8 [h, w, c] -> uint8 [size, size, channels]: convert, crop central square, resize."""
  if image.shape == (size, size, channels):
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  return _pil_to_image(pil, size, channels)


def _pil_to_image(pil: Image.Image, size: int, channels: int) -> np.ndarray:
  pil = pil.convert({1: "L", 3: "RGB"}[channels])
  w, h = pil.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  pil = pil.crop((left, top, left + side, top + side))
  if side != size:
    pil = pil.resize((size, size), Image.Resampling.BICUBIC)  # antialiased when shrinking
  return np.asarray(pil, dtype=np.uint8).reshape(size, size, channels)


class ImageFolderSource:
  """Random-access source over the PNG/JPEG files under ``root`` (see the module docstring)."""

  def __init__(self, root: str, *, image_size: int, channels: int):
    if not root:
      raise ValueError("data.name is 'image_folder' but data.image_folder is empty")
    root_path = Path(_abspath(root))
    self.paths = sorted(
      p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not self.paths:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {root_path}")
    parts = [p.relative_to(root_path).parts for p in self.paths]
    self.classes = sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = [index[q[0]] if self.classes else 0 for q in parts]
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    with Image.open(self.paths[i]) as pil:
      image = _pil_to_image(pil, self.image_size, self.channels)
    return {"image": image, "label": self.labels[i]}


class TfdsSource:
  """A ``tfds.data_source`` split with images brought to ``image_size`` / ``channels``."""

  def __init__(self, source: Sequence[Mapping[str, Any]], *, image_size: int, channels: int):
    self.source, self.image_size, self.channels = source, image_size, channels

  def __len__(self) -> int:
    return len(self.source)

  def _convert(self, record: Mapping[str, Any]) -> dict[str, Any]:
    image = _to_image(np.asarray(record["image"]), self.image_size, self.channels)
    return {"image": image, "label": int(record.get("label", 0))}

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._convert(self.source[i])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    # Batched read: array_record fetches the records in parallel.
    return [self._convert(r) for r in self.source.__getitems__(list(indices))]


def make_source(data: ml_collections.ConfigDict, *, split: str) -> ImageFolderSource | TfdsSource:
  """Returns the random-access source of ``{"image": uint8 [H, W, C], "label": int}``.

  Args:
    data: the ``config.data`` section.
    split: tfds split, e.g. "train" or "test[:1000]"; ignored for image folders.

  Raises:
    DatasetNotPreparedError: tfds dataset not prepared (see ``prepare``).
  """
  if data.name == "image_folder":
    return ImageFolderSource(data.image_folder, image_size=data.image_size, channels=data.channels)
  builder = _builder(data.name, data.data_dir)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(_not_prepared(builder, ["no prepared files found"]))
  source = tfds.data_source(
    data.name, split=split, data_dir=_abspath(data.data_dir), download=False
  )
  return TfdsSource(source, image_size=data.image_size, channels=data.channels)


def dataset_info(data: ml_collections.ConfigDict) -> tuple[dict[str, int], tuple[int, ...], int]:
  """Returns (examples per split, output image shape [H, W, C], number of classes)."""
  shape = (data.image_size, data.image_size, data.channels)
  if data.name == "image_folder":
    source = make_source(data, split="train")
    return {"train": len(source)}, shape, max(1, len(source.classes))
  builder = _builder(data.name, data.data_dir)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(_not_prepared(builder, ["no prepared files found"]))
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  features = builder.info.features
  return splits, shape, features["label"].num_classes if "label" in features else 1


def _draw_flip(index: int, rng: np.random.Generator) -> tuple[int, bool]:
  return index, bool(rng.random() < 0.5)


def _no_flip(index: int) -> tuple[int, bool]:
  return index, False


class _ReadBatch:
  """(record indices [b], flips [b]) -> model batch: one batched read, flip, scale to [-1, 1]."""

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self.source = source

  def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    indices, flips = batch
    indices = [int(i) for i in indices]
    if hasattr(self.source, "__getitems__"):
      records = self.source.__getitems__(indices)
    else:
      records = [self.source[i] for i in indices]
    image = np.stack([r["image"] for r in records])  # [b, H, W, C] uint8
    image = np.where(flips[:, None, None, None], image[:, :, ::-1], image)
    return {
      "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1),  # [b, H, W, C]
      "label": np.array([r["label"] for r in records], np.int32),  # [b]
    }


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
    num_workers: > 0 moves reading into that many worker processes.

  Returns:
    Dataset of ``{"image": float32 [B // P, H, W, C] in [-1, 1], "label": int32 [B // P]}``.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not a multiple of process_count {process_count}")
  steps_per_epoch = len(source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} examples")
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
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size // process_count, drop_remainder=True).map(_ReadBatch(source))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    # grain 0.2.18 reads an absl flag when starting workers and fails outside absl.app unless
    # flags count as parsed (google/grain#1355, fixed upstream by #1362).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
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

  Returns:
    ``grain.DatasetIterator`` of ``{"image": float32 [b, H, W, C], "label": int32 [b]}`` with
    ``b = batch_size // process_count``; ``get_state()`` / ``set_state()`` resume it exactly.
  """
  data = config.data
  ds = make_dataset(
    make_source(data, split=split),
    seed=config.seed if seed is None else seed,
    batch_size=config.training.batch_size if batch_size is None else batch_size,
    process_index=jax.process_index() if process_index is None else process_index,
    process_count=jax.process_count() if process_count is None else process_count,
    shuffle=shuffle,
    num_epochs=num_epochs,
    random_flip=data.random_flip,
    prefetch=data.prefetch,
    num_workers=data.num_workers,
  )
  return iter(ds)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Prepare a tfds dataset as array_record.")
  parser.add_argument("--name", required=True, help="tfds name, e.g. fashion_mnist")
  parser.add_argument("--data_dir", default="", help="tfds data_dir ('' = ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default="", help="folder with the official raw files")
  args = parser.parse_args(argv)
  prepare(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
  builder = _builder(args.name, args.data_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"{args.name} prepared in {builder.data_dir}: {splits}")


if __name__ == "__main__":
  main()
