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
  otherwise every label is 0. The folder is one split: ``split`` is ignored. Every file is checked
  when the source is built (see ``ImageFolderSource``), so a broken file stops a run at its start
  with a ``BadImageError`` naming it, not hours in; ``data.skip_bad_images`` drops such files.
* ``ArraySource``: images already in memory (samples, a fixed evaluation set), so that they go
  through the same split reader as a dataset does.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxdiff.data import preparation
from jaxdiff.io import files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SKIP_HINT = "set data.skip_bad_images=True to skip them"
_NAMED = 5  # bad files named in one message


class BadImageError(ValueError):
  """A file of an image folder is not a readable image (the message names it and why)."""


class BadImageWarning(UserWarning):
  """Files of an image folder were skipped as unreadable (``data.skip_bad_images``)."""


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
  """Random-access source over the PNG/JPEG files under ``root`` (see the module docstring).

  Every file is read once here and checked with PIL: a file that cannot be read (a broken symbolic
  link, no permission), is empty, is no image PIL can identify, or is a corrupt or truncated PNG
  (``verify()`` checks every chunk's CRC) or a truncated JPEG (no end-of-image marker) raises one
  ``BadImageError`` naming it and up to four more; with ``skip_bad`` those files are dropped with
  one ``BadImageWarning`` instead, and labels follow the files that remain. A file that fails
  only when decoded later still raises ``BadImageError`` naming it.

  Args:
    root: the folder, local or ``gs://``.
    image_size: output height and width.
    channels: 1 (grey) or 3 (RGB).
    skip_bad: drop bad files with a warning instead of raising.

  Raises:
    ValueError: ``root`` is empty.
    FileNotFoundError: no PNG/JPEG file under ``root``.
    BadImageError: a bad file (without ``skip_bad``), or every file is bad.
  """

  def __init__(self, root: str, *, image_size: int, channels: int, skip_bad: bool = False):
    if not root:
      raise ValueError("data.name is 'image_folder' but data.image_folder is empty")
    root_path = files.as_path(root)
    paths = sorted(_image_files(root_path))
    if not paths:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {root_path}")
    bad = _find_bad(paths)
    if bad:
      _report_bad(root_path, bad, len(paths), skip_bad)
      dropped = {p for p, _ in bad}
      paths = [p for p in paths if p not in dropped]
    self.paths = paths
    parts = [p.relative_to(root_path).parts for p in self.paths]
    self.classes = sorted({q[0] for q in parts}) if all(len(q) > 1 for q in parts) else []
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = [index[q[0]] if self.classes else 0 for q in parts]
    self.image_size, self.channels = image_size, channels

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    path = self.paths[i]
    try:
      pil = Image.open(io.BytesIO(path.read_bytes()))
      pil.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
      raise BadImageError(
        f"bad image file {path}: {_why(path, e)}; it changed after the folder was checked, or"
        " is corrupt in a way the check does not see: replace or remove it"
      ) from e
    return {"image": _pil_to_image(pil, self.image_size, self.channels), "label": self.labels[i]}


def _image_files(root: epath.Path) -> Iterator[epath.Path]:
  # walk() names files and folders apart: no stat per file, which on GCS is one request each.
  for folder, _, names in root.walk():
    for name in names:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        yield folder / name


