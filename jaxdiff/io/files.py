"""Paths and files: every user path as an ``epath.Path`` (``gs://`` stays remote), and writes
that never leave a half-written file behind, locally or in a bucket."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator

from etils import epath


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a LOCAL temporary file to write; on success it becomes ``path``, local or remote.

  Readers see the old file or the whole new one, never part of one. If the block raises, the
  temporary file is removed and ``path`` is left as it was. The temporary name keeps ``path``'s
  suffix (writers such as PIL and matplotlib pick the format by it). A local ``path`` gets its
  folder created, the temporary file is made beside it and renamed into place, and the new file
  gets the permissions a plain ``open()`` would have given it. A remote one (``gs://...``) is
  written in the system's temporary folder and then copied up: PIL, matplotlib and NumPy need a
  real file, and a GCS object appears only once its upload completes, so readers still see a
  whole file.

  Example::

    with atomic_path("stats.npz") as tmp, open(tmp, "wb") as f:
      np.savez(f, mean=mean, cov=cov)
  """
  dst = as_path(path)
  if is_uri(dst):
    with _remote_atomic_path(dst) as tmp:
      yield tmp
    return
  make_dirs(dst.parent)
  fd, name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=dst.suffix)
  os.close(fd)
  tmp = pathlib.Path(name)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files are private (0600)
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, dst)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def _remote_atomic_path(dst: epath.Path) -> Iterator[pathlib.Path]:
  fd, name = tempfile.mkstemp(prefix=f"{dst.name}.", suffix=dst.suffix)
  os.close(fd)
  tmp = pathlib.Path(name)
  try:
    yield tmp
    epath.Path(tmp).copy(dst, overwrite=True)
  finally:
    tmp.unlink(missing_ok=True)


def as_path(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: a URI (``gs://bucket/run``) is kept exactly as given; a local
  path has ``~`` expanded and is made absolute (so a later ``chdir`` cannot move it).

  Every workdir, data dir and output dir goes through here, never through ``os.path.abspath`` or
  ``Path.absolute()``, which would turn ``gs://b/run`` into ``$PWD/gs:/b/run``.
  """
  text = os.fspath(path)
  if is_uri(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def make_dirs(path: str | os.PathLike) -> epath.Path:
  """``as_path(path)``, created with its parents if it is a local folder.

  Object stores (``gs://``) have no folders to create: an object's prefix exists once the object
  does, and asking the storage client to make one may check, or even try to create, the bucket.
  """
  out = as_path(path)
  if not is_uri(out):
    out.mkdir(parents=True, exist_ok=True)
  return out


def check_writable(path: str | os.PathLike, what: str) -> None:
  """Raises unless a folder can be written at ``path`` (made later if missing): checked before
  the expensive work, so that a bad output path costs nothing. ``what`` names the setting in
  the message (``"--out"``). Remote paths are not checked: their permissions are the storage's
  to enforce.

  Raises:
    NotADirectoryError: ``path``, or the nearest part of it that exists, is a file.
    PermissionError: that folder cannot be written.
  """
  if is_uri(path):
    return
  target = as_path(path)
  existing = target
  while not existing.exists():  # the folder it will be made in
    existing = existing.parent
  if not existing.is_dir():
    where = "is a file" if existing == target else f"is inside {existing}, which is a file"
    raise NotADirectoryError(f"{what}={os.fspath(path)} {where}; it must name a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{what}={os.fspath(path)}: cannot write in {existing}")


def is_uri(path: str | os.PathLike) -> bool:
  """Whether ``path`` names remote storage (``scheme://...``) rather than a local file."""
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(path)) is not None


def slug(text: str) -> str:
  """``text`` made safe for a file name: runs of other characters become one ``_``
  (``"test[:1000]"`` -> ``"test_1000"``)."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
