"""Where a run's metrics go: ``metrics.jsonl`` (always), TensorBoard (optional), ``loss.png``.

Only process 0 writes; the others hold a disabled writer, so the loop needs no ``if``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """``WORKDIR/config.json``: what ``jaxdiff.load_run`` rebuilds the model from."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step, appended and flushed.

  With ``tensorboard_dir``, the same scalars also go to TensorBoard (flax's
  writer, which needs TensorFlow: ``pip install 'jaxdiff[tensorboard]'``).
  """

  def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
    self.path, self.enabled = path, enabled
    self._tb = None
    if enabled and tensorboard_dir is not None:
      try:
        from flax.metrics import tensorboard
      except ImportError as e:
        raise ImportError(
          f"training.tensorboard=True needs TensorFlow ({e}); install it with"
          " pip install 'jaxdiff[tensorboard]', or set --config.training.tensorboard=False"
        ) from None
      self._tb = tensorboard.SummaryWriter(str(tensorboard_dir))

  def truncate_after(self, step: int) -> None:
    """Drops entries past ``step``: a resumed run re-logs them from the checkpoint on."""
    if not (self.enabled and self.path.exists()):
      return
    lines = self.path.read_text().splitlines()
    keep = [line for line in lines if line and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in keep))

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in record.items():
        if name != "step":
          self._tb.scalar(name, value, record["step"])
      self._tb.flush()

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
  """The loss curve (and its running mean) to a PNG.

  Drawn on a bare ``matplotlib.figure.Figure``: no pyplot, so no backend is switched.
  """
  from matplotlib.figure import Figure

  records = [r for r in records if "loss" in r]
  if not records:
    return
  steps = np.array([r["step"] for r in records])
  loss = np.array([r["loss"] for r in records])
  fig = Figure(figsize=(6, 3.5), dpi=120)
  ax = fig.subplots()
  ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
  if len(loss) >= 10:
    w = max(len(loss) // 20, 5)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1 :], smooth, lw=1.5, label=f"running mean ({w})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
