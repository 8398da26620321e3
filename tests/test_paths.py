"""User paths go through ``etils.epath``: ``gs://`` stays remote and is never made a local path.

No test here talks to GCS: ``epath.testing.mock_epath`` maps ``gs://bucket/...`` onto a local
folder (``FakeBucket``), so a library writer that goes through epath lands there, and one that
mangles the URI (``$PWD/gs:/bucket/...``) shows up as a ``gs:`` folder in the working directory.
"""

import json
import os
import tempfile

import ml_collections
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing
from PIL import Image

from jaxdiff.data import preparation, sources
from jaxdiff.evaluation import classifier, features, reference, report
from jaxdiff.evaluation import stats as stats_lib
from jaxdiff.evaluation.featurenet import FeatureNet, file_digest
from jaxdiff.io import checkpoints, files, images

PREFIX = "gs://"


class FakeBucket:
  """``gs://NAME/KEY`` as ``root/NAME/KEY`` for every epath call; local paths pass unchanged.

  Like GCS, an object can be written under any prefix: opening for writing (or copying) creates
  the folders it needs here.
  """

  def __init__(self, root):
    self.root = root

  def local(self, path):
    text = os.fspath(path)
    return os.fspath(self.root / text[len(PREFIX) :]) if text.startswith(PREFIX) else text

  def remote(self, path):
    text, root = os.fspath(path), os.fspath(self.root)
    return PREFIX + os.path.relpath(text, root) if text.startswith(root + os.sep) else text

  def _call(self, fn, *paths, **kwargs):
    return fn(*map(self.local, paths), **kwargs)

  def _open(self, fn, path, mode):
    if mode[0] in "wa":
      os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
    return fn(self.local(path), mode)

  def _copy(self, fn, path, dst, *, overwrite):
    os.makedirs(os.path.dirname(self.local(dst)), exist_ok=True)
    return fn(self.local(path), self.local(dst), overwrite=overwrite)

  def _walk(self, fn, top, **kwargs):
    for folder, dirs, names in fn(self.local(top), **kwargs):
      yield self.remote(folder), dirs, names

  def _glob(self, fn, pattern):
    return [self.remote(p) for p in fn(self.local(pattern))]

  def mock(self):
    plain = ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename", "replace")
    fns = {name: self._call for name in (*plain, "rmtree", "stat")}
    fns.update(open=self._open, copy=self._copy, walk=self._walk, glob=self._glob)
    return epath_testing.mock_epath(**fns)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """A ``FakeBucket`` under ``tmp_path/gcs``, with the working directory ``tmp_path/cwd`` and
  the system's temporary folder ``tmp_path/tmp`` (both checked to be left empty)."""
  for name in ("gcs", "cwd", "tmp"):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  # With TensorFlow installed epath would send gs:// to tf.io.gfile, past the mock.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fake = FakeBucket(tmp_path / "gcs")
  with fake.mock():
    yield fake
  assert not list((tmp_path / "cwd").iterdir())  # no $PWD/gs:/bucket/...
  assert not list((tmp_path / "tmp").iterdir())  # local temporaries removed
  assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  remote = files.as_path("gs://b/x")
  assert isinstance(remote, epath.Path) and str(remote) == "gs://b/x"
  assert str(remote / "y.json") == "gs://b/x/y.json" and str(remote.parent) == "gs://b"
  assert str(files.as_path(remote)) == "gs://b/x" and files.is_uri(remote)
  assert files.as_path("runs/a") == epath.Path(tmp_path / "runs" / "a")
  assert str(files.as_path("~/x")) == os.path.join(os.path.expanduser("~"), "x")
  assert not files.is_uri("runs/a") and not files.is_uri("/abs/gs://x")
  # tfds is handed strings: a bucket unchanged, a local folder absolute, "" its default.
  assert preparation.tfds_dir("gs://b/tfds") == "gs://b/tfds"
  assert preparation.tfds_dir("tfds") == os.fspath(tmp_path / "tfds")
  assert preparation.tfds_dir("") is None and preparation.tfds_dir(None) is None
  assert not list(tmp_path.iterdir())  # as_path creates nothing


def test_atomic_path_writes_a_local_temporary_and_uploads_it_whole(bucket):
  target = bucket.root / "bucket" / "run" / "out.png"
  with files.atomic_path("gs://bucket/run/out.png") as tmp:
    assert tmp.is_absolute() and tmp.suffix == ".png" and not files.is_uri(tmp)
    tmp.write_bytes(b"new")
    assert not target.exists()  # nothing visible before the block succeeds
  assert target.read_bytes() == b"new" and not tmp.exists()
  refused = pytest.raises(RuntimeError, match="upload refused")
  with refused, files.atomic_path("gs://bucket/run/out.png") as tmp:
    tmp.write_bytes(b"half")
    raise RuntimeError("upload refused")
  assert target.read_bytes() == b"new" and not tmp.exists()
  assert str(files.make_dirs("gs://bucket/new")) == "gs://bucket/new"
  assert not (bucket.root / "bucket" / "new").exists()  # buckets have no folders to make


