"""The fault suite: bad input and broken files, injected into a good run, as a careful user would.

Each case asserts the outcome a user sees (the message, the exit status) and that every file of
the good run is byte-identical afterwards (``files_of``). The command-line cases run
``python -m jaxdiff`` in subprocesses; they fail before anything compiles, so they are cheap.
Killing a run at random points while it saves, and stopping a two-process run, are in the slow
suite (here and in test_multiprocess.py).
"""

import concurrent.futures
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxdiff
from jaxdiff import training
from jaxdiff.io import checkpoints
from tests.conftest import ROOT, cli_env, files_of, jaxdiff_cli, tiny_config


def _good_config(image_dir, **overrides):
  # The model and step of the session's `tiny_run` (class-conditional, EMA decay 0.5): the
  # compiled train step is the same program, so the persistent compile cache serves it.
  settings = {
    "model__class_conditional": True,
    "training__ema_decay": 0.5,
    "training__num_steps": 2,
    "training__checkpoint_every": 1,
    "training__keep_checkpoints": 2,
  }
  return tiny_config(image_dir, **{**settings, **overrides})


@pytest.fixture(scope="module")
def good_run(image_dir, tmp_path_factory):
  """A finished two-step run with checkpoints 1 and 2, trained in this process."""
  workdir = tmp_path_factory.mktemp("good_run")
  training.train(_good_config(image_dir), workdir)
  return workdir


def _copy(run: Path, tmp_path: Path) -> Path:
  target = tmp_path / "run"
  shutil.copytree(run, target)
  return target