def _find_bad(paths: Sequence[epath.Path]) -> list[tuple[epath.Path, str]]:
  """(path, why) of each file that is not a readable image, in the order of ``paths``."""
  # On gs:// each file is one request, so many threads overlap the waiting. A local file in the
  # page cache is ~70 us of PIL work under the GIL, where threads only add switching (10,000
  # 32x32 PNGs on 2 cores: 0.7 s in 1 thread, 1.2 s in 2, 1.9 s in 8, 2.6 s in 32); a few still
  # overlap the reads of a cold disk or of network storage mounted as local (NFS, gcsfuse).
  workers = 32 if files.is_uri(paths[0]) else min(4, os.cpu_count() or 1)
  size = -(-len(paths) // (4 * workers))  # a few chunks per thread: little per-task overhead
  chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
  with ThreadPoolExecutor(workers, thread_name_prefix="check_images") as pool:
    whys = [why for chunk in pool.map(lambda c: [_check(p) for p in c], chunks) for why in chunk]
  return [(p, why) for p, why in zip(paths, whys, strict=True) if why]


def _check(path: epath.Path) -> str | None:
  """Why ``path`` is not a readable image, in a few words; None if it is one."""
  try:
    content = path.read_bytes()
  except Exception as e:  # noqa: BLE001 - remote backends raise their own error types
    return _why(path, e)
  if not content:
    return "empty file"
  try:
    with Image.open(io.BytesIO(content)) as pil:
      kind = pil.format
      pil.verify()
  except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
    return _why(path, e)
  if kind in ("JPEG", "MPO") and not _jpeg_is_whole(content):
    return "truncated JPEG: no end-of-image marker"
  return None


def _why(path: epath.Path, error: BaseException) -> str:
  """A few words on why reading or decoding ``path`` raised ``error``."""
  if isinstance(error, FileNotFoundError):
    is_link = not files.is_uri(path) and os.path.islink(path)
    return "broken symbolic link" if is_link else "file not found"
  if isinstance(error, PermissionError):
    return "permission denied"
  if isinstance(error, Image.UnidentifiedImageError):  # its message names a BytesIO object
    return "not an image PIL can identify"
  if isinstance(error, Image.DecompressionBombError):  # not corrupt: PIL refuses to decode it
    return f"too large: {error}"
  if isinstance(error, OSError) and error.strerror:
    return f"cannot be read ({error.strerror})"
  text = str(error).strip().split("\n")[0]
  text = text if len(text) <= 150 else text[:147] + "..."
  return f"corrupt: {text}" if text else f"corrupt: {type(error).__name__}"


# A marker: 0xFF (and any fill bytes), then a code other than stuffing (00) or restart (D0-D7).
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")


def _jpeg_is_whole(content: bytes) -> bool:
  """Whether a JPEG's data reaches its end-of-image marker, as a truncated file's does not.

  PIL's ``verify()`` checks nothing in a JPEG, and decoding to find out costs 0.2 ms (64x64) to
  9 ms (1024x1024) per image. Instead: skip the header segments by their lengths (an embedded
  thumbnail holds markers of its own), then look for end-of-image after the first scan starts;
  in entropy-coded data 0xFF is always followed by 00 or a marker, so 0xFF 0xD9 there is that
  marker. Agrees with PIL's decoding at every truncation point of baseline, progressive,
  restart-marker and EXIF-thumbnail JPEGs; ~10 us per file.
  """
  pos = 2  # after start-of-image
  while m := _JPEG_MARKER.search(content, pos):
    code, pos = m.group(1)[0], m.end()
    if code == 0xDA:  # start of scan: the image data follows
      return content.rfind(b"\xff\xd9", pos) != -1
    if code == 0xD9:
      return True
    if code != 0x01:  # every other marker but TEM is followed by its segment's length
      pos += int.from_bytes(content[pos : pos + 2], "big")
  return False


def _report_bad(
  root: epath.Path, bad: Sequence[tuple[epath.Path, str]], total: int, skip_bad: bool
) -> None:
  """Raises one BadImageError naming the ``bad`` files, or with ``skip_bad`` warns once."""
  named = ", ".join(f"{p.relative_to(root)} ({why})" for p, why in bad[:_NAMED])
  if len(bad) > _NAMED:
    named += f" and {len(bad) - _NAMED} more"
  if len(bad) == total:  # skipping would leave nothing to read
    raise BadImageError(f"no readable image under {root}: all {total} files are bad: {named}")
  if not skip_bad:
    first, why = bad[0]
    count = f"{len(bad)} of {total} files under {root} {'is' if len(bad) == 1 else 'are'} bad"
    raise BadImageError(
      f"bad image file {first}: {why}; {count}"
      + (f": {named}" if len(bad) > 1 else "")
      + f"; {SKIP_HINT}"
    )
  # warnings.warn, not absl logging: callers and tests can catch or silence it by category, and
  # the command lines print jaxdiff's warnings as one `warning: ...` line.
  warnings.warn(
    f"skipping {len(bad)} of {total} files under {root} that are not readable images"
    f" (data.skip_bad_images=True): {named}",
    BadImageWarning,
    stacklevel=3,
  )


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
    BadImageError: an image folder holds a file that is not a readable image.
  """
  if data.name == "image_folder":
    return ImageFolderSource(
      data.image_folder,
      image_size=data.image_size,
      channels=data.channels,
      skip_bad=getattr(data, "skip_bad_images", False),  # configs from before the key
    )
  preparation.check_prepared(preparation.tfds_builder(data.name, data.data_dir))
  source = tfds.data_source(
    data.name, split=split, data_dir=preparation.tfds_dir(data.data_dir), download=False
  )
  return TfdsSource(source, image_size=data.image_size, channels=data.channels)


def text_feature(data: ml_collections.ConfigDict, *, split: str, feature: str) -> list[str]:
  """Each example's text ``feature`` of a prepared tfds dataset's ``split``, in source order.

  The image feature is read without decoding (only the text is needed).

  Raises:
    DatasetNotPreparedError: the dataset is not prepared.
    ValueError: the dataset has no text feature ``feature`` (the error lists those it has).
  """
  builder = preparation.tfds_builder(data.name, data.data_dir)
  preparation.check_prepared(builder)
  features = builder.info.features
  texts = sorted(k for k, f in features.items() if _is_text(f))
  if feature not in texts:
    raise ValueError(
      f"text.feature={feature!r}: {data.name} has no such text feature; its text features are"
      f" {texts or 'none'}"
    )
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items() if k != feature}
  source = tfds.data_source(
    data.name,
    split=split,
    data_dir=preparation.tfds_dir(data.data_dir),
    download=False,
    decoders=skip,
  )
  out = []
  for start in range(0, len(source), 1024):
    records = read_records(source, range(start, min(start + 1024, len(source))))
    out += [as_text(r[feature]) for r in records]
  return out


def _is_text(feature: Any) -> bool:
  # tfds.features.Text, or a scalar string Tensor
  return (
    isinstance(feature, tfds.features.Tensor)
    and feature.shape == ()
    and (feature.np_dtype == np.object_)
  )


def as_text(value: Any) -> str:
  """A decoded tfds text value (bytes, NumPy bytes or str, or a 0-d array of one) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
