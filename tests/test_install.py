"""jaxdiff as a user gets it: installed (not editable) into a fresh venv, run from an empty folder
with nothing from this checkout but a config file copied there."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a venv and a pip install (wheels come from pip's cache after the first)
def test_installed_jaxdiff_trains_then_samples_outside_the_checkout(tmp_path, image_dir):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)]
  subprocess.run(pip, check=True, timeout=1800, env={**os.environ, "PIP_NO_INPUT": "1"})
  work = tmp_path / "empty"
  work.mkdir()
  shutil.copy(ROOT / "configs" / "tiny.py", work / "my_config.py")
  env = {
    "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
    "JAX_PLATFORMS": "cpu",
  }  # fmt: skip

  def jaxdiff(*args):
    proc = subprocess.run(
      ["jaxdiff", *args], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc

  where = subprocess.run(
    ["python", "-c", "import jaxdiff; print(jaxdiff.__file__)"], cwd=work, env=env,
    capture_output=True, text=True, check=True,
  ).stdout  # fmt: skip
  assert where.startswith(str(venv)), where  # the installed copy, not the checkout
  jaxdiff(
    "train", "--config", "my_config.py", "--workdir", "run", "--config.data.name=image_folder",
    f"--config.data.image_folder={image_dir}", "--config.training.num_steps=2",
  )  # fmt: skip
  proc = jaxdiff("sample", "--workdir", "run", "--out", "grid", "--steps", "2")
  images = np.load(work / "grid" / "samples.npz")["images"]
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8  # tiny.py: 4 samples
  assert "wrote samples.png, samples.npz (4 samples, step 2)" in proc.stdout
  made = sorted(p.name for p in work.iterdir() if p.name != "__pycache__")  # (Python's own)
  assert made == ["grid", "my_config.py", "run"]
