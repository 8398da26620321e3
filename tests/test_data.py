"""Tests for jaxdiff.data: sources, the training pipeline and the split reader.

Fast tests run the grain pipeline and the split reader on in-memory sources and PNG/JPEG folders
written here; they need no TensorFlow. Tests marked slow prepare the real Fashion-MNIST from
../shared/data (next to the repo) and need tensorflow-cpu (pip install 'jaxdiff[prepare]').
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff import config as default
from jaxdiff import data
from jaxdiff.data import pipeline, preparation

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_RAW = REPO.parent / "shared" / "data" / "fashion_mnist"
H, W, C = 4, 5, 1


def _source(n: int = 40) -> list[dict]:
  """Record i has label i; pixels include 0 and 255 and no image is left-right symmetric."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    image = rng.integers(0, 256, (H, W, C), dtype=np.uint8)
    image[0, 0], image[0, -1] = 0, 255
    records.append({"image": image, "label": i})
  return records


def _take(ds, steps: int) -> list[dict]:
  it = iter(ds)
  return [next(it) for _ in range(steps)]


def _labels(batches: list[dict]) -> list[list[int]]:
  return [b["label"].tolist() for b in batches]


def test_scaling_exact_shapes_and_dtypes():
  src = _source()
  (batch,) = _take(data.make_dataset(src, seed=0, batch_size=8), 1)
  assert batch["image"].shape == (8, H, W, C) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  raw = np.stack([src[i]["image"] for i in batch["label"]])
  np.testing.assert_array_equal(batch["image"], raw.astype(np.float32) / 127.5 - 1)  # bit-exact
  assert batch["image"][:, 0, 0, 0].tolist() == [-1.0] * 8  # pixel 0
  assert batch["image"][:, 0, -1, 0].tolist() == [1.0] * 8  # pixel 255


def test_seed_determines_order():
  src = _source()
  run = lambda seed: _labels(_take(data.make_dataset(src, seed=seed, batch_size=8), 5))
  assert run(0) == run(0)
  assert run(0) != run(1)
  assert _labels(_take(data.make_dataset(src, seed=0, batch_size=8, shuffle=False), 2)) == [
    list(range(8)),
    list(range(8, 16)),
  ]


