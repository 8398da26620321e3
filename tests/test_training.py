"""The train step, its sharding, and the training loop's resume, NaN and signal paths."""

import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from jaxdiff import data, parallel, training
from jaxdiff.io import checkpoints
from tests.conftest import tiny_config


def _config(image_dir=None, **overrides):
  config = tiny.get_config()
  if image_dir is not None:
    config.data.name = "image_folder"
    config.data.image_folder = str(image_dir)
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def _batches(n, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "image": rng.uniform(-1, 1, (batch, 8, 8, 1)).astype(np.float32),
      "label": rng.integers(0, 10, (batch,)).astype(np.int32),
    }
    for _ in range(n)
  ]


def _run_steps(config, mesh, batches, fsdp=False):
  graphdef, _, optimizer, diffusion = training.build(config)
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer), fsdp=fsdp)
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  step = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  losses = []
  for b in batches:
    state, metrics = step(state, parallel.global_batch(mesh, b), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return state, np.array(losses)


# ----------------------------------------------------------------------------- pieces


def test_learning_rate_warmup_then_constant_or_cosine():
  cfg = _config().training
  cfg.learning_rate, cfg.warmup_steps, cfg.num_steps = 1e-3, 10, 110
  lr = training.learning_rate_schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(100)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
  cfg.lr_schedule = "cosine"
  lr = training.learning_rate_schedule(cfg)
  np.testing.assert_allclose([lr(10), lr(60), lr(110)], [1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-9)
  cfg.lr_schedule = "step"
  with pytest.raises(ValueError, match=r"unknown training.lr_schedule 'step'; allowed: constant"):
    training.learning_rate_schedule(cfg)


def test_ema_decay_warmup():
  cfg = _config().training
  cfg.ema_decay = 0.9999
  np.testing.assert_allclose(training.ema_decay(cfg, jnp.array(0)), 0.1)
  np.testing.assert_allclose(training.ema_decay(cfg, jnp.array(90)), 91 / 100)
  np.testing.assert_allclose(training.ema_decay(cfg, jnp.array(10**7)), 0.9999)
  cfg.ema_warmup = False
  np.testing.assert_allclose(training.ema_decay(cfg, jnp.array(0)), 0.9999)


def test_init_state_ema_is_a_copy_and_step_updates_ema():
  config = _config(training__learning_rate=3e-3, training__warmup_steps=0)  # as the next test
  mesh = parallel.make_mesh(1)
  graphdef, _, optimizer, diffusion = training.build(config)
  state = training.init_state(config, optimizer, jax.random.key(0))
  chex.assert_trees_all_equal(state.params, state.ema_params)
  leaf, ema_leaf = jax.tree.leaves(state.params)[0], jax.tree.leaves(state.ema_params)[0]
  assert leaf.unsafe_buffer_pointer() != ema_leaf.unsafe_buffer_pointer()  # donation-safe
  # The sharded, donating step of the next test (the same program: one compile serves both).
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  start_ema = jax.device_get(state.ema_params)  # the step donates `state`
  step = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  batch = parallel.global_batch(mesh, _batches(1)[0])
  new, metrics = step(state, batch, jax.random.key(1))
  assert int(new.step) == 1
  # step 0: decay = min(0.9999, 1/10) = 0.1
  expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, start_ema, new.params)
  chex.assert_trees_all_close(new.ema_params, expected, rtol=1e-6, atol=1e-7)
  chex.assert_tree_all_finite(metrics)
  assert set(metrics) >= {"loss", "grad_norm", "lr", "param_norm"}


def test_train_step_traces_once_and_learns():
  config = _config(training__learning_rate=3e-3, training__warmup_steps=0)
  batch = _batches(1)[0]
  _, losses = _run_steps(config, parallel.make_mesh(1), [batch] * 30)
  # Same batch, different t and noise each step: compare averages, not single steps.
  assert losses[-10:].mean() < losses[:10].mean()


@pytest.mark.slow  # three train-step compiles (~1 min); the fast suite trains on 8 devices
# throughout (conftest), so the sharded step itself is covered there
def test_same_losses_on_1_and_8_devices_replicated_and_fsdp():
  assert jax.device_count() == 8
  config = _config(model__dropout=0.1)  # dropout masks must not depend on the device count
  batches = _batches(3)
  state1, losses1 = _run_steps(config, parallel.make_mesh(1), batches)
  state8, losses8 = _run_steps(config, parallel.make_mesh(8), batches)
  state8f, losses8f = _run_steps(config, parallel.make_mesh(8), batches, fsdp=True)
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  np.testing.assert_allclose(losses8f, losses1, rtol=2e-5)
  chex.assert_trees_all_close(state8.params, state1.params, atol=2e-5)
  chex.assert_trees_all_close(state8f.ema_params, state1.ema_params, atol=2e-5)


def test_fsdp_shards_large_arrays_and_keeps_small_ones_whole():
  mesh = parallel.make_mesh(8)
  config = _config()
  config.model.ch = 64
  _, _, optimizer, _ = training.build(config)
  abstract = training.abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract, fsdp=True)
  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
  specs = [(x.shape, s.spec) for x, s in leaves]
  sharded = [(shape, spec) for shape, spec in specs if parallel.DATA_AXIS in spec]
  assert sharded, "no array was sharded"
  for shape, spec in sharded:
    dim = list(spec).index(parallel.DATA_AXIS)
    assert shape[dim] % 8 == 0
  assert all(spec == jax.sharding.PartitionSpec() for shape, spec in specs if len(shape) <= 1)


