"""Progress: sampling reports every step from inside its scan; evaluation and the classifier
show labelled bars.

All cheap: a model that returns zeros, 2x2 images, a few steps and a 10-step schedule; a
projection as the feature network; a fake classifier train step. Bars are counted by
recording every tqdm the library makes (``bars``).
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tqdm
from jax.sharding import AxisType

from jaxdiff import parallel
from jaxdiff import sampling as S
from jaxdiff.core import diffusion as D
from jaxdiff.core import schedules
from jaxdiff.evaluation import bpd as bpd_lib
from jaxdiff.evaluation import extract, quality, reference, stats
from jaxdiff.evaluation.featurenet import FeatureNet
from jaxdiff.sampling import progress
from jaxdiff.training import classifier as train_classifier

SHAPE = (8, 2, 2, 1)  # 8: one row per simulated device
D10 = D.make_diffusion(schedules.get_betas("cosine", 10))


def _zeros(params, x, t, y=None):
  return params * jnp.zeros_like(x)


ZEROS = jax.tree_util.Partial(_zeros, jnp.float32(1.0))  # parameters as a jit argument


class Counter:
  """A listener that counts its calls (they come from an XLA thread)."""

  def __init__(self):
    self.n = 0

  def __call__(self):
    self.n += 1


@pytest.fixture(scope="module")
def mesh8():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.fixture
def bars(monkeypatch):
  """Every tqdm bar the library makes, in order (they stay readable after closing)."""
  made = []

  class Recording(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append(self)

  monkeypatch.setattr(tqdm, "tqdm", Recording)  # modules that import tqdm when they draw
  monkeypatch.setattr(quality, "tqdm", Recording)
  monkeypatch.setattr(train_classifier, "tqdm", Recording)
  return made


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sharded", [False, True])
def test_the_callback_fires_once_per_step_and_leaves_the_samples_alone(sharded, mesh8):
  """Once per step, also with the batch over 8 devices; the same bits as without progress; and
  new parameters reuse the compiled sampler."""
  chex.clear_trace_counter()
  counted = jax.tree_util.Partial(chex.assert_max_traces(_zeros, n=2), jnp.float32(1.0))
  kw = dict(sampler="ddpm", num_steps=5, mesh=mesh8 if sharded else None, return_trajectory=True)
  key = jax.random.key(0)
  want, want_traj = S.sample(D10, counted, key, SHAPE, **kw)  # trace 1: without progress
  calls = Counter()
  got, traj = S.sample(D10, counted, key, SHAPE, progress=calls, **kw)  # trace 2
  assert calls.n == 5
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(traj, want_traj)
  if sharded:
    assert len(got.sharding.device_set) == 8
  other = jax.tree_util.Partial(counted.func, jnp.float32(0.5))  # a new checkpoint: no trace
  S.sample(D10, other, key, SHAPE, progress=calls, **kw)
  assert calls.n == 10


def test_sample_in_chunks_has_one_bar_over_all_steps(bars, mesh8):
  out = S.sample_in_chunks(
    D10, ZEROS, jax.random.key(0), 20, (2, 2, 1), batch_size=8, num_steps=4, mesh=mesh8,
    progress=True,
  )  # fmt: skip
  assert out.shape == (20, 2, 2, 1)
  (bar,) = bars
  assert (bar.desc, bar.unit, bar.total, bar.n) == ("sampling", "step", 4 * 3, 4 * 3)
  assert bar.postfix == "chunk=3/3"
  # sample() has its own bar over its steps (all T of the schedule without num_steps).
  S.sample(D10, ZEROS, jax.random.key(0), SHAPE, progress=True)
  assert (bars[1].total, bars[1].n) == (10, 10)


def test_only_process_0_draws_but_every_process_compiles_the_callback(bars, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  kw = dict(num_steps=3, batch_size=8, progress=True)
  S.sample_in_chunks(D10, ZEROS, jax.random.key(0), 8, (2, 2, 1), **kw)
  assert bars[0].disable
  calls = Counter()
  with progress.listen(calls):  # the program still reports (on device 0's process)
    S.sample_in_chunks(D10, ZEROS, jax.random.key(0), 8, (2, 2, 1), **kw)
  assert calls.n == 3


def test_without_progress_the_program_has_no_callback():
  x_T = jnp.zeros(SHAPE)
  args = (D10, ZEROS, jax.random.key(0), x_T)
  off = jax.jit(S.make_sampler("ddim")).lower(*args).as_text()
  on = jax.jit(S.make_sampler("ddim", progress=True)).lower(*args).as_text()
  assert "callback" not in off
  assert "callback" in on


def test_a_listener_hears_steps_only_while_it_listens():
  one, two = Counter(), Counter()
  with progress.listen(one), progress.listen(two):
    S.sample(D10, ZEROS, jax.random.key(0), SHAPE, num_steps=3, progress=True)
  S.sample(D10, ZEROS, jax.random.key(0), SHAPE, num_steps=3, progress=True)
  assert one.n == two.n == 3


# ----------------------------------------------------------------------------- evaluation


def _net() -> FeatureNet:
  def apply(images):
    flat = images.reshape(images.shape[0], -1)  # [B, 64] for 8x8 grey
    return {"features": flat[:, :4], "logits": flat[:, :3]}

  return FeatureNet("flat", jax.tree_util.Partial(apply), feature_dim=4, num_classes=3)


def test_sample_quality_shows_its_phases(bars):
  rng = np.random.default_rng(0)
  ref = stats.feature_stats(rng.normal(size=(16, 4)))
  sample_fn = lambda key, n: rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)  # noqa: E731
  quality.sample_quality(sample_fn, _net(), ref, num_samples=16, batch_size=8, progress=True)
  phases, features = bars
  assert (phases.n, phases.total) == (3, 3)
  assert phases.desc == "sample quality: frechet distance"
  assert features.desc == "sample features (flat)" and features.n == features.total == 2
  bars.clear()
  quality.sample_quality(sample_fn, _net(), ref, num_samples=16, batch_size=8)
  assert all(bar.disable for bar in bars)


def test_reference_features_bar_names_the_split(bars, image_dir, tmp_path):
  data = ml_collections.ConfigDict(
    {"name": "image_folder", "image_folder": str(image_dir), "image_size": 8, "channels": 1,
     "random_flip": False, "num_classes": 2}
  )  # fmt: skip
  reference.reference_stats(
    _net(), data, split="test", cache_dir=tmp_path, batch_size=16, progress=True
  )
  (bar,) = bars
  assert bar.desc == "reference features image_folder:test (flat)"
  assert bar.n == bar.total == 3  # 48 images in batches of 16


def test_bits_per_dim_bar_counts_t_chunks(bars):
  images = np.zeros((8, 2, 2, 1), np.uint8)
  model = jax.tree_util.Partial(lambda x, t: jnp.zeros_like(x))
  bpd_lib.bits_per_dim(D10, model, images, batch_size=8, t_chunk=4, progress=True)
  (bar,) = bars
  assert bar.desc == "bits/dim (8 examples, 10 timesteps)"
  assert (bar.unit, bar.n, bar.total) == ("t-chunk", 3, 3)  # 10 timesteps in chunks of 4


def test_extract_labels_its_bar(bars):
  images = np.zeros((8, 8, 8, 1), np.float32)
  extract.compute_features(_net(), images, batch_size=8, progress=True, desc="my images")
  assert bars[0].desc == "my images (flat)"


# ----------------------------------------------------------------------------- classifier


def test_classifier_trains_under_a_bar_with_the_loss(bars):
  mesh = parallel.make_mesh()
  losses = iter(np.linspace(1.0, 0.5, 5, dtype=np.float32))

  def train_step(params, opt_state, batch):  # a fake: no compile
    return params, opt_state, jnp.asarray(next(losses))

  batches = iter(lambda: {"image": np.zeros((8, 2, 2, 1), np.float32)}, None)
  _, final, _ = train_classifier._fit(train_step, {}, {}, batches, mesh, 5, progress=True)
  (bar,) = bars
  assert (bar.desc, bar.unit, bar.n, bar.total) == ("classifier training", "step", 5, 5)
  assert final == 0.5 and bar.postfix == "loss=0.5000"
