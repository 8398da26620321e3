"""Bad data gives one clear error naming its cause, early: broken image folders, an unknown
dataset name, a prepare that fails on a truncated raw file.

No JAX compiles. The two prepare tests need TensorFlow and the raw MNIST files in ../shared/data
(next to the repo); they take seconds (tfds fails on the truncated file's checksum) but are
marked slow like every test that needs TensorFlow, as CI installs it for the slow suite only.
"""

import importlib.util
import io
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff import config as default
from jaxdiff import data
from jaxdiff.data import preparation, sources

REPO = Path(__file__).resolve().parents[1]
MNIST_RAW = REPO.parent / "shared" / "data" / "mnist"
MNIST_FILES = [
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
]
SKIP_HINT = "set data.skip_bad_images=True to skip them"


def _image_bytes(fmt: str = "PNG", seed: int = 0, side: int = 16, **save_args) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt, **save_args)
  return buffer.getvalue()


def _good_folder(root: Path, per_class: int = 3) -> None:
  """``per_class`` valid images in each of cat/ (PNG) and dog/ (JPEG)."""
  for i in range(per_class):
    for folder, fmt, ext in [("cat", "PNG", "png"), ("dog", "JPEG", "jpg")]:
      (root / folder).mkdir(parents=True, exist_ok=True)
      (root / folder / f"good{i}.{ext}").write_bytes(_image_bytes(fmt, seed=i))


