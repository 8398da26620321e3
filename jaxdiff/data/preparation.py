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

import concurrent.futures
import difflib
import gzip
import importlib.util
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
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
    ValueError: tfds knows no dataset ``name``: one line with a close name if tfds has one, the
      way to read a folder of images instead, and the datasets prepared in ``data_dir`` (tfds'
      own message lists all 400+ names).
  """
  try:
    return tfds.builder(name, data_dir=tfds_dir(data_dir), file_format="array_record")
  except registered.DatasetNotFoundError:
    raise ValueError(unknown_dataset_message(name, data_dir)) from None


def unknown_dataset_message(name: str, data_dir: str | None) -> str:
  """Why ``name`` is no dataset, what is near it, and what can be read instead."""
  # Only here, on the error path: the first list_builders() in a process imports every tfds
  # dataset module (~0.3 s); without community datasets it needs no network.
  close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False), n=1)
  root = files.as_path(data_dir or tfds.core.constants.DATA_DIR)
  prepared = ", ".join(prepared_datasets(root)) or "none"
  return (
    f"data.name={name!r} is not a tfds dataset"
    + (f" (did you mean {close[0]!r}?)" if close else "")
    + "; to read a folder of PNG/JPEG files instead, pass --config.data.name=image_folder"
    f" --config.data.image_folder=DIR; prepared in {root}: {prepared}"
  )


_VERSION = re.compile(r"\d+\.\d+\.\d+")


def prepared_datasets(data_dir: str | os.PathLike) -> list[str]:
  """The datasets prepared in ``data_dir``, as tfds names them (``mnist:3.0.1``,
  ``celeb_a_hq/256:2.0.0``): each ``NAME/[CONFIG/]VERSION`` folder with a dataset_info.json."""
  root = files.as_path(data_dir)
  if not root.is_dir():
    return []
  found = []
  for pattern in ("*/*/dataset_info.json", "*/*/*/dataset_info.json"):
    for info in root.glob(pattern):
      *name, version = info.parent.relative_to(root).parts
      # A running or killed prepare writes into NAME/incomplete.XXXX_VERSION.
      unfinished = any(part.startswith("incomplete.") for part in name)
      if _VERSION.fullmatch(version) and name[0] != "downloads" and not unfinished:
        found.append(f"{'/'.join(name)}:{version}")
  return sorted(found)


def _url_infos(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """What tfds records of each raw file (``UrlInfo``: filename, size, checksum), by URL; {} if
  tfds does not say."""
  try:
    return dict(builder.url_infos or {})
  except ImportError:  # tfds 4.9.10 needs importlib_resources here but does not declare it
    return {}


def _raw_files(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """Maps each raw file tfds expects in manual_dir to its URL ({} if tfds does not say)."""
  return {info.filename: url for url, info in _url_infos(builder).items() if info.filename}


def not_prepared_message(builder: tfds.core.DatasetBuilder, problems: Sequence[str]) -> str:
  """One message: what is missing first, then the two ways to prepare the dataset."""
  raw = ", ".join(sorted(_raw_files(builder))) or "the dataset's official raw files"
  return (
    f"dataset {builder.name!r} is not prepared in {builder.data_dir}: {'; '.join(problems)}."
    f" To prepare it, pass --config.data.manual_dir=PATH to a folder holding {raw} (and"
    f" install TensorFlow, needed only to prepare: pip install 'jaxdiff[prepare]'), or prepare"
    f" it once with `{PREPARE_COMMAND} --name {builder.name} --manual_dir PATH --data_dir"
    " DATA_DIR`."
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
    DatasetNotPreparedError: not prepared and not preparable here (one message says what is
      missing and what to pass), or preparing failed (one line: its cause, then what to do).
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
    _stop_extracting()
    raise DatasetNotPreparedError(failed_message(builder, manual_dir, e)) from e
  finally:
    shutil.rmtree(download_dir, ignore_errors=True)


def _stop_extracting() -> None:
  """Stops the extractions tfds still runs after ``download_and_prepare`` has raised.

  tfds extracts each raw file that passed its checksum in a process-wide thread pool, which goes
  on when another file fails and writes into the download dir after it has been removed (seen: a
  truncated mnist train file left 8 MB of extracted test files behind). The pool is private
  (tfds 4.9.10): if it is not where this looks, nothing happens. Queued extractions are
  cancelled, running ones stop at their next file and are waited for, and tfds gets a fresh
  pool for a later prepare.
  """
  from tensorflow_datasets.core.download import extractor

  worker = extractor.get_extractor()
  pool = getattr(worker, "_executor", None)
  if isinstance(pool, concurrent.futures.ThreadPoolExecutor):
    pool.shutdown(wait=True, cancel_futures=True)
    worker._executor = concurrent.futures.ThreadPoolExecutor(pool._max_workers)


def failed_message(
  builder: tfds.core.DatasetBuilder, manual_dir: str | None, error: BaseException
) -> str:
  """One line for a prepare that started and failed: its innermost cause, then one hint."""
  source = f"from {manual_dir}" if manual_dir else "by downloading it"
  hint = _hint(builder, manual_dir, error)
  return f"preparing {builder.name} {source} failed: {_cause(error)}; {hint}"


def _cause(error: BaseException, limit: int = 300) -> str:
  """The first line of the innermost explicitly chained exception: tfds wraps the real error."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().split("\n")[0].rstrip(":")
  text = text if len(text) <= limit else text[: limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


# What a truncated or corrupt archive raises while tfds extracts or reads it.
_CORRUPT_ARCHIVE = (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile, tarfile.TarError)


def _hint(builder: tfds.core.DatasetBuilder, manual_dir: str | None, error: BaseException) -> str:
  """What to do about ``error``; names the raw files that differ from the official ones."""
  official = {info.filename: (url, info.size) for url, info in _url_infos(builder).items()}
  if manual_dir and (wrong := _wrong_sizes(files.as_path(manual_dir), official)):
    if len(wrong) > 1:
      return (
        f"{'; '.join(wrong.values())}: truncated or corrupt, replace them with the official files"
      )
    ((name, what),) = wrong.items()
    url = official[name][0]
    return f"{what}: truncated or corrupt, replace it with the official file ({url})"
  chain = _chain(error)
  if manual_dir and (named := [f for f in official if f and any(f in str(e) for e in chain)]):
    return f"{', '.join(sorted(named))} in {manual_dir}: corrupt, replace it with the official file"
  if any(isinstance(e, _CORRUPT_ARCHIVE) for e in chain):
    return "a raw file is truncated or corrupt: replace it with the official file"
  return "JAXDIFF_TRACEBACK=1 shows where it failed"


def _chain(error: BaseException | None) -> list[BaseException]:
  """``error`` and every exception it was raised from or while handling."""
  chain: list[BaseException] = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _wrong_sizes(folder: epath.Path, official: dict[str, tuple[str, int]]) -> dict[str, str]:
  """Raw file -> "NAME is N bytes, the official file M" for each one in ``folder`` whose size
  differs from what tfds records (one stat each: cheap, unlike a checksum)."""
  wrong = {}
  for name, (_, size) in sorted(official.items()):
    path = folder / name
    if name and size and path.exists() and (actual := path.stat().length) != size:
      wrong[name] = f"{name} is {actual:,} bytes, the official file {int(size):,}"
  return wrong


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
