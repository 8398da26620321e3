"""Test setup: simulate 8 CPU devices before JAX initialises its backend."""

import os

# Must run before the first JAX computation; conftest is imported before any test module.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests compile many small, often identical programs (the same train step for
# several configs and meshes): a persistent cache turns repeats into loads.
_CACHE = os.environ.get(
  "JAXDIFF_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli_env(devices: int = 1, *, checkout: bool = False) -> dict[str, str]:
  """The environment of a ``python -m jaxdiff`` child: this one without its JAX/XLA settings,
  ``devices`` CPU devices, the tests' compilation cache shared (a child compiling what another
  already did loads it instead), and with ``checkout`` the checkout on ``PYTHONPATH``."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(
    JAX_PLATFORMS="cpu", JAXDIFF_CPU_DEVICES=str(devices),
    JAX_COMPILATION_CACHE_DIR=os.path.abspath(_CACHE),
  )  # fmt: skip
  if checkout:
    env["PYTHONPATH"] = str(ROOT)
  return env


def jaxdiff_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
  """``python -m jaxdiff ARGS`` on one CPU device, sharing the tests' compilation cache."""
  env = cli_env()
  cmd = [sys.executable, "-m", "jaxdiff", *args]
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def files_of(root: Path) -> dict[str, bytes]:
  """Every file under ``root`` and its bytes: to show that a command changed nothing."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
  """48 random 8x8 grey PNGs in two class folders: a dataset that needs no download."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(48):
    folder = root / f"class{i % 2}"
    folder.mkdir(exist_ok=True)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
  return root


def tiny_config(image_dir, **overrides):
  """configs/tiny.py on the ``image_dir`` images (two classes); ``section__key=value`` overrides."""
  from configs import tiny

  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(image_dir)
  config.data.num_classes = 2
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def tiny_config_file(path: Path, image_dir: Path, **settings) -> Path:
  """A config file at ``path``: configs/tiny.py on the ``image_dir`` images, then
  ``config.SECTION.KEY = value`` for each ``SECTION__KEY=value`` of ``settings``; for the
  commands' tests."""
  lines = [
    "from jaxdiff.config import from_file\n\n\ndef get_config():",
    f"  config = from_file({str(ROOT / 'configs' / 'tiny.py')!r})",
    "  config.data.name = 'image_folder'",
    f"  config.data.image_folder = {str(image_dir)!r}",
    *(f"  config.{k.replace('__', '.')} = {v!r}" for k, v in settings.items()),
    "  return config",
  ]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="session")
def tiny_run(image_dir, classifier_path, tmp_path_factory):
  """A tiny class-conditional run (two classes) trained 2 steps, shared by the tests that read a
  run (load_run, sample.py, the evaluate CLI) and by those of evaluation inside training.

  It checkpoints every step but keeps one, evaluates bits/dim and FD (with the random
  ``classifier_path`` network) after every step and keeps the best checkpoint by bits/dim, so
  ``checkpoints/`` holds step 2 and, if step 1 was better, step 1. A sample grid at step 2. EMA
  decay 0.5, so the EMA and raw parameters differ.
  """
  from jaxdiff import training

  workdir = tmp_path_factory.mktemp("tiny_run")
  config = tiny_config(
    image_dir,
    model__class_conditional=True,
    training__num_steps=2,
    training__sample_every=2,
    training__ema_decay=0.5,
    training__checkpoint_every=1,
    training__keep_checkpoints=1,
    eval__batch_size=8,
    eval__num_examples=8,
    eval__every=1,
    eval__bpd_examples=8,
    eval__fd_samples=8,
    eval__features_path=str(classifier_path),
    eval__cache_dir=str(workdir / "cache"),
    eval__best_metric="bpd",
  )
  training.train(config, workdir)
  return workdir


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory):
  """A randomly initialised classifier for the ``image_dir`` images, in the classifier file
  format: feature-network plumbing needs no trained network."""
  import jax
  from flax import nnx

  from jaxdiff.evaluation import classifier

  arch = {"image_size": 8, "widths": (8, 16), "convs_per_stage": 1, "feature_dim": 16}
  arch["num_groups"] = 4
  model = classifier.build_model(1, 2, jax.random.key(5), **arch)
  meta = {"dataset": "image_folder", "channels": 1, "num_classes": 2, **arch}
  return classifier.save(tmp_path_factory.mktemp("cls") / "classifier.npz", nnx.state(model), meta)
