"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside ``path`` to write; renames it to ``path`` on success.

  Readers see the old file or the whole new one, never part of one. If the block raises, the
  temporary file is removed and ``path`` is left as it was. The temporary name keeps ``path``'s
  suffix (writers such as PIL and matplotlib pick the format by it), and the new file gets the
  permissions a plain ``open()`` would have given it.

  Example::

    with atomic_path("stats.npz") as tmp, open(tmp, "wb") as f:
      np.savez(f, mean=mean, cov=cov)
  """
  path = Path(path).expanduser()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
  os.close(fd)
  tmp = Path(name)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files are private (0600)
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def slug(text: str) -> str:
  """``text`` made safe for a file name: runs of other characters become one ``_``
  (``"test[:1000]"`` -> ``"test_1000"``)."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
