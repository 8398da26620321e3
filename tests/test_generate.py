"""sample.py's engine: loading a run's EMA parameters and writing grids, arrays and GIFs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from jaxdiff import trainer
from jaxdiff.generate import generate

ROOT = Path(__file__).resolve().parents[1]


def _train(workdir, image_dir, conditional=False):
  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(image_dir)
  config.data.num_classes = 2
  config.model.class_conditional = conditional
  config.training.num_steps = 2
  config.training.sample_every = 2  # the trainer's own EMA sample grids
  trainer.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def run(image_dir, tmp_path_factory):
  return _train(tmp_path_factory.mktemp("run"), image_dir)


@pytest.fixture(scope="module")
def conditional_run(image_dir, tmp_path_factory):
  return _train(tmp_path_factory.mktemp("crun"), image_dir, conditional=True)


def test_trainer_writes_sample_grids(run):
  grid = Image.open(run / "samples" / "step_0000002.png")
  assert grid.size[0] > 8  # a grid of 8x8 samples


def test_same_seed_same_images_and_files(run, tmp_path):
  a = generate(run, tmp_path / "a", num_samples=8, steps=3, seed=1, gif=True, progress=False)
  b = generate(run, tmp_path / "b", num_samples=8, steps=3, seed=1, progress=False)
  c = generate(run, tmp_path / "c", num_samples=8, steps=3, seed=2, progress=False)
  np.testing.assert_array_equal(a["images"], b["images"])
  assert not np.array_equal(a["images"], c["images"])
  saved = np.load(tmp_path / "a" / "samples.npz")["images"]
  assert saved.dtype == np.uint8 and saved.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(saved, a["images"])
  assert Image.open(tmp_path / "a" / "samples.png").size[0] > 8
  gif = Image.open(tmp_path / "a" / "trajectory.gif")
  assert gif.n_frames == 4  # x_T and three steps
  assert not (tmp_path / "b" / "trajectory.gif").exists()


@pytest.mark.slow  # compiles all five samplers; each is tested alone in test_sampling.py
def test_every_sampler_runs_from_a_checkpoint(run, tmp_path):
  for sampler in ("ddpm", "ddim", "dpm++2m", "euler_maruyama", "pc"):
    out = generate(run, tmp_path / sampler, num_samples=4, sampler=sampler, steps=3,
                   progress=False)  # fmt: skip
    assert out["images"].shape == (4, 8, 8, 1), sampler


def test_options_the_model_cannot_honour_are_clear_errors(run, tmp_path):
  with pytest.raises(ValueError, match=r"guidance_scale=3.0 need a class-conditional model"):
    generate(run, tmp_path, num_samples=4, guidance_scale=3.0, progress=False)
  with pytest.raises(ValueError, match=r"class_label=1 .* need a class-conditional"):
    generate(run, tmp_path, num_samples=4, class_label=1, progress=False)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 999 .* available: \[2\]"):
    generate(run, tmp_path, num_samples=4, checkpoint_step=999, progress=False)
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_workdir_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.json not found"):
    generate(tmp_path / "nothing", tmp_path / "out", progress=False)
  trainer.write_config(tiny.get_config(), tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*train first"):
    generate(tmp_path / "empty", tmp_path / "out", progress=False)


def test_class_conditional_guided_sampling(conditional_run, tmp_path):
  out = generate(conditional_run, tmp_path, num_samples=4, steps=3, guidance_scale=2.0,
                 class_label=1, progress=False)  # fmt: skip
  np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["labels"], [1, 1, 1, 1])
  assert out["images"].shape == (4, 8, 8, 1)
  with pytest.raises(ValueError, match=r"class_label=5 must be in 0..1"):
    generate(conditional_run, tmp_path, num_samples=4, class_label=5, progress=False)


def _cli(*args):
  env = {"PATH": "/usr/bin:/bin", "JAXDIFF_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=300)  # fmt: skip


def test_sample_cli_reports_a_missing_run_without_a_traceback(tmp_path):
  out = _cli("sample.py", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
  assert out.returncode != 0
  assert "config.json not found" in out.stderr and "Traceback" not in out.stderr


def test_train_cli_dry_run():
  out = _cli("train.py", "--config", "configs/tiny.py", "--dry_run")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "parameters: 701,345" in out.stdout
  for needle in ("input:", "output:", "per device", "memory per step"):
    assert needle in out.stdout
