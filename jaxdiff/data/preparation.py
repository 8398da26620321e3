"""Preparing a tfds dataset once as array_record, so that reading it needs no TensorFlow.

Training calls ``prepare(data.name, data_dir=data.data_dir, manual_dir=data.manual_dir)`` before
reading (a no-op once prepared; with several hosts sharing data_dir, on one host only, then a
barrier). Or prepare once by hand (needs ``pip install 'jaxdiff[prepare]'``)::

  jaxdiff prepare --name fashion_mnist --manual_dir ../shared/data/fashion_mnist \\
      --data_dir ~/tensorflow_datasets

(The module is not called ``prepare``: the package re-exports the function ``prepare``, which
would hide a submodule of the same name.)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Sequence

import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from jaxdiff.io import files

PREPARE_COMMAND = "jaxdiff prepare"


class DatasetNotPreparedError(RuntimeError):
  """The tfds dataset is not prepared in data_dir and cannot be prepared here."""


def tfds_dir(path: str | os.PathLike | None) -> str | None:
  """A ``data_dir`` / ``manual_dir`` as tfds takes it: a URI (``gs://...``) unchanged, a local
  path expanded and absolute (``files.as_path``); None or "" stay None (tfds' default)."""
  # Relative paths (as CI passes them) are taken against the current working directory.
  return os.fspath(files.as_path(path)) if path else None


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The array_record builder of tfds dataset ``name`` in ``data_dir``.

  Raises:
    ValueError: tfds knows no dataset ``name`` (in one line; tfds' own message lists them all).
  """
  try:
    return tfds.builder(name, data_dir=tfds_dir(data_dir), file_format="array_record")
  except registered.DatasetNotFoundError:
    raise ValueError(
      f"data.name={name!r} is neither 'image_folder' nor a tfds dataset (see"
      " https://www.tensorflow.org/datasets/catalog/overview for the names)"
    ) from None


def _raw_files(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """Maps each raw file tfds expects in manual_dir to its URL ({} if tfds does not say)."""
  try:
    url_infos = builder.url_infos or {}
  except ImportError:  # tfds 4.9.10 needs importlib_resources here but does not declare it
    url_infos = {}
  return {info.filename: url for url, info in url_infos.items() if info.filename}


def not_prepared_message(builder: tfds.core.DatasetBuilder, problems: Sequence[str]) -> str:
  """One message saying what is missing and the two ways to prepare the dataset."""
  files = ", ".join(sorted(_raw_files(builder))) or "the dataset's official raw files"
  return (
    f"dataset {builder.name!r} is not prepared in {builder.data_dir}; pass "
    f"--config.data.manual_dir=PATH to a folder holding {files} (and install TensorFlow, "
    f"needed only to prepare: pip install 'jaxdiff[prepare]'), or prepare it once with "
    f"`{PREPARE_COMMAND} --name {builder.name} --manual_dir PATH --data_dir DATA_DIR`. "
    f"Here: {'; '.join(problems)}."
  )


def check_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Raises ``DatasetNotPreparedError`` unless ``builder``'s files are there."""
  if not builder.is_prepared():
    raise DatasetNotPreparedError(not_prepared_message(builder, ["no prepared files found"]))


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


def _problems(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> list[str]:
  """Why ``builder`` cannot be prepared here ([] if it can)."""
  raw_files = _raw_files(builder)
  problems = []
  folder = files.as_path(manual_dir) if manual_dir else None
  if folder and not folder.is_dir():
    problems.append(f"manual_dir {manual_dir} does not exist")
  elif folder and (missing := [f for f in raw_files if not (folder / f).exists()]):
    problems.append(f"manual_dir {manual_dir} lacks {', '.join(sorted(missing))}")
  if not _has_tensorflow():
    problems.append("TensorFlow is not installed")
  if not manual_dir and not problems and not _reachable(list(raw_files.values())):
    problems.append("no manual_dir was given and the download host is unreachable")
  return problems


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
  builder = tfds_builder(name, data_dir)
  if builder.is_prepared():
    return
  manual_dir = tfds_dir(manual_dir)
  problems = _problems(builder, manual_dir)
  if problems:
    raise DatasetNotPreparedError(not_prepared_message(builder, problems))
  download_dir = _download_dir(builder)
  try:
    builder.download_and_prepare(
      download_dir=download_dir,
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
  except Exception as e:
    message = not_prepared_message(builder, [f"preparing failed: {e!r}"])
    raise DatasetNotPreparedError(message) from e
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)


def _download_dir(builder: tfds.core.DatasetBuilder) -> str:
  """A new local folder for the raw files: ``DATA_DIR/downloads/NAME.*``, or in the system's
  temporary folder when data_dir is remote (extracting archives needs a local disk)."""
  # One download dir per call: tfds names extracted files after the archive, and mnist and
  # fashion_mnist archives share their names.
  root = os.fspath(builder.data_dir_root)
  if files.is_uri(root):
    return tempfile.mkdtemp(prefix=f"jaxdiff-{builder.name}.")
  downloads = files.make_dirs(files.as_path(root) / "downloads")
  return tempfile.mkdtemp(prefix=f"{builder.name}.", dir=downloads)


def split_sizes(name: str, data_dir: str | None) -> dict[str, int]:
  """Examples per split of a prepared tfds dataset."""
  builder = tfds_builder(name, data_dir)
  check_prepared(builder)
  return {k: v.num_examples for k, v in builder.info.splits.items()}
