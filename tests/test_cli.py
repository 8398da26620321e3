"""The ``jaxdiff`` command line: subcommands, the run's config with overrides, usage errors, and
config files that load from any folder."""

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxdiff
from jaxdiff import cli, training
from jaxdiff import config as config_lib
from jaxdiff.run import read_config
from tests.conftest import files_of as _files
from tests.conftest import jaxdiff_cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the command


def test_jaxdiff_without_a_command_lists_them(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["jaxdiff"])
  assert e.value.code == 1
  usage = capsys.readouterr().out
  for name in ("train", "sample", "evaluate", "prepare", "train-classifier", "convert-inception"):
    assert f"\n  {name} " in usage
  with pytest.raises(SystemExit) as e:
    cli.main(["jaxdiff", "smaple"])
  assert "unknown command 'smaple'; allowed: train, sample, evaluate" in str(e.value.code)


def test_console_script_is_installed_and_every_command_has_help():
  script = Path(sys.executable).with_name("jaxdiff")
  assert script.exists(), "pip install -e . installs the jaxdiff console script"
  proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "train-classifier" in proc.stdout

  def help_of(name):
    return subprocess.run([script, name, "--help"], capture_output=True, text=True, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    procs = dict(zip(cli.COMMANDS, pool.map(help_of, cli.COMMANDS), strict=True))
  for name, proc in procs.items():
    assert proc.returncode == 0, (name, proc.stderr[-1000:])
    assert "--" in proc.stdout and "Traceback" not in proc.stderr
  # Sampler steps have one name, and --out is a directory, in every command that has them.
  assert "--steps: Sampler steps" in procs["sample"].stdout
  assert "--steps: fd, fid: sampler steps" in procs["evaluate"].stdout
  assert "--train_steps" in procs["train-classifier"].stdout
  for name in ("sample", "evaluate", "train-classifier", "convert-inception"):
    assert "--out: Output directory" in procs[name].stdout, name


def test_sample_reads_the_runs_config_and_its_overrides(tiny_run, tmp_path):
  out = tmp_path / "grid"
  proc = jaxdiff_cli(
    "sample", f"--workdir={tiny_run}", f"--out={out}", "--config.sampling.num_steps=3", "--seed=1"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = jaxdiff.load_run(tiny_run)
  n = run.config.sampling.num_samples  # not a flag default: the run's own config
  saved = np.load(out / "samples.npz")["images"]
  assert saved.shape == (n, 8, 8, 1)
  np.testing.assert_array_equal(saved, run.sample(n, steps=3, seed=1))


BAD_COMMAND_LINES = {
  "range": (["--steps=0", "--config.sampling.eta=-1"], "sampling.num_steps=0: an integer in 1..20"),
  "both named": (["--steps=4", "--config.sampling.num_steps=3"], "--steps=4 and --config.sampl"),
  "typo": (["--config.sampling.num_step=3"], "did you mean sampling.num_steps?"),
  "frozen": (["--config.model.ch=8"], "--config.model.ch cannot change for a trained run"),
  "sampler": (["--sampler=ddin"], "sampling.sampler='ddin': allowed: ddpm, ddim"),
  "label": (["--class_label=5"], "class_label=5: allowed 0..1"),
  "temperature": (["--temperature=0.5"], "sampling.temperature=0.5: sampler 'ddim' is determin"),
  "two steps": (["--checkpoint_step=1", "--best"], "--checkpoint_step and --best"),
  "value": (["--steps=abc"], "flag --steps=abc: invalid literal"),
}


def test_bad_sample_command_lines_stop_before_any_work_in_one_line(tiny_run, tmp_path):
  before = _files(tiny_run)

  def run(case):
    flags, _ = BAD_COMMAND_LINES[case]
    return jaxdiff_cli("sample", f"--workdir={tiny_run}", f"--out={tmp_path / case}", *flags)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    procs = dict(zip(BAD_COMMAND_LINES, pool.map(run, BAD_COMMAND_LINES), strict=True))
  for case, proc in procs.items():
    assert proc.returncode == 1, (case, proc.stderr)
    assert "Traceback" not in proc.stderr, (case, proc.stderr)
    assert BAD_COMMAND_LINES[case][1] in proc.stderr, (case, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) <= 2, (case, proc.stderr)  # usage + the error
  assert "sampling.eta=-1.0: a number >= 0" in procs["range"].stderr  # every problem at once
  assert not list(tmp_path.iterdir()) and _files(tiny_run) == before  # nothing written


def test_sample_refuses_an_out_that_is_a_file_before_sampling(tiny_run, tmp_path):
  existing = tmp_path / "samples.png"
  existing.write_bytes(b"not mine to overwrite")
  proc = jaxdiff_cli("sample", f"--workdir={tiny_run}", f"--out={existing}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: --out={existing} is a file; it must name a folder"
  )
  inside = existing / "grid"
  proc = jaxdiff_cli("sample", f"--workdir={tiny_run}", f"--out={inside}")
  assert proc.returncode == 1
  assert f"error: --out={inside} is inside {existing}, which is a file" in proc.stderr
  assert existing.read_bytes() == b"not mine to overwrite"


def test_evaluate_fid_means_inception_features(tiny_run):
  proc = jaxdiff_cli("evaluate", f"--workdir={tiny_run}", "--metric=fid", "--features=classifier")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert "--metric fid uses Inception features, not 'classifier'" in proc.stderr
  proc = jaxdiff_cli("evaluate", f"--workdir={tiny_run}", "--metric=fid")
  assert "features='inception' needs --features_path" in proc.stderr.splitlines()[-1]


BAD_EVALUATE_LINES = {  # each metric checks the eval fields it reads, all at once
  "ode_bpd": (["--metric=ode_bpd", "--ode_steps=0", "--num_examples=-1"],
              ["eval.num_examples=-1: must be an int >= 0",
               "eval.ode_steps=0: must be an int >= 1"]),
  "dopri5": (["--metric=ode_bpd", "--ode_method=dopri5", "--ode_rtol=0", "--ode_max_steps=0"],
             ["--ode_rtol=0.0: a tolerance > 0", "--ode_max_steps=0: an int >= 1"]),
  "bpd": (["--metric=bpd", "--batch_size=0", "--t_chunk=0"],
          ["eval.batch_size=0: must be an int >= 1", "t_chunk=0: an integer >= 1"]),
  "fd": (["--metric=fd", "--num_samples=1", "--ode_steps=0"],  # fd does not read ode_steps
         ["eval.num_samples=1: must be an int >= 2 (a covariance needs 2)"]),
}  # fmt: skip


def test_bad_evaluate_command_lines_name_every_bad_field_and_only_those(tiny_run):
  def run(case):
    return jaxdiff_cli("evaluate", f"--workdir={tiny_run}", *BAD_EVALUATE_LINES[case][0])

  with concurrent.futures.ThreadPoolExecutor(len(BAD_EVALUATE_LINES)) as pool:
    procs = dict(zip(BAD_EVALUATE_LINES, pool.map(run, BAD_EVALUATE_LINES), strict=True))
  for case, proc in procs.items():
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (case, proc.stderr)
    error = proc.stderr.strip().splitlines()[-1]
    assert error.count("; ") == len(BAD_EVALUATE_LINES[case][1]) - 1, (case, error)
    for line in BAD_EVALUATE_LINES[case][1]:
      assert line in error, (case, error)


# -------------------------------------------------------------------- configs from anywhere


def test_every_config_file_loads_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the checkout: `configs` is not importable from here
  monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
  schema = config_lib.get_config()
  for path in sorted((ROOT / "configs").glob("*.py")):
    config = config_lib.from_file(path)
    assert set(config.keys()) == set(schema.keys()), path.name
    assert config.data.manual_dir == "", f"{path.name}: the command line passes manual_dir"
  mnist = config_lib.from_file(ROOT / "configs" / "mnist.py")
  fashion = config_lib.from_file(ROOT / "configs" / "fashion_mnist.py")
  assert mnist.data.name == "mnist" and mnist.model.ch == fashion.model.ch


def test_the_ddpm_recipe_is_the_main_job_with_another_noise_process():
  # The README's process study compares recipes that differ only in the noise process: the
  # DDPM recipe (the main job's until 2026-12-01) must keep the main job's model and training.
  main = config_lib.from_file(ROOT / "configs" / "fashion_mnist.py")
  ddpm = config_lib.from_file(ROOT / "configs" / "fashion_mnist_ddpm.py")
  changed = training.resume.changes(training.resume.as_json(main), ddpm)
  assert set(changed) == {
    "diffusion.process", "diffusion.t_sampler", "sampling.sampler", "sampling.num_steps"
  }  # fmt: skip
  assert (main.diffusion.process, ddpm.diffusion.process) == ("flow", "ddpm")


def test_a_users_config_file_builds_on_the_library_schema(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.py").write_text(
    "from jaxdiff.config import get_config as defaults\n\n\n"
    "def get_config():\n  config = defaults()\n  config.training.num_steps = 7\n  return config\n"
  )
  config = config_lib.from_file("mine.py")
  assert config.training.num_steps == 7 and config.is_locked
  with pytest.raises(AttributeError, match="batch_size"):
    config.training.batchsize = 8
  with pytest.raises(FileNotFoundError, match="no config file at"):
    config_lib.from_file("missing.py")


def test_a_run_from_an_older_version_reads_with_the_new_defaults(tiny_run, tmp_path):
  old = json.loads((tiny_run / "config.json").read_text())
  del old["eval"]["num_samples"], old["training"]["wandb_project"]  # fields added later
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = read_config(tmp_path)
  assert config.eval.num_samples == config_lib.get_config().eval.num_samples
  assert config.training.wandb_project == "" and config.model.class_conditional  # its own kept


def test_train_refuses_a_bad_sampling_section_before_writing_anything(image_dir, tmp_path):
  from jaxdiff import training
  from tests.conftest import tiny_config

  config = tiny_config(image_dir, sampling__sampler="foo", sampling__num_steps=0)
  with pytest.raises(ValueError, match=r"(?s)sampling.sampler='foo'.*sampling.num_steps=0"):
    training.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
