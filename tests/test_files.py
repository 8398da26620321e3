"""Atomic writes: the whole new file or the old one, never part of one."""

import os
import stat

import pytest

from jaxdiff.io import files


def test_atomic_path_writes_with_plain_permissions_and_keeps_the_suffix(tmp_path):
  target = tmp_path / "sub" / "out.png"
  with files.atomic_path(target) as tmp:
    assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp != target
    tmp.write_bytes(b"new")
  assert target.read_bytes() == b"new"
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
  assert [p.name for p in target.parent.iterdir()] == ["out.png"]


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "stats.npz"
  target.write_bytes(b"old")
  with pytest.raises(RuntimeError, match="disk full"), files.atomic_path(target) as tmp:
    tmp.write_bytes(b"half")
    raise RuntimeError("disk full")
  assert target.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_make_dirs_creates_a_local_folder_and_returns_it_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  made = files.make_dirs("a/b")
  assert made == files.as_path(tmp_path / "a" / "b") and (tmp_path / "a" / "b").is_dir()
  assert files.make_dirs(made) == made  # already there: fine