def test_epochs_are_reshuffled_permutations_and_drop_remainder():
  src = _source(42)  # 5 full batches of 8 per epoch; 2 examples dropped per epoch
  batches = _take(data.make_dataset(src, seed=0, batch_size=8, num_epochs=2), 10)
  epochs = [sum(_labels(batches[:5]), []), sum(_labels(batches[5:]), [])]
  assert all(len(set(e)) == 40 and set(e) <= set(range(42)) for e in epochs)
  assert epochs[0] != epochs[1]
  with pytest.raises(StopIteration):
    _take(data.make_dataset(src, seed=0, batch_size=8, num_epochs=2), 11)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_are_disjoint_and_cover_the_global_batch(process_count):
  src = _source()
  global_batches = _labels(_take(data.make_dataset(src, seed=3, batch_size=8), 10))
  hosts = [
    _labels(
      _take(
        data.make_dataset(src, seed=3, batch_size=8, process_index=p, process_count=process_count),
        10,
      )
    )
    for p in range(process_count)
  ]
  for step, global_batch in enumerate(global_batches):
    per_host = [h[step] for h in hosts]
    assert all(len(b) == 8 // process_count for b in per_host)
    union = sum(per_host, [])
    assert len(set(union)) == 8  # disjoint
    assert set(union) == set(global_batch)  # same global batch whatever the host count


def test_random_flip_only_when_asked_and_deterministic():
  src = _source()
  originals = np.stack([r["image"] for r in src]).astype(np.float32) / 127.5 - 1
  plain = _take(data.make_dataset(src, seed=0, batch_size=8), 5)
  for b in plain:
    np.testing.assert_array_equal(b["image"], originals[b["label"]])
  flipped = _take(data.make_dataset(src, seed=0, batch_size=8, random_flip=True), 10)
  assert _labels(flipped[:5]) == _labels(plain)  # flipping does not change the order
  is_flipped = []
  for b in flipped:
    for image, label in zip(b["image"], b["label"], strict=True):
      if np.array_equal(image, originals[label]):
        is_flipped.append(False)
      else:
        np.testing.assert_array_equal(image, originals[label][:, ::-1])
        is_flipped.append(True)
  assert 0 < sum(is_flipped) < len(is_flipped)
  again = _take(data.make_dataset(src, seed=0, batch_size=8, random_flip=True), 10)
  for a, b in zip(flipped, again, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Flips follow the position in the global stream, so host 1 of 2 sees the same pixels.
  host = _take(
    data.make_dataset(
      src, seed=0, batch_size=8, random_flip=True, process_index=1, process_count=2
    ),
    10,
  )
  for g, h in zip(flipped, host, strict=True):
    np.testing.assert_array_equal(h["image"], g["image"][1::2])


def test_iterator_state_resumes_identically():
  src = _source()
  make = lambda: data.make_dataset(
    src, seed=5, batch_size=8, random_flip=True, process_index=1, process_count=2, prefetch=4
  )
  it = iter(make())
  for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able
  expected = [next(it) for _ in range(6)]
  resumed = iter(make())
  resumed.set_state(state)
  for e, r in zip(expected, [next(resumed) for _ in range(6)], strict=True):
    np.testing.assert_array_equal(e["image"], r["image"])
    np.testing.assert_array_equal(e["label"], r["label"])


def test_orbax_checkpoints_iterator_state(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain

  make = lambda: iter(data.make_dataset(_source(), seed=1, batch_size=8))
  it = make()
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _labels([next(it) for _ in range(4)])
    resumed = make()
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert _labels([next(resumed) for _ in range(4)]) == expected


def test_batch_size_must_fit():
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.make_dataset(_source(), seed=0, batch_size=9, process_count=2)
  with pytest.raises(ValueError, match="exceeds"):
    data.make_dataset(_source(), seed=0, batch_size=64)


def _config(**data_fields):
  config = default.get_config()
  for key, value in data_fields.items():
    setattr(config.data, key, value)
  return config


def _write_folder(root: Path) -> None:
  # 10x6 RGB whose central 6x6 square is black and side columns white: a center crop is all 0.
  wide = np.full((6, 10, 3), 255, np.uint8)
  wide[:, 2:8] = 0
  (root / "cat").mkdir(parents=True)
  (root / "dog" / "nested").mkdir(parents=True)
  Image.fromarray(wide).save(root / "cat" / "a.png")
  Image.fromarray(np.full((12, 12), 200, np.uint8)).save(root / "dog" / "b.jpg", quality=100)
  Image.fromarray(np.zeros((6, 6, 4), np.uint8)).save(root / "dog" / "nested" / "c.PNG")
  (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_source(tmp_path):
  _write_folder(tmp_path)
  source = data.make_source(
    _config(name="image_folder", image_folder=str(tmp_path), image_size=6, channels=3).data,
    split="train",
  )
  assert len(source) == 3 and source.classes == ["cat", "dog"]
  examples = [source[i] for i in range(3)]
  assert [e["label"] for e in examples] == [0, 1, 1]
  assert all(e["image"].shape == (6, 6, 3) and e["image"].dtype == np.uint8 for e in examples)
  np.testing.assert_array_equal(examples[0]["image"], 0)  # center crop, no resampling
  assert np.abs(examples[1]["image"].astype(int) - 200).max() <= 2  # 12 -> 6 resize, grey -> RGB
  grey = data.make_source(
    _config(name="image_folder", image_folder=str(tmp_path / "dog"), image_size=8, channels=1).data,
    split="train",
  )
  assert grey.classes == [] and [grey[i]["label"] for i in range(2)] == [0, 0]  # mixed depth
  assert grey[0]["image"].shape == (8, 8, 1)


def test_image_folder_iterator_and_info(tmp_path):
  _write_folder(tmp_path)
  config = _config(name="image_folder", image_folder=str(tmp_path), image_size=6, channels=3)
  assert data.dataset_info(config.data) == ({"train": 3}, (6, 6, 3), 2)
  it = data.make_iterator(config, seed=0, batch_size=2, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (2, 6, 6, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_unprepared_dataset_gives_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(preparation, "_has_tensorflow", lambda: False)
  monkeypatch.setattr(preparation, "_reachable", lambda *a, **k: False)  # never the network
  data_dir = tmp_path / "tfds"
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.prepare("mnist", data_dir=str(data_dir))
  message = str(e.value)
  for part in [
    "'mnist' is not prepared",
    str(data_dir),
    "--config.data.manual_dir=PATH",
    "train-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
    "jaxdiff[prepare]",
    "TensorFlow is not installed",
    "jaxdiff prepare --name mnist",
  ]:
    assert part in message
  (tmp_path / "raw").mkdir()
  (tmp_path / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(data.DatasetNotPreparedError, match="lacks t10k-images-idx3-ubyte.gz"):
    data.prepare("mnist", data_dir=str(data_dir), manual_dir=str(tmp_path / "raw"))
  with pytest.raises(data.DatasetNotPreparedError, match="--config.data.manual_dir"):
    data.make_iterator(_config(name="mnist", data_dir=str(data_dir)), batch_size=8)
  assert not tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
  data.prepare("image_folder", data_dir=str(data_dir))  # nothing to prepare
  with pytest.raises(ValueError, match="^data.name='fashion_mnistt' is not a tfds dataset"):
    data.make_source(_config(name="fashion_mnistt", data_dir=str(data_dir)).data, split="train")


def test_workers_outside_absl_is_a_clear_error(monkeypatch):
  # Library code leaves absl's global flag state alone; it says how to run with workers instead.
  unparsed = SimpleNamespace(FLAGS=SimpleNamespace(is_parsed=lambda: False))
  monkeypatch.setattr(pipeline, "flags", unparsed)
  with pytest.raises(RuntimeError, match=r"absl\.app\.run.*mark_as_parsed.*num_workers = 0"):
    data.make_dataset(_source(), seed=0, batch_size=8, num_workers=1)


# ------------------------------------------------------------------------ the split reader


def _read_all(reader: data.SplitReader) -> list[dict]:
  return list(reader)


def test_split_reader_order_padding_and_mask():
  src = _source(21)
  reader = data.SplitReader(src, batch_size=5, multiple=4, process_index=0, process_count=1)
  assert (reader.batch_size, reader.local_batch_size, len(reader)) == (8, 8, 3)  # 5 -> 8
  batches = _read_all(reader)
  assert [b["index"].tolist() for b in batches] == [list(range(s, s + 8)) for s in (0, 8, 16)]
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.dtype == bool and mask.tolist() == [True] * 21 + [False] * 3
  last = batches[-1]
  assert last["label"].tolist() == [16, 17, 18, 19, 20, 0, 0, 0]
  np.testing.assert_array_equal(last["image"][5:], -1)  # padding: black (pixel 0), masked
  images = np.concatenate([b["image"] for b in batches])[mask]
  raw = np.stack([r["image"] for r in src])
  assert images.dtype == np.float32
  np.testing.assert_array_equal(images, raw.astype(np.float32) / np.float32(127.5) - 1)  # exact
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert labels.dtype == np.int32 and labels.tolist() == list(range(21))


def test_split_reader_caps_the_batch_at_the_examples_and_cuts_num_examples():
  src = _source(40)
  reader = data.SplitReader(src, batch_size=1000, num_examples=10, multiple=8, process_count=1)
  assert (reader.batch_size, len(reader), reader.num_examples) == (16, 1, 10)
  (batch,) = _read_all(reader)
  assert batch["mask"].sum() == 10 and batch["label"][batch["mask"]].tolist() == list(range(10))
  for bad in (0, 41):
    with pytest.raises(ValueError, match=f"num_examples={bad}; the source has 1..40"):
      data.SplitReader(src, batch_size=8, num_examples=bad)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    data.SplitReader(src, batch_size=0)


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
def test_split_reader_processes_reassemble_in_example_order(process_count):
  src = _source(23)
  readers = [
    data.SplitReader(src, batch_size=6, multiple=2, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  assert len({(r.batch_size, len(r)) for r in readers}) == 1  # every process runs the same steps
  assert readers[0].batch_size % math.lcm(2, process_count) == 0
  gathered = []
  for step in zip(*map(_read_all, readers), strict=True):
    assert len({b["image"].shape for b in step}) == 1  # equal shapes on every process
    # What make_array_from_process_local_data + to_host do: process 0's rows first.
    gathered.append({k: np.concatenate([b[k] for b in step]) for k in ("label", "mask", "index")})
  index = np.concatenate([g["index"] for g in gathered])
  np.testing.assert_array_equal(index, np.arange(len(index)))  # contiguous, in order
  mask = np.concatenate([g["mask"] for g in gathered])
  labels = np.concatenate([g["label"] for g in gathered])[mask]
  assert labels.tolist() == list(range(23))  # every example exactly once, in order


def test_array_source_and_read_examples(image_dir):
  pixels = np.arange(5 * 2 * 2 * 1, dtype=np.uint8).reshape(5, 2, 2, 1)
  (batch,) = data.SplitReader(data.ArraySource(pixels), batch_size=8, process_count=1)
  np.testing.assert_array_equal(batch["image"][:5], pixels.astype(np.float32) / 127.5 - 1)
  floats = np.linspace(-1, 1, 5 * 4, dtype=np.float32).reshape(5, 2, 2, 1)
  (batch,) = data.SplitReader(data.ArraySource(floats), batch_size=8, process_count=1)
  np.testing.assert_array_equal(batch["image"][:5], floats)  # model-space input passes through
  with pytest.raises(ValueError, match="NHWC"):
    data.ArraySource(np.zeros((5, 2, 2)))

  config = _config(name="image_folder", image_folder=str(image_dir), image_size=8, channels=1)
  source = data.make_source(config.data, split="train")
  first = data.read_examples(config.data, "test", 7)  # an image folder is one split
  assert first.shape == (7, 8, 8, 1) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, np.stack([source[i]["image"] for i in range(7)]))
  assert len(data.read_examples(config.data, "train")) == 48
  with pytest.raises(ValueError, match=r"num_examples=1000; split 'test' has 1\.\.48"):
    data.read_examples(config.data, "test", 1000)


# ------------------------------------------------------------------------ real data (slow)

needs_tf = pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is None,
  reason="preparing a tfds dataset needs tensorflow-cpu: pip install 'jaxdiff[prepare]'",
)
needs_raw = pytest.mark.skipif(
  not FASHION_MNIST_RAW.is_dir(), reason=f"raw Fashion-MNIST files not found in {FASHION_MNIST_RAW}"
)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  start = time.perf_counter()
  data.prepare("fashion_mnist", data_dir=data_dir, manual_dir=os.path.relpath(FASHION_MNIST_RAW))
  print(f"prepared fashion_mnist in {time.perf_counter() - start:.1f}s")
  return data_dir


@pytest.mark.slow
@needs_tf
@needs_raw
def test_prepare_fashion_mnist(fmnist_dir):
  config = _config(name="fashion_mnist", data_dir=fmnist_dir)
  assert data.dataset_info(config.data) == ({"train": 60000, "test": 10000}, (28, 28, 1), 10)
  start = time.perf_counter()
  data.prepare("fashion_mnist", data_dir=fmnist_dir, manual_dir=None)  # already there: no-op
  assert time.perf_counter() - start < 2
  assert not list(Path(fmnist_dir, "downloads").iterdir())  # extracted raw files removed
  assert len(data.make_source(config.data, split="train")) == 60000


@pytest.mark.slow
@needs_tf
@needs_raw
def test_fashion_mnist_batches(fmnist_dir):
  config = _config(name="fashion_mnist", data_dir=fmnist_dir)
  it = data.make_iterator(
    config,
    split="test",
    seed=0,
    batch_size=1000,
    process_index=0,
    process_count=1,
    shuffle=False,
    num_epochs=1,
  )
  batches = list(it)
  assert len(batches) == 10
  images = np.concatenate([b["image"] for b in batches])  # [10000, 28, 28, 1]
  labels = np.concatenate([b["label"] for b in batches])
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.float32
  assert images.min() == -1 and images.max() == 1
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
  # Fashion-MNIST pixel mean 0.286 and std 0.353 on [0, 1] -> 2 * m - 1 and 2 * s on [-1, 1].
  assert abs(images.mean() - (2 * 0.286 - 1)) < 0.02
  assert abs(images.std() - 2 * 0.353) < 0.02
  train = next(data.make_iterator(config, seed=0, batch_size=128, process_index=0, process_count=1))
  assert train["image"].shape == (128, 28, 28, 1) and 0 <= train["label"].min() <= 9


_READ_WITHOUT_TF = """
import importlib.abc, importlib.machinery, sys
class _Loader(importlib.abc.Loader):
  def create_module(self, spec):
    raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
  def exec_module(self, module):
    pass
class _NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] == "tensorflow":
      return importlib.machinery.ModuleSpec(name, _Loader())
sys.meta_path.insert(0, _NoTensorFlow())
from jaxdiff import config as default
from jaxdiff import data
config = default.get_config()
config.data.data_dir = sys.argv[1]
batch = next(data.make_iterator(config, batch_size=16, process_index=0, process_count=1))
assert batch["image"].shape == (16, 28, 28, 1) and "tensorflow" not in sys.modules
"""


@pytest.mark.slow
@needs_tf
@needs_raw
def test_reading_needs_no_tensorflow(fmnist_dir):
  subprocess.run([sys.executable, "-c", _READ_WITHOUT_TF, fmnist_dir], cwd=REPO, check=True)


@pytest.mark.slow
@needs_tf
@needs_raw
def test_killed_prepare_leaves_nothing_prepared(tmp_path):
  data_dir = tmp_path / "tfds"
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jaxdiff.cli.prepare",
      "--name",
      "fashion_mnist",
      "--manual_dir",
      str(FASHION_MNIST_RAW),
      "--data_dir",
      str(data_dir),
    ],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + 120
    while not list(data_dir.glob("fashion_mnist/incomplete.*")):  # tfds started writing
      assert proc.poll() is None and time.monotonic() < deadline, "prepare ended too early"
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not tfds.builder("fashion_mnist", data_dir=str(data_dir)).is_prepared()
  with pytest.raises(data.DatasetNotPreparedError):
    data.make_source(_config(name="fashion_mnist", data_dir=str(data_dir)).data, split="train")


@pytest.mark.slow
@needs_tf
def test_failed_prepare_cleans_up(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  for name in [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
  ]:
    (raw / name).write_bytes(b"corrupt")
  data_dir = tmp_path / "tfds"
  with pytest.raises(data.DatasetNotPreparedError, match=r"^preparing mnist from .* failed: "):
    data.prepare("mnist", data_dir=str(data_dir), manual_dir=str(raw))
  assert not tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
  assert not list(data_dir.glob("mnist/*")) and not list(data_dir.glob("downloads/*"))
