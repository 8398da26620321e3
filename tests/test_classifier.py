"""The classifier feature network: training (jaxdiff.training.classifier), the saved file and
the FeatureNet it loads as (jaxdiff.evaluation.classifier), its accuracy on a split."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import fashion_mnist, tiny
from jaxdiff import data
from jaxdiff.evaluation import classifier, features
from jaxdiff.training import classifier as training
from tests.test_data import FASHION_MNIST_RAW

# Small enough that training and evaluating take seconds on the 8 simulated devices.
ARCH = {"widths": (8, 16), "feature_dim": 16, "num_groups": 4}
STEPS = 30


def _folder_config(folder):
  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(folder)
  return config


def _all_images(config):
  source = data.make_source(config.data, split="train")
  records = [source[i] for i in range(len(source))]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1
  return jnp.asarray(images), jnp.asarray([r["label"] for r in records], jnp.int32)


@pytest.fixture(scope="module")
def trained(image_dir, tmp_path_factory):
  path = tmp_path_factory.mktemp("classifier") / "clf.npz"
  result = training.train(
    _folder_config(image_dir),
    path,
    steps=STEPS,
    batch_size=16,
    learning_rate=3e-3,
    progress=False,
    **ARCH,
  )
  return result, path


def test_training_lowers_the_loss_on_a_fixed_batch(image_dir, trained):
  result, path = trained
  config = _folder_config(image_dir)
  images, labels = _all_images(config)
  before = classifier.build_model(1, 2, jax.random.key(0), image_size=8, **ARCH)
  after, meta = classifier.load(path)
  loss_before = float(classifier.loss(before, images, labels))
  loss_after = float(classifier.loss(after, images, labels))
  assert loss_after < loss_before - 0.05, (loss_before, loss_after)
  assert result["train_steps"] == STEPS and result["path"] == str(path)
  assert result["test_examples"] == 48  # an image folder is one split: all of it
  assert 0.0 <= result["test_accuracy"] <= 1.0
  assert meta["test_accuracy"] == result["test_accuracy"]
  assert meta["dataset"] == "image_folder" and meta["steps"] == STEPS
  assert (meta["image_size"], meta["channels"], meta["num_classes"]) == (8, 1, 2)
  assert meta["feature_dim"] == 16 and meta["widths"] == [8, 16]
  assert meta["format_version"] == classifier.FORMAT_VERSION


def test_accuracy_counts_every_example_once(image_dir, trained):
  config = _folder_config(image_dir)
  model, _ = classifier.load(trained[1])
  images, labels = _all_images(config)
  expected = float(jnp.mean(jnp.argmax(model(images)["logits"], -1) == labels))
  # 48 = 40 + a padded remainder of 8; and one batch bigger than the split.
  for batch_size in (40, 1000):
    accuracy, count = classifier.accuracy(model, config.data, batch_size=batch_size)
    assert count == 48
    assert accuracy == pytest.approx(expected, abs=1e-6)


def test_save_load_round_trip_gives_identical_features(image_dir, trained, tmp_path):
  model, meta = classifier.load(trained[1])
  images, _ = _all_images(_folder_config(image_dir))
  copy = classifier.save(tmp_path / "copy.npz", classifier.nnx.state(model), meta)
  reloaded, meta2 = classifier.load(copy)
  np.testing.assert_array_equal(model(images)["features"], reloaded(images)["features"])
  assert meta2 == meta
  net = classifier.feature_net(trained[1])
  np.testing.assert_array_equal(net.apply(images)["features"], model(images)["features"])
  assert sorted(f for f in np.load(copy).files if f != classifier.META_KEY) == [
    "convs/0/bias",
    "convs/0/kernel",
    "convs/1/bias",
    "convs/1/kernel",
    "feature/bias",
    "feature/kernel",
    "head/bias",
    "head/kernel",
    "norms/0/bias",
    "norms/0/scale",
    "norms/1/bias",
    "norms/1/scale",
  ]
  assert json.loads(str(np.load(copy)[classifier.META_KEY]))["dataset"] == "image_folder"


def test_feature_net_shapes_and_name(trained, tmp_path):
  path = trained[1]
  net = features.load("classifier", path)
  assert (net.feature_dim, net.num_classes) == (16, 2)
  out = net.apply(jnp.zeros((5, 8, 8, 1)))
  assert out["features"].shape == (5, 16) and out["logits"].shape == (5, 2)
  digest = features.file_digest(path)
  assert net.name == f"classifier-image_folder-{digest}"
  # Different weights, different name: cached statistics must not be shared.
  model, meta = classifier.load(path)
  params = jax.tree.map(lambda x: x + 0.01, classifier.nnx.state(model))
  other = classifier.feature_net(classifier.save(tmp_path / "other.npz", params, meta))
  assert other.name != net.name and other.name.startswith("classifier-image_folder-")


def test_apply_is_a_jit_argument(trained, tmp_path):
  @jax.jit
  def mean_features(apply, images):
    return jnp.mean(apply(images)["features"], axis=0)

  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
  net = classifier.feature_net(trained[1])
  np.testing.assert_allclose(
    mean_features(net.apply, images), jnp.mean(net.apply(images)["features"], 0), atol=1e-6
  )
  # Other weights of the same architecture reuse the compiled function.
  model, meta = classifier.load(trained[1])
  params = jax.tree.map(lambda x: -x, classifier.nnx.state(model))
  other = classifier.feature_net(classifier.save(tmp_path / "neg.npz", params, meta))
  assert not np.allclose(mean_features(other.apply, images), mean_features(net.apply, images))
  assert mean_features._cache_size() == 1


@pytest.mark.parametrize("shape", [(2, 9, 8, 1), (2, 8, 8, 3), (8, 8, 1)])
def test_wrong_image_shape_is_a_clear_error(trained, shape):
  net = classifier.feature_net(trained[1])
  with pytest.raises(ValueError, match=r"expects images \[B, 8, 8, 1\].*got shape"):
    net.apply(jnp.zeros(shape))
  with pytest.raises(ValueError, match=r"expects images"):
    jax.jit(net.apply)(jnp.zeros(shape))


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": 12}, "batch_size=12 is not a positive multiple of the 8 devices"),
    ({"learning_rate": 0.0}, "learning_rate must be positive"),
    ({"widths": ()}, "at least one stage"),
  ],
)
def test_bad_arguments(image_dir, tmp_path, kwargs, match):
  kwargs = {"steps": 2, "batch_size": 8, **kwargs}
  with pytest.raises(ValueError, match=match):
    training.train(_folder_config(image_dir), tmp_path / "x.npz", progress=False, **kwargs)
  assert not list(tmp_path.iterdir())


def test_dataset_without_classes_is_rejected(tmp_path):
  folder = tmp_path / "flat"
  folder.mkdir()
  for i in range(8):
    Image.fromarray(np.full((8, 8), i * 30, np.uint8), mode="L").save(folder / f"{i}.png")
  with pytest.raises(ValueError, match="1 class"):
    training.train(_folder_config(folder), tmp_path / "x.npz", steps=2, batch_size=8)


def test_load_rejects_other_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    classifier.load(tmp_path / "missing.npz")
  np.savez(tmp_path / "other.npz", w=np.zeros(3))
  with pytest.raises(ValueError, match="not a jaxdiff classifier"):
    classifier.feature_net(tmp_path / "other.npz")


def test_failed_save_leaves_no_file_behind(trained, tmp_path, monkeypatch):
  model, meta = classifier.load(trained[1])
  params = classifier.nnx.state(model)
  existing = tmp_path / "existing.npz"
  existing.write_bytes(b"old contents")

  def write_half_then_fail(f, arrays):
    f.write(b"PK\x03\x04 half an archive")
    raise OSError("disk full")

  monkeypatch.setattr(classifier, "_write_npz", write_half_then_fail)
  for target in (existing, tmp_path / "new.npz"):
    with pytest.raises(OSError, match="disk full"):
      classifier.save(target, params, meta)
  assert [p.name for p in tmp_path.iterdir()] == ["existing.npz"]
  assert existing.read_bytes() == b"old contents"


@pytest.mark.slow
def test_default_training_on_fashion_mnist(tmp_path):
  config = fashion_mnist.get_config()
  config.data.manual_dir = str(FASHION_MNIST_RAW)
  try:  # prepares it from ../shared/data when TensorFlow is there
    data.prepare(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  except data.DatasetNotPreparedError as e:
    pytest.skip(str(e))
  result = training.train(config, tmp_path / "fmnist.npz", progress=False)
  assert result["test_examples"] == 10_000
  assert result["test_accuracy"] >= 0.85, result
  net = classifier.feature_net(result["path"])
  assert net.name.startswith("classifier-fashion_mnist-")
  assert net.apply(jnp.zeros((2, 28, 28, 1)))["features"].shape == (2, 128)


@pytest.mark.slow  # TensorFlow prepares Fashion-MNIST; a CLI process
def test_cli_prepares_the_dataset_from_manual_dir(tmp_path):
  """`jaxdiff train-classifier --config.data.manual_dir=...` prepares the dataset first, as
  `jaxdiff train` does (it used to stop with "not prepared: pass --config.data.manual_dir")."""
  pytest.importorskip("tensorflow")
  from tests.conftest import jaxdiff_cli

  proc = jaxdiff_cli(
    "train-classifier", "--config=configs/fashion_mnist.py",
    f"--config.data.manual_dir={FASHION_MNIST_RAW}", f"--config.data.data_dir={tmp_path / 'tfds'}",
    "--train_steps=2", f"--out={tmp_path / 'out'}",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert list((tmp_path / "out").glob("classifier-fashion_mnist-*.npz"))