def _truncate_newest_checkpoint(workdir: Path, step: int = 2) -> None:
  """Cuts the biggest array file of checkpoint ``step`` in half, as a full disk or a copy cut
  short would: the checkpoint still looks finished to orbax."""
  chunks = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
  biggest = max(chunks, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


# --------------------------------------------------------------------- command-line faults


def _train_args(workdir, image_dir, *extra):
  return (
    "train", "--config", str(ROOT / "configs" / "tiny.py"), f"--workdir={workdir}",
    "--config.data.name=image_folder", f"--config.data.image_folder={image_dir}",
    "--config.data.num_classes=2", "--config.model.class_conditional=True",
    "--config.training.ema_decay=0.5", "--config.training.num_steps=2",
    "--config.training.checkpoint_every=1", "--config.training.keep_checkpoints=2", *extra,
  )  # fmt: skip


# case: (extra train flags, what the one error must say). Each runs on a copy-free good run:
# a refusal must leave it byte-identical.
REFUSED = {
  "unknown schedule": (
    ["--config.diffusion.schedule=cosinee"],
    "diffusion.schedule='cosinee'",
  ),
  "wider model": (
    ["--config.model.ch=64"],
    "model.ch: 32 -> 64",
  ),
  "other T": (
    ["--config.diffusion.num_timesteps=10"],
    "diffusion.num_timesteps: 20 -> 10",
  ),
  "keep no checkpoint": (
    ["--config.training.keep_checkpoints=0"],
    "training.keep_checkpoints=0",
  ),
  "negative learning rate": (
    ["--config.training.learning_rate=-1"],
    "training.learning_rate=-1.0",
  ),
  "unknown sampler": (
    ["--config.sampling.sampler=foo", "--config.training.sample_every=0"],
    "sampling.sampler='foo'",
  ),
  "zero intervals": (
    ["--config.training.checkpoint_every=0", "--config.training.log_every=0"],
    "training.log_every=0",
  ),
  "key typo": (
    ["--config.training.batchsize=8"],
    "batch_size",
  ),
  "unknown dataset": (
    ["--config.data.name=not_a_dataset"],
    "image_folder",
  ),
}


def test_refused_runs_leave_a_good_run_untouched(good_run, image_dir):
  before = files_of(good_run)

  def run(case):
    return jaxdiff_cli(*_train_args(good_run, image_dir, *REFUSED[case][0]))

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = dict(zip(REFUSED, pool.map(run, REFUSED), strict=True))
  for case, proc in procs.items():
    assert proc.returncode == 1, (case, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
    assert REFUSED[case][1] in proc.stderr, (case, proc.stderr[-3000:])
    assert len(proc.stderr) < 2000, (case, proc.stderr)  # one message, not a log
  assert files_of(good_run) == before
  # Every bad field at once, not the first one found.
  assert "training.checkpoint_every=0" in procs["zero intervals"].stderr
  assert "did you mean training.batch_size" in procs["key typo"].stderr
  assert "Nothing in" in procs["wider model"].stderr


def test_a_typo_in_a_config_key_is_one_line(good_run, image_dir):
  proc = jaxdiff_cli(*_train_args(good_run, image_dir, "--config.training.batchsize=8"))
  assert proc.returncode == 1
  assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line


def test_a_broken_image_is_named_before_training(image_dir, tmp_path):
  images = tmp_path / "images"
  shutil.copytree(image_dir, images)
  broken = sorted((images / "class1").iterdir())[3]
  broken.write_bytes(broken.read_bytes()[:40])  # cut short, as an interrupted copy leaves it
  workdir = tmp_path / "run"
  proc = jaxdiff_cli(*_train_args(workdir, images))
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"bad image file {broken}" in proc.stderr and "skip_bad_images=True" in proc.stderr
  assert not workdir.exists()  # refused before anything was written


@pytest.mark.slow  # a whole run resumed or sampled again
def test_a_changed_safe_field_resumes_and_is_recorded(good_run, image_dir, tmp_path):
  run = _copy(good_run, tmp_path)
  config = _good_config(image_dir, training__num_steps=3, sampling__num_steps=4)
  training.train(config, run)
  history = training.read_history(run)
  assert [e["event"] for e in history] == ["start", "finished", "resume", "finished"]
  assert history[2]["step"] == 2
  assert history[2]["changes"] == {"sampling.num_steps": [5, 4], "training.num_steps": [2, 3]}
  assert json.loads((run / "config.json").read_text())["training"]["num_steps"] == 3
  stored = checkpoints.Checkpointer(run / "checkpoints", read_only=True)
  assert stored.read_config(3)["training"]["num_steps"] == 3
  assert stored.read_config(2)["training"]["num_steps"] == 2
  stored.close()


def test_a_finished_run_rerun_does_nothing(good_run, image_dir):
  before = files_of(good_run)
  assert training.train(_good_config(image_dir), good_run) == {}
  assert files_of(good_run) == before


def test_an_output_that_cannot_be_written_fails_before_the_work(good_run, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("mine")
  before = files_of(good_run)
  proc = jaxdiff_cli("sample", f"--workdir={good_run}", f"--out={blocker / 'grid'}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"is inside {blocker}, which is a file" in proc.stderr
  proc = jaxdiff_cli("evaluate", f"--workdir={good_run}", "--metric=bpd", f"--out={blocker}")
  assert proc.returncode == 1 and "is a file" in proc.stderr
  assert files_of(good_run) == before and blocker.read_text() == "mine"


def test_train_refuses_a_workdir_inside_a_file(image_dir, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("mine")
  with pytest.raises(NotADirectoryError, match=r"--workdir=.* is inside .*, which is a file"):
    training.train(_good_config(image_dir), blocker / "run")


# --------------------------------------------------------------------- broken checkpoints


@pytest.mark.slow  # a whole run resumed or sampled again
def test_a_truncated_newest_checkpoint_falls_back_for_reading(good_run, tmp_path):
  run = _copy(good_run, tmp_path)
  _truncate_newest_checkpoint(run)
  before = files_of(run)
  with pytest.warns(checkpoints.CheckpointWarning, match=r"checkpoint 2 .* using checkpoint 1"):
    loaded = jaxdiff.load_run(run)
  assert loaded.step == 1
  with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint 2 in .* cannot be restored"):
    jaxdiff.load_run(run, 2)  # asked for by name: no substitute
  assert files_of(run) == before  # reading changes nothing, not even the bad checkpoint


@pytest.mark.slow  # a whole run resumed or sampled again
def test_sample_cli_warns_and_uses_the_previous_checkpoint(good_run, tmp_path):
  run = _copy(good_run, tmp_path)
  _truncate_newest_checkpoint(run)
  proc = jaxdiff_cli(
    "sample", f"--workdir={run}", f"--out={tmp_path / 'out'}", "--num_samples=2", "--steps=1"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoint 2" in warnings[0] and "checkpoint 1" in warnings[0]
  assert "step 1" in proc.stdout
  proc = jaxdiff_cli(
    "sample", f"--workdir={run}", f"--out={tmp_path / 'o2'}", "--checkpoint_step=2"
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "cannot be restored" in proc.stderr and len(proc.stderr) < 1000


def test_training_resumes_from_the_last_good_checkpoint(good_run, image_dir, tmp_path):
  run = _copy(good_run, tmp_path)
  _truncate_newest_checkpoint(run)
  with pytest.warns(checkpoints.CheckpointWarning, match=r"checkpoint 2 .* using checkpoint 1"):
    training.train(_good_config(image_dir), run)
  assert (run / "checkpoints" / "2.unreadable").is_dir()  # set aside, not deleted
  # Step 2 trained again from checkpoint 1 is the step 2 of the good run, bit for bit.
  again, good = jaxdiff.load_run(run), jaxdiff.load_run(good_run)
  assert again.step == 2
  for a, b in zip(*map(lambda r: jax_leaves(r.raw_params), (again, good)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _losses(run) == _losses(good_run)  # step 2 logged once, as in the good run
  assert training.read_history(run)[-2]["set_aside"] == {"unreadable": [2], "superseded": []}


@pytest.mark.slow  # a whole run; the fast suite resumes in the test above
def test_training_resumes_from_a_chosen_step(good_run, image_dir, tmp_path):
  run = _copy(good_run, tmp_path)
  training.train(_good_config(image_dir), run, checkpoint_step=1)
  assert (run / "checkpoints" / "2.superseded").is_dir()
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "2.superseded"]
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 .* available: \[1, 2\]"):
    training.train(_good_config(image_dir, training__num_steps=9), run, checkpoint_step=7)


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in training.MetricsLog(workdir / "metrics.jsonl").read()]


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------- kills and signals


def _train_process(workdir, image_dir, num_steps):
  args = _train_args(workdir, image_dir, f"--config.training.num_steps={num_steps}")
  return subprocess.Popen(
    [sys.executable, "-m", "jaxdiff", *args],
    env=cli_env(checkout=True),  # the later processes load the train step the first compiled
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _logged_steps(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _wait_for_steps(proc, workdir, n, timeout=300):
  deadline = time.time() + timeout
  while _logged_steps(workdir) < n:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "training did not get going"
    time.sleep(0.05)


@pytest.mark.slow  # four training processes, each compiling the train step (~2 min)
def test_killed_at_random_points_while_saving_resumes_exactly(image_dir, tmp_path):
  steps = 12
  reference = tmp_path / "reference"
  proc = _train_process(reference, image_dir, steps)
  assert proc.wait(timeout=600) == 0, proc.communicate()[1][-3000:]
  want = _losses(reference)

  rng = random.Random(0)
  workdir = tmp_path / "killed"
  for at_least in (3, 7):  # a checkpoint every step: a random moment is most likely in a save
    proc = _train_process(workdir, image_dir, steps)
    _wait_for_steps(proc, workdir, at_least)
    time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  proc = _train_process(workdir, image_dir, steps)
  assert proc.wait(timeout=600) == 0, proc.communicate()[1][-3000:]
  assert _losses(workdir) == want


@pytest.mark.slow  # a training process of its own (~40 s)
def test_sigterm_stops_with_a_saved_checkpoint_and_a_status_that_says_so(image_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = _train_process(workdir, image_dir, 10_000)
  _wait_for_steps(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  stopped = training.read_history(workdir)[-1]
  assert stopped["event"] == "stopped" and stopped["signal"] == "SIGTERM"
  assert f"stopped by SIGTERM after step {stopped['step']}" in err
  assert (workdir / "checkpoints" / str(stopped["step"])).is_dir()
