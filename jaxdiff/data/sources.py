"""Random-access sources of ``{"image": uint8 [H, W, C], "label": int}`` at the config's size.

* any tfds image dataset prepared as array_record (``jaxdiff.data.prepare``), read through
  ``tfds.data_source``, which needs no TensorFlow. Images whose stored shape differs from the
  config are converted (grey <-> RGB) and center-cropped to their largest central square, then
  resized with PIL's antialiased bicubic filter (celeb_a 218x178 -> 178x178 -> 64x64).
  Datasets without a ``label`` feature get label 0.
* ``data.name == "image_folder"``: every PNG/JPEG under ``data.image_folder`` (local or
  ``gs://``, listed and read through ``etils.epath``; recursively, sorted by path), cropped and
  resized the same way. If every image lies in a first-level subfolder, the label is that
  subfolder's index among the sorted subfolder names (torchvision's ImageFolder convention);
  otherwise every label is 0. The folder is one split: ``split`` is ignored.
* ``ArraySource``: images already in memory (samples, a fixed evaluation set), so that they go
  through the same split reader as a dataset does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxdiff.data import preparation
from jaxdiff.io import files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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
    root_path = files.as_path(root)
    self.paths = sorted(_image_files(root_path))
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
    with self.paths[i].open("rb") as f, Image.open(f) as pil:
      image = _pil_to_image(pil, self.image_size, self.channels)
    return {"image": image, "label": self.labels[i]}


def _image_files(root: epath.Path) -> Iterator[epath.Path]:
  # walk() names files and folders apart: no stat per file, which on GCS is one request each.
  for folder, _, names in root.walk():
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        yield folder / name


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


class ArraySource:
  """Images held in memory as a source: ``images [N, H, W, C]`` (uint8, or floats already in
  ``[-1, 1]``) and optional ``labels [N]`` (default 0)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
    self.images = np.asarray(images)
    if self.images.ndim != 4:
      raise ValueError(f"images must be NHWC [N, H, W, C], got shape {self.images.shape}")
    n = len(self.images)
    self.labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
    if self.labels.shape != (n,):
      raise ValueError(f"labels must be [{n}], got shape {self.labels.shape}")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": self.images[i], "label": int(self.labels[i])}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[int(i)] for i in indices]


def read_records(source: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> list[Any]:
  """``[source[i] for i in indices]``, in one batched read when the source offers one."""
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    return source.__getitems__(indices)
  return [source[i] for i in indices]


def make_source(data: ml_collections.ConfigDict, *, split: str) -> ImageFolderSource | TfdsSource:
  """Returns the random-access source of ``{"image": uint8 [H, W, C], "label": int}``.

  Args:
    data: the ``config.data`` section.
    split: tfds split, e.g. "train" or "test[:1000]"; ignored for image folders.

  Raises:
    DatasetNotPreparedError: tfds dataset not prepared (see ``jaxdiff.data.prepare``).
  """
  if data.name == "image_folder":
    return ImageFolderSource(data.image_folder, image_size=data.image_size, channels=data.channels)
  preparation.check_prepared(preparation.tfds_builder(data.name, data.data_dir))
  source = tfds.data_source(
    data.name, split=split, data_dir=preparation.tfds_dir(data.data_dir), download=False
  )
  return TfdsSource(source, image_size=data.image_size, channels=data.channels)


def dataset_info(data: ml_collections.ConfigDict) -> tuple[dict[str, int], tuple[int, ...], int]:
  """Returns (examples per split, output image shape [H, W, C], number of classes)."""
  shape = (data.image_size, data.image_size, data.channels)
  if data.name == "image_folder":
    source = make_source(data, split="train")
    return {"train": len(source)}, shape, max(1, len(source.classes))
  builder = preparation.tfds_builder(data.name, data.data_dir)
  preparation.check_prepared(builder)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  features = builder.info.features
  return splits, shape, features["label"].num_classes if "label" in features else 1