def test_images_and_reports_are_written_to_the_bucket(bucket):
  pixels = np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4, 1)
  written = images.save_samples("gs://bucket/s", pixels, np.arange(4), trajectory=pixels[None])
  assert [str(p) for p in written] == [
    "gs://bucket/s/samples.png", "gs://bucket/s/samples.npz", "gs://bucket/s/trajectory.gif"
  ]  # fmt: skip
  out = bucket.root / "bucket" / "s"
  np.testing.assert_array_equal(np.load(out / "samples.npz")["images"], pixels)
  assert Image.open(out / "samples.png").size == (14, 14)  # 2 x 2 grid, padding 2
  assert Image.open(out / "trajectory.gif").n_frames == 1
  record = {
    "metric": "fid", "sampler": "ddim", "steps": 5, "num_samples": 4, "step": 7,
    "params": "ema", "features": "classifier-x", "fd": 1.5, "preview": pixels,
  }  # fmt: skip
  json_path, png_path = report.write_fid("gs://bucket/run/eval", record)
  assert json_path == "gs://bucket/run/eval/fid_ddim5_n4_step7_ema_classifier-x.json"
  saved = json.loads((bucket.root / json_path[len(PREFIX) :]).read_text())
  assert saved["fd"] == 1.5 and saved["files"] == [json_path, png_path]
  assert Image.open(bucket.root / png_path[len(PREFIX) :]).size == (14, 14)


def test_bpd_report_is_written_to_the_bucket(bucket):
  terms = {"vb": np.array([3.0, 0.5, 0.25]), "vb_stderr": np.full(3, 0.01)}
  record = {
    "metric": "bpd", "split": "test[:4]", "num_examples": 4, "step": 2, "params": "ema",
    "bpd": 3.75, "bpd_stderr": 0.02, "prior_bpd": 1e-5, "terms": terms,
  }  # fmt: skip
  paths = report.write_bpd("gs://bucket/run/eval", record)
  stem = "gs://bucket/run/eval/bpd_test_4_n4_step2_ema"
  assert paths == [f"{stem}.{ext}" for ext in ("json", "csv", "png")]
  local = [bucket.root / p[len(PREFIX) :] for p in paths]
  assert json.loads(local[0].read_text())["bpd"] == 3.75
  assert local[1].read_text().splitlines()[1] == "0,3,0.01"
  assert local[2].read_bytes().startswith(b"\x89PNG")


def test_statistics_and_classifiers_round_trip_through_the_bucket(bucket, classifier_path):
  net = FeatureNet(name="net-1a2b", apply=None, feature_dim=2, num_classes=2)
  data = ml_collections.ConfigDict({"name": "mnist", "image_size": 8})
  path = reference.reference_cache_path(net, data, split="test[:10]", cache_dir="gs://bucket/cache")
  assert str(path) == "gs://bucket/cache/mnist-test_10-8-net-1a2b.npz"
  stats = stats_lib.FeatureStats(mean=np.array([1.0, 2.0]), cov=np.eye(2), num=3)
  stats_lib.save_stats(path, stats)
  assert (bucket.root / "bucket" / "cache" / path.name).is_file()
  back = stats_lib.load_stats(str(path))
  np.testing.assert_array_equal(back.cov, stats.cov)
  assert back.num == 3
  with pytest.raises(FileNotFoundError):
    stats_lib.load_stats("gs://bucket/cache/none.npz")
  assert str(features.cache_dir("gs://bucket/cache")) == "gs://bucket/cache"
  model, meta = classifier.load(classifier_path)
  saved = classifier.save("gs://bucket/cls.npz", classifier.nnx.state(model), meta)
  assert str(saved) == "gs://bucket/cls.npz"
  assert classifier.load(saved)[1] == meta
  assert file_digest(saved) == file_digest(classifier_path)
  with pytest.raises(FileNotFoundError, match="no classifier weight file at gs://bucket/x.npz"):
    features.check_kind("classifier", "gs://bucket/x.npz")


def test_runs_and_image_folders_are_read_from_the_bucket(bucket):
  from jaxdiff import run

  with pytest.raises(FileNotFoundError, match=r"gs://bucket/run/config.json not found"):
    run.read_config("gs://bucket/run")
  (bucket.root / "bucket" / "run").mkdir(parents=True)
  (bucket.root / "bucket" / "run" / "config.json").write_text('{"seed": 3}')
  assert run.read_config("gs://bucket/run").seed == 3
  for name, value in (("a/1.png", 10), ("b/2.png", 200), ("b/notes.txt", None)):
    (bucket.root / "bucket" / "img" / name).parent.mkdir(parents=True, exist_ok=True)
    if value is None:
      (bucket.root / "bucket" / "img" / name).write_text("not an image")
    else:
      Image.fromarray(np.full((6, 6), value, np.uint8)).save(bucket.root / "bucket" / "img" / name)
  source = sources.ImageFolderSource("gs://bucket/img", image_size=4, channels=1)
  assert [str(p) for p in source.paths] == ["gs://bucket/img/a/1.png", "gs://bucket/img/b/2.png"]
  assert source.classes == ["a", "b"] and source.labels == [0, 1]
  assert source[1]["image"].shape == (4, 4, 1) and int(source[1]["image"].mean()) == 200


def test_checkpointer_keeps_a_bucket_directory_remote(bucket):
  # orbax lists the directory through epath (the mock); read_only saves and creates nothing.
  ckpt = checkpoints.Checkpointer("gs://bucket/run/checkpoints", read_only=True)
  try:
    assert str(ckpt.directory) == "gs://bucket/run/checkpoints"
    assert ckpt.all_steps() == [] and ckpt.latest_step() is None
  finally:
    ckpt.close()
  assert not list(bucket.root.iterdir())