def _add_bad_files(root: Path) -> dict[str, str]:
  """Four kinds of bad file; returns {relative path: words its reason must contain}."""
  png = _image_bytes("PNG", side=32)
  (root / "cat" / "truncated.png").write_bytes(png[: len(png) // 2])
  (root / "cat" / "empty.png").write_bytes(b"")
  (root / "dog" / "text.jpg").write_text("not an image at all")
  (root / "dog" / "link.png").symlink_to(root / "nowhere.png")
  return {
    "cat/truncated.png": "truncated",
    "cat/empty.png": "empty file",
    "dog/text.jpg": "not an image",
    "dog/link.png": "broken symbolic link",
  }


def _folder_config(root: Path, **data_fields) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(root)
  config.data.image_size, config.data.channels = 8, 3
  for key, value in data_fields.items():
    setattr(config.data, key, value)
  return config


# ------------------------------------------------------------------------ image folders


def test_bad_files_are_named_with_their_reason_and_the_way_out(tmp_path):
  _good_folder(tmp_path)
  expected = _add_bad_files(tmp_path)
  with pytest.raises(data.BadImageError) as e:
    data.make_source(_folder_config(tmp_path).data, split="train")
  message = str(e.value)
  assert isinstance(e.value, ValueError) and "\n" not in message
  assert message.startswith(f"bad image file {tmp_path / 'cat/empty.png'}: empty file;")
  assert f"4 of 10 files under {tmp_path} are bad" in message
  for name, why in expected.items():
    assert f"{name} (" in message and why in message, (name, why)
  assert message.endswith(SKIP_HINT)


def test_many_bad_files_name_five_and_count_the_rest(tmp_path):
  _good_folder(tmp_path)
  for i in range(7):
    (tmp_path / "cat" / f"bad{i}.png").write_bytes(b"")
  with pytest.raises(data.BadImageError) as e:
    data.ImageFolderSource(str(tmp_path), image_size=8, channels=3)
  message = str(e.value)
  assert "7 of 13 files" in message and "and 2 more" in message
  assert [f"cat/bad{i}.png" in message for i in range(7)] == [True] * 5 + [False] * 2


def test_skipping_drops_bad_files_with_one_warning_and_labels_follow(tmp_path):
  _good_folder(tmp_path)
  _add_bad_files(tmp_path)
  # A bad file outside the class folders: only once it is dropped are all files in classes.
  (tmp_path / "stray.png").write_bytes(b"")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    source = data.make_source(_folder_config(tmp_path, skip_bad_images=True).data, split="train")
  bad = [w for w in caught if issubclass(w.category, sources.BadImageWarning)]
  assert len(bad) == 1, [str(w.message) for w in caught]
  message = str(bad[0].message)
  assert f"skipping 5 of 11 files under {tmp_path}" in message
  assert "stray.png (empty file)" in message and "dog/link.png (broken symbolic link)" in message
  assert len(source) == 6 and source.classes == ["cat", "dog"]
  names = [p.relative_to(tmp_path).as_posix() for p in source.paths]
  assert names == [f"cat/good{i}.png" for i in range(3)] + [f"dog/good{i}.jpg" for i in range(3)]
  assert source.labels == [0, 0, 0, 1, 1, 1]
  assert [source[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
  assert source[5]["image"].shape == (8, 8, 3)


def test_a_folder_of_only_bad_files_is_an_error_even_when_skipping(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  (tmp_path / "b.jpg").write_text("text")
  for skip in (False, True):
    with pytest.raises(data.BadImageError, match=r"^no readable image under .*all 2 files are bad"):
      data.ImageFolderSource(str(tmp_path), image_size=8, channels=3, skip_bad=skip)


def test_configs_without_the_skip_key_still_work(tmp_path):
  _good_folder(tmp_path, per_class=1)
  old = ml_collections.ConfigDict(
    {"name": "image_folder", "image_folder": str(tmp_path), "image_size": 8, "channels": 1}
  )
  assert len(data.make_source(old, split="train")) == 2


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9, 0.99])
def test_truncated_png_and_jpeg_are_caught_when_checked(tmp_path, fraction):
  # verify() checks each PNG chunk's CRC and needs IEND; for JPEG it checks nothing, so the
  # end-of-image marker is looked for instead.
  png = _image_bytes("PNG", side=64)
  jpeg = _image_bytes("JPEG", side=64, quality=95)
  (tmp_path / "a.png").write_bytes(png[: int(len(png) * fraction)])
  (tmp_path / "b.jpg").write_bytes(jpeg[: int(len(jpeg) * fraction)])
  (tmp_path / "c.png").write_bytes(png)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    source = data.ImageFolderSource(str(tmp_path), image_size=8, channels=3, skip_bad=True)
  assert [p.name for p in source.paths] == ["c.png"]
  (warning,) = caught
  assert "a.png (corrupt" in str(warning.message)
  assert "b.jpg (truncated JPEG" in str(warning.message)


def test_intact_jpegs_of_every_kind_pass_the_check(tmp_path):
  exif = Image.Exif()
  exif[0x010F] = "camera"
  kinds = {
    "baseline": {},
    "progressive": {"progressive": True},
    "restart_markers": {"restart_marker_blocks": 2},
    "exif_icc": {"exif": exif.tobytes(), "icc_profile": b"\0" * 3000},
    "optimized": {"optimize": True, "subsampling": 0},
  }
  for name, save_args in kinds.items():
    (tmp_path / f"{name}.jpg").write_bytes(_image_bytes("JPEG", side=40, **save_args))
  # Data after the end-of-image marker (as phones append) is no truncation.
  trailer = _image_bytes("JPEG", side=40) + b"\xff\xda trailer"
  (tmp_path / "trailer.jpg").write_bytes(trailer)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no BadImageWarning either
    source = data.ImageFolderSource(str(tmp_path), image_size=8, channels=3, skip_bad=True)
  assert len(source) == len(kinds) + 1
  assert all(source[i]["image"].shape == (8, 8, 3) for i in range(len(source)))


def _png_that_verifies_but_does_not_decode() -> bytes:
  """A PNG whose compressed data is garbage under a correct CRC: only decoding finds it."""
  png = bytearray(_image_bytes("PNG"))
  start = png.index(b"IDAT") + 4
  (length,) = struct.unpack(">I", png[start - 8 : start - 4])
  payload = png[start : start + 2] + bytes(length - 2)  # zlib header, then zeros
  png[start : start + length] = payload
  png[start + length : start + length + 4] = struct.pack(">I", zlib.crc32(b"IDAT" + payload))
  return bytes(png)


def test_a_file_that_fails_when_read_raises_bad_image_error_naming_it(tmp_path):
  _good_folder(tmp_path, per_class=4)
  (tmp_path / "cat" / "sneaky.png").write_bytes(_png_that_verifies_but_does_not_decode())
  source = data.make_source(_folder_config(tmp_path).data, split="train")  # passes the check
  index = [p.name for p in source.paths].index("sneaky.png")
  with pytest.raises(data.BadImageError, match=r"^bad image file .*cat/sneaky\.png: corrupt"):
    source[index]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_bad_image_error_reaches_the_caller_of_the_pipeline(tmp_path, prefetch):
  _good_folder(tmp_path, per_class=4)
  source = data.ImageFolderSource(str(tmp_path), image_size=8, channels=3)
  # The file goes bad after the check (a copy still being written, a disk error).
  truncated = source.paths[2].read_bytes()[:40]
  Path(source.paths[2]).write_bytes(truncated)
  it = iter(data.make_dataset(source, seed=0, batch_size=8, shuffle=False, prefetch=prefetch))
  with pytest.raises(data.BadImageError) as e:
    next(it)
  assert str(e.value).splitlines()[0].startswith(f"bad image file {source.paths[2]}: ")


def test_bad_image_error_through_make_iterator(tmp_path):
  _good_folder(tmp_path, per_class=4)
  (tmp_path / "dog" / "sneaky.png").write_bytes(_png_that_verifies_but_does_not_decode())
  config = _folder_config(tmp_path)  # prefetch 2: read in grain's threads
  it = data.make_iterator(
    config, seed=0, batch_size=9, process_index=0, process_count=1, shuffle=False
  )
  with pytest.raises(data.BadImageError, match=r"^bad image file .*dog/sneaky\.png: corrupt"):
    next(it)


# ------------------------------------------------------------------------ tfds names


def _fake_prepared(data_dir: Path, *parts: str) -> None:
  folder = data_dir.joinpath(*parts)
  folder.mkdir(parents=True)
  (folder / "dataset_info.json").write_text("{}")


def test_unknown_dataset_names_a_close_match_the_folder_way_and_what_is_prepared(tmp_path):
  config = default.get_config()
  config.data.name, config.data.data_dir = "fashion_mnst", str(tmp_path)
  with pytest.raises(ValueError) as e:
    data.make_source(config.data, split="train")
  message = str(e.value)
  assert message.startswith(
    "data.name='fashion_mnst' is not a tfds dataset (did you mean 'fashion_mnist'?)"
  )
  folder_way = "--config.data.name=image_folder --config.data.image_folder=DIR"
  assert message.index("is not a tfds dataset") < message.index(folder_way)
  assert message.endswith(f"prepared in {tmp_path}: none")
  assert len(message) < 400 and "\n" not in message  # never tfds' list of every name
  assert e.value.__cause__ is None and e.value.__suppress_context__  # raise ... from None

  _fake_prepared(tmp_path, "mnist", "3.0.1")
  _fake_prepared(tmp_path, "celeb_a_hq", "256", "2.0.0")
  _fake_prepared(tmp_path, "mnist", "incomplete.AB12_3.0.2")  # a prepare still running
  (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)  # no dataset_info.json: not prepared
  with pytest.raises(ValueError) as e:
    preparation.tfds_builder("zzz_no_such_thing", str(tmp_path))
  message = str(e.value)
  assert message.startswith("data.name='zzz_no_such_thing' is not a tfds dataset;")
  assert message.endswith(f"prepared in {tmp_path}: celeb_a_hq/256:2.0.0, mnist:3.0.1")


def test_not_prepared_message_leads_with_what_is_missing(tmp_path, monkeypatch):
  monkeypatch.setattr(preparation, "_has_tensorflow", lambda: False)
  raw = tmp_path / "raw"
  raw.mkdir()
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.prepare("mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(raw))
  message = str(e.value)
  assert message.startswith(f"dataset 'mnist' is not prepared in {tmp_path / 'tfds'}")
  problems = message.index("lacks t10k-images-idx3-ubyte.gz")
  assert problems < message.index("TensorFlow is not installed") < message.index("To prepare it")


# ------------------------------------------------------------------------ failed prepares

needs_tf_and_mnist = pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is None or not MNIST_RAW.is_dir(),
  reason=f"preparing needs tensorflow-cpu (jaxdiff[prepare]) and the raw MNIST in {MNIST_RAW}",
)


def _raw_with_truncated_train_images(folder: Path) -> Path:
  folder.mkdir()
  for name in MNIST_FILES:
    shutil.copyfile(MNIST_RAW / name, folder / name)
  images = folder / "train-images-idx3-ubyte.gz"
  os.truncate(images, images.stat().st_size // 2)
  return folder


@pytest.mark.slow
@needs_tf_and_mnist
def test_failed_prepare_leads_with_its_cause_and_names_the_file(tmp_path):
  from tensorflow_datasets.core.download import extractor

  raw = _raw_with_truncated_train_images(tmp_path / "raw")
  data_dir = tmp_path / "tfds"
  tfds_pool = extractor.get_extractor()._executor  # where tfds extracts the intact files
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.prepare("mnist", data_dir=str(data_dir), manual_dir=str(raw))
  tfds_pool.shutdown(wait=True)  # whatever tfds still had running there has now finished
  message = str(e.value)
  assert message.startswith(f"preparing mnist from {raw} failed: NonMatchingChecksumError: ")
  assert "\n" not in message and "--config.data.manual_dir" not in message
  assert "train-images-idx3-ubyte.gz is 4,956,211 bytes, the official file 9,912,422" in message
  assert "replace it with the official file (https://" in message
  # Nothing of what tfds extracted from the intact files may stay behind.
  assert not tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
  assert not list(data_dir.glob("mnist/*")) and not list(data_dir.glob("downloads/*"))


@pytest.mark.slow
@needs_tf_and_mnist
def test_prepare_command_fails_in_one_line(tmp_path):
  raw = _raw_with_truncated_train_images(tmp_path / "raw")
  data_dir = tmp_path / "tfds"
  cmd = [sys.executable, "-m", "jaxdiff", "prepare", "--name", "mnist", "--manual_dir", str(raw)]
  cmd += ["--data_dir", str(data_dir)]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: preparing mnist from {raw} failed: "), proc.stderr[-2000:]
  assert "train-images-idx3-ubyte.gz is 4,956,211 bytes" in last
  assert "Traceback" not in proc.stderr
  assert not list(data_dir.glob("mnist/*")) and not list(data_dir.glob("downloads/*"))
