"""load_run and Run.sample (the notebook API), sample.py / train.py, and evaluation inside
training with the best checkpoint kept."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxdiff
from jaxdiff import training
from jaxdiff.io import checkpoints
from jaxdiff.sampling import sample_from_config
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_run):
  return jaxdiff.load_run(tiny_run)


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_trainer_writes_sample_grids(tiny_run):
  grid = Image.open(tiny_run / "samples" / "step_0000002.png")
  assert grid.size[0] > 8  # a grid of 8x8 samples


def test_load_run_holds_both_parameter_sets_and_writes_nothing(tiny_run):
  before = _files(tiny_run)
  run = jaxdiff.load_run(tiny_run)
  assert run.step == 2 and run.image_shape == (8, 8, 1)
  assert run.config.training.num_steps == 2
  x, t = np.zeros((2, 8, 8, 1), np.float32), np.array([3, 7])
  call = jax.jit(lambda f: f(x, t))  # one compile for both: the parameters are arguments
  ema, raw = call(run.model_fn("ema")), call(run.model_fn("raw"))
  assert ema.shape == (2, 8, 8, 1)
  assert not np.allclose(ema, raw)  # EMA decay 0.5: they differ after 2 steps
  with pytest.raises(ValueError, match=r"params='best'; allowed: ema, raw"):
    run.model_fn("best")
  assert _files(tiny_run) == before


def test_same_seed_same_images(run):
  a = run.sample(8, steps=3, seed=1)
  b = run.sample(8, steps=3, seed=1)
  c = run.sample(8, steps=3, seed=2)
  assert a.dtype == np.uint8 and a.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  pixels, trajectory = run.sample(8, steps=3, seed=1, return_trajectory=True)
  np.testing.assert_array_equal(pixels, a)
  assert trajectory.shape == (4, 8, 8, 8, 1) and trajectory.dtype == np.uint8  # x_T + 3 steps
  np.testing.assert_array_equal(trajectory[-1], a)
  raw = run.sample(8, steps=3, seed=1, params="raw")
  assert not np.array_equal(raw, a)


def test_sample_fn_draws_what_sample_draws_as_floats(run):
  # what evaluation.sample_quality scores: run.sample's images before the uint8 rounding
  sample_fn = run.sample_fn(steps=3)
  x = np.asarray(sample_fn(jax.random.key(1), 8))
  assert x.dtype == np.float32 and x.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(jaxdiff.io.images.to_uint8(x), run.sample(8, steps=3, seed=1))
  other = run.sample_fn("raw", sampler="ddim", steps=3, eta=0.0)(jax.random.key(1), 8)
  expected = sample_from_config(
    run.config, run.diffusion, run.model_fn("raw"), jax.random.key(1), 8, mesh=run.mesh,
    sampler="ddim", num_steps=3, eta=0.0,
  )  # fmt: skip
  np.testing.assert_array_equal(other, expected)
  assert not np.array_equal(other, x)


@pytest.mark.slow  # compiles all five samplers; each is tested alone in test_sampling.py
def test_every_sampler_runs_from_a_checkpoint(run):
  for sampler in ("ddpm", "ddim", "dpm++2m", "euler_maruyama", "pc"):
    assert run.sample(4, sampler=sampler, steps=3).shape == (4, 8, 8, 1), sampler


def test_options_the_model_cannot_honour_are_clear_errors(tiny_run, run):
  unconditional = tiny_config(tiny_run)  # the same model without labels: no run needed
  model_fn = run.model_fn()
  for option, message in (
    ({"guidance_scale": 3.0}, r"guidance_scale=3.0 needs a class-conditional model"),
    ({"class_label": 1}, r"class_label=1 needs a class-conditional"),
  ):
    with pytest.raises(ValueError, match=message):
      sample_from_config(unconditional, run.diffusion, model_fn, None, 4, mesh=None, **option)
  with pytest.raises(ValueError, match=r"class_label=5 must be in 0..1"):
    run.sample(4, class_label=5)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 999 .* available: \[(1, )?2\]"):
    jaxdiff.load_run(tiny_run, 999)


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.json not found"):
    jaxdiff.load_run(tmp_path / "nothing")
  training.writers.write_config(tiny_config(tmp_path), tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*train first"):
    jaxdiff.load_run(tmp_path / "empty")
  assert not (tmp_path / "empty" / "checkpoints").exists()  # reading creates nothing


def test_class_conditional_guided_sampling(run):
  # The guidance formula is checked in test_sampling.py; here the run's labels reach it.
  guided = run.sample(4, steps=3, seed=1, guidance_scale=2.0, class_label=1)
  assert guided.shape == (4, 8, 8, 1) and guided.dtype == np.uint8


def _cli(*args):
  env = {"PATH": "/usr/bin:/bin", "JAXDIFF_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)  # fmt: skip


def test_sample_cli_writes_grid_arrays_and_gif(tiny_run, run, tmp_path):
  out = _cli("sample.py", "--workdir", str(tiny_run), "--out", str(tmp_path), "--num_samples",
             "8", "--steps", "3", "--seed", "1", "--gif")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  saved = np.load(tmp_path / "samples.npz")["images"]
  assert saved.dtype == np.uint8 and saved.shape == (8, 8, 8, 1)
  # One CPU device in the subprocess, 8 here: the same samples all the same.
  np.testing.assert_array_equal(saved, run.sample(8, steps=3, seed=1))
  np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["labels"], np.arange(8) % 2)
  assert Image.open(tmp_path / "samples.png").size[0] > 8
  assert Image.open(tmp_path / "trajectory.gif").n_frames == 4  # x_T and three steps


def test_sample_cli_reports_a_missing_run_without_a_traceback(tmp_path):
  out = _cli("sample.py", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
  assert out.returncode != 0
  assert "config.json not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # compiles the train step in a fresh process; train.py also runs in the
# two-process test
def test_train_cli_dry_run():
  out = _cli("train.py", "--config", "configs/tiny.py", "--dry_run")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "parameters: 701,345" in out.stdout
  for needle in ("input:", "output:", "per device", "memory per step"):
    assert needle in out.stdout


def test_evaluation_inside_training_keeps_the_best_checkpoint(tiny_run):
  lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
  evals = {r["step"]: r for r in map(json.loads, lines) if "eval_bpd" in r}
  assert sorted(evals) == [1, 2]
  for r in evals.values():
    assert np.isfinite(r["eval_bpd"]) and r["eval_bpd_stderr"] > 0
    assert r["eval_fd"] > 0 and 1 <= r["eval_is"] <= 2  # two classes
  assert list((tiny_run / "cache").glob("*.npz"))  # the reference statistics, cached
  best = min(evals, key=lambda s: evals[s]["eval_bpd"])
  ckpt = checkpoints.Checkpointer(tiny_run / "checkpoints", best_metric="eval_bpd")
  kept = ckpt.all_steps()
  ckpt.close()
  assert kept == sorted({best, 2})  # the newest (keep_checkpoints=1), and the best beside it
  run = jaxdiff.load_run(tiny_run, best=True)
  assert run.step == best
  # The loop evaluated the parameters it held; evaluating the checkpoint gives the same bound.
  config = run.config
  bpd = jaxdiff.evaluation.bits_per_dim(
    run.diffusion,
    run.model_fn(),
    jaxdiff.data.read_examples(config.data, config.eval.split, 8),
    seed=config.seed,
    batch_size=8,
    mesh=run.mesh,
  )
  assert bpd["bpd"] == pytest.approx(evals[best]["eval_bpd"], rel=1e-5)


def test_bad_eval_settings_are_clear_errors(image_dir, tmp_path):
  config = tiny_config(image_dir, eval__every=2)
  with pytest.raises(ValueError, match=r"nothing to evaluate"):
    training.train(config, tmp_path)
  config = tiny_config(image_dir, eval__every=2, eval__bpd_examples=4, eval__best_metric="fd")
  with pytest.raises(ValueError, match=r"best_metric='fd' needs eval.every > 0 and eval.fd_samp"):
    training.train(config, tmp_path)
