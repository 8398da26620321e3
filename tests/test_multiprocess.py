"""Two processes on loopback train in agreement with one (jax.distributed, gloo on CPU)."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  # The tests' compilation cache is shared: under jax.distributed only process 0 writes to it,
  # and a later test's processes load what an earlier one compiled.
  env = cli_env(checkout=True)
  env.update(extra)
  return env


def _train_cmd(workdir, image_dir):
  return [
    sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
    "--workdir", str(workdir),
    "--config.data.name=image_folder", f"--config.data.image_folder={image_dir}",
    "--config.training.num_steps=3", "--config.training.checkpoint_every=3",
    "--config.model.dropout=0.1",
  ]  # fmt: skip


def _images(folder):
  """32 random 8x8 grey PNGs in one folder: one class."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(32):
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
  return folder


def _losses(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return np.array([json.loads(line)["loss"] for line in lines])


@pytest.mark.slow  # three JAX processes compiling the same step: minutes on 2 cores
def test_two_processes_match_one(tmp_path):
  image_dir = _images(tmp_path / "images")

  single = tmp_path / "single"
  subprocess.run(
    _train_cmd(single, image_dir), env=_env(JAXDIFF_CPU_DEVICES="2"), check=True,
    capture_output=True, timeout=600,
  )  # fmt: skip

  multi = tmp_path / "multi"
  address = f"127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      _train_cmd(multi, image_dir),
      env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]

  assert (multi / "metrics.jsonl").exists()
  # gloo sums the gradients in another order than one process does, and Adam's
  # first steps magnify rounding in near-zero gradients: agreement to 1e-4.
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
  assert len(_losses(multi)) == 3
  # Both processes took part in the checkpoint; only one wrote the metrics.
  assert (multi / "checkpoints" / "3").is_dir()


@pytest.mark.slow  # two JAX processes compiling the train step: about a minute on 2 cores
def test_a_signal_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  image_dir = _images(tmp_path / "images")
  workdir = tmp_path / "run"
  address = f"127.0.0.1:{_free_port()}"
  cmd = _train_cmd(workdir, image_dir) + [
    "--config.training.num_steps=100000", "--config.training.checkpoint_every=100000",
  ]  # fmt: skip
  procs = [
    subprocess.Popen(
      cmd,
      env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    deadline = time.time() + 600
    metrics = workdir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
      assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
      assert time.time() < deadline
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # not the coordinator, and not the one that writes
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
  steps = [int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1)) for out in outputs]
  assert steps[0] == steps[1]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(steps[0])]
  history = [json.loads(line) for line in (workdir / "history.jsonl").read_text().splitlines()]
  assert history[-1]["event"] == "stopped" and history[-1]["step"] == steps[0]