@pytest.mark.slow  # two more train-step compiles, ~16 s
def test_gradient_accumulation_matches_the_full_batch():
  config = _config()
  batches = _batches(2)
  state1, losses1 = _run_steps(config, parallel.make_mesh(1), batches)
  config.training.grad_accum_steps = 4
  state4, losses4 = _run_steps(config, parallel.make_mesh(1), batches)
  np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
  chex.assert_trees_all_close(state4.params, state1.params, atol=1e-5)


@pytest.mark.slow  # a train step of its own (~35 s); the sampler is tested in test_losses.py
def test_importance_sampled_t_trains_and_fills_the_history():
  config = _config(diffusion__t_sampler="importance", diffusion__loss_type="kl")
  state, losses = _run_steps(config, parallel.make_mesh(1), _batches(2))
  assert np.isfinite(losses).all()
  assert int(state.loss_history.counts.sum()) == 16


def test_bad_batch_size_is_a_clear_error():
  mesh = parallel.make_mesh(8)
  for bad in (12, 0):
    with pytest.raises(ValueError, match=rf"batch_size={bad} is not a positive multiple of the 8"):
      parallel.check_batch_size(bad, mesh)
  assert parallel.check_batch_size(16, mesh) == 16


# ----------------------------------------------------------------------------- the loop


def _losses(workdir):
  return [
    (r["step"], r["loss"]) for r in training.MetricsLog(workdir / "metrics.jsonl", True).read()
  ]


@pytest.mark.slow  # three short training runs, ~50 s
def test_resumed_run_logs_the_same_losses(image_dir, tmp_path):
  full = _config(image_dir, training__num_steps=6, training__checkpoint_every=2)
  training.train(full, tmp_path / "a")
  # Interrupted after step 3 (a checkpoint at 2, metrics logged up to 3), then resumed.
  cut = _config(image_dir, training__num_steps=3, training__checkpoint_every=2)
  training.train(cut, tmp_path / "b")
  ckpt = checkpoints.Checkpointer(tmp_path / "b" / "checkpoints")
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()
  # Drop the final checkpoint, as if killed between step 3 and its save.
  import shutil

  shutil.rmtree(tmp_path / "b" / "checkpoints" / "3")
  training.train(full, tmp_path / "b")
  a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
  assert [s for s, _ in b] == [s for s, _ in a]  # step 3 was re-logged once, not twice
  np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-6)
  cfg = json.loads((tmp_path / "a" / "config.json").read_text())
  assert cfg["training"]["num_steps"] == 6
  assert (tmp_path / "a" / "loss.png").exists()


def _inject(monkeypatch, at_batch, action):
  """Wraps the data iterator: ``action(batch)`` runs when batch number ``at_batch`` is drawn."""
  real = data.make_iterator

  def make_iterator(*args, **kwargs):
    it = real(*args, **kwargs)

    class Wrapped:
      count = 0

      def __next__(self):
        batch = next(it)
        Wrapped.count += 1
        if Wrapped.count == at_batch:
          batch = action(batch)
        return batch

      def get_state(self):
        return it.get_state()

      def set_state(self, s):
        it.set_state(s)

    return Wrapped()

  monkeypatch.setattr(data, "make_iterator", make_iterator)


def _loop_config(image_dir, **overrides):
  # The model and step of the session's `tiny_run` (class-conditional, EMA decay 0.5): the
  # compiled train step is the same program, so the persistent compile cache serves it.
  return tiny_config(image_dir, model__class_conditional=True, training__ema_decay=0.5, **overrides)


@pytest.mark.slow  # a whole run poisoned mid-way
def test_nan_stops_at_once_and_keeps_the_last_good_checkpoint(image_dir, tmp_path, monkeypatch):
  def poison(batch):
    batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  _inject(monkeypatch, 3, poison)
  config = _loop_config(image_dir, training__num_steps=8, training__checkpoint_every=1)
  with pytest.raises(
    training.NonFiniteLossError, match=r"non-finite loss=nan.* at step 3; .*step 2"
  ):
    training.train(config, tmp_path)
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 2
  ckpt.close()


@pytest.mark.slow  # a whole run stopped by a signal
def test_sigterm_saves_a_checkpoint_and_stops(image_dir, tmp_path, monkeypatch):
  def send_sigterm(batch):
    os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _inject(monkeypatch, 2, send_sigterm)
  config = _loop_config(image_dir, training__num_steps=50, training__checkpoint_every=100)
  with pytest.raises(training.TrainingStopped, match=r"stopped by SIGTERM after step 2") as e:
    training.train(config, tmp_path)
  assert e.value.signum == signal.SIGTERM and e.value.step == 2
  assert training.read_history(tmp_path)[-1] == {
    **training.read_history(tmp_path)[-1],
    "event": "stopped",
    "step": 2,
    "signal": "SIGTERM",
  }
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
