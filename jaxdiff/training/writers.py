"""Where a run's metrics go: ``metrics.jsonl`` (always), ``loss.png`` / ``eval.png`` (redrawn at
every log, so a crash leaves current plots), TensorBoard and Weights & Biases (optional).

The loop holds one :class:`Writer` built by :func:`make` and calls ``write_scalars``,
``write_images``, ``truncate_after``, ``flush`` and ``close`` on it without any ``if``: what goes
where is decided here, once. Only process 0 writes; the others hold a disabled writer.

TensorBoard goes through tensorboardX, which writes event files without TensorFlow.

Example::

  log = writers.make(config, workdir, enabled=jax.process_index() == 0)
  log.write_scalars(100, {"loss": 0.03, "lr": 1e-4})
  log.write_images(100, {"samples": grid})        # [H, W, C] uint8
  log.close()
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from jaxdiff.io import files

Record = Mapping[str, Any]


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """``WORKDIR/config.json``: what ``jaxdiff.load_run`` rebuilds the model from."""
  workdir = files.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _write_text(path: epath.Path, text: str) -> None:
  """Replaces ``path`` with ``text`` whole: a reader sees the old file or the new one."""
  with files.atomic_path(path) as tmp:
    files.as_path(tmp).write_text(text)


def _scalars(record: Record) -> dict[str, float]:
  """The numeric fields of ``record`` as floats, without ``step`` (which is the x axis)."""
  return {
    k: float(v)
    for k, v in record.items()
    if k != "step" and isinstance(v, numbers.Real | np.number) and not isinstance(v, bool)
  }


class Writer:
  """The interface the loop writes through; this base writes nothing (process != 0).

  ``record`` maps names to values (a ``step`` key in it is ignored: ``step`` is the argument);
  ``images`` maps names to ``[H, W, C]`` uint8 grids.
  """

  def write_scalars(self, step: int, record: Record) -> None:
    del step, record

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def truncate_after(self, step: int) -> None:
    """Forgets entries past ``step``: a resumed run re-logs them from its checkpoint on."""
    del step

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter(Writer):
  """Fans every call out to several writers, in order."""

  def __init__(self, writers: Sequence[Writer]):
    self.writers = list(writers)

  def write_scalars(self, step: int, record: Record) -> None:
    for w in self.writers:
      w.write_scalars(step, record)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for w in self.writers:
      w.write_images(step, images)

  def truncate_after(self, step: int) -> None:
    for w in self.writers:
      w.truncate_after(step)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


class MetricsLog(Writer):
  """``metrics.jsonl``: one JSON object per logged step or evaluation, ``{"step": ..., ...}``.

  Locally each record is appended (and flushed) as it comes; where appending is not available
  (``gs://...``) the whole file, small as it is, is rewritten atomically instead. ``records``
  holds everything written so far, including what was there before a resume.
  """

  def __init__(self, path: str | os.PathLike, enabled: bool = True):
    self.path, self.enabled = files.as_path(path), enabled
    self._append = not files.is_uri(self.path)
    self.records = self.read() if enabled else []

  def write_scalars(self, step: int, record: Record) -> None:
    if not self.enabled:
      return
    entry = {"step": step, **{k: v for k, v in record.items() if k != "step"}}
    self.records.append(entry)
    if self._append:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self.path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    else:
      self._rewrite()

  def truncate_after(self, step: int) -> None:
    if not self.enabled:
      return
    self.records = [r for r in self.records if r["step"] <= step]
    if self.path.exists():  # rewritten even if nothing is dropped: that drops a torn last line
      self._rewrite()

  def _rewrite(self) -> None:
    _write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

  def read(self) -> list[dict[str, Any]]:
    """The records in the file. A torn last line (a crash mid-append) is left out."""
    if not self.path.exists():
      return []
    lines = [line for line in self.path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if i < len(lines) - 1:
          raise
    return records


class Plots(Writer):
  """``loss.png`` and ``eval.png``, redrawn whenever a record brings new values for them.

  Drawn from the records in memory (``history`` is what the file held at the start), and written
  atomically, so a reader, or a crash, never leaves half a PNG.
  """

  def __init__(self, workdir: str | os.PathLike, history: Sequence[Record] = ()):
    self.workdir = files.as_path(workdir)
    self.records = [dict(r) for r in history]

  def write_scalars(self, step: int, record: Record) -> None:
    self.records.append({"step": step, **_scalars(record)})
    if "loss" in record:
      plot_losses(self.records, self.workdir / "loss.png")
    if any(k.startswith("eval_") for k in record):
      plot_evals(self.records, self.workdir / "eval.png")

  def truncate_after(self, step: int) -> None:
    self.records = [r for r in self.records if r["step"] <= step]


# pip extra -> (the module it brings, the config setting that does without it)
_EXTRAS = {
  "tensorboard": ("tensorboardX", "training.tensorboard=False"),
  "wandb": ("wandb", "training.wandb_project=''"),
}


def _require(extra: str, why: str):
  """The module of ``extra``, or one ImportError that says how to install it and how not to
  need it (``why`` is the setting that asked for it)."""
  module, off = _EXTRAS[extra]
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
      f"{why} needs {module} ({e}): install it with pip install 'jaxdiff[{extra}]',"
      f" or turn it off with --config.{off}"
    ) from None


class TensorBoardWriter(Writer):
  """TensorBoard event files in ``logdir`` through tensorboardX (no TensorFlow): every numeric
  field of a record as a scalar, image grids as images.

  The file is opened at the first write, so that after ``truncate_after(step)`` (a resume) it
  carries ``purge_step``: TensorBoard then drops the older files' events past ``step``, which the
  resumed run writes again.
  """

  def __init__(self, logdir: str | os.PathLike):
    self._tbx = _require("tensorboard", "training.tensorboard=True")
    self.logdir = files.as_path(logdir)
    self._writer, self._purge_step = None, None

  def _get(self):
    if self._writer is None:
      self._writer = self._tbx.SummaryWriter(
        os.fspath(self.logdir), purge_step=self._purge_step, flush_secs=30
      )
    return self._writer

  def write_scalars(self, step: int, record: Record) -> None:
    writer = self._get()
    for name, value in _scalars(record).items():
      writer.add_scalar(name, value, step)
    writer.flush()  # once per log interval: what was logged survives a crash

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    writer = self._get()
    for name, grid in images.items():
      writer.add_image(name, np.asarray(grid), step, dataformats="HWC")
    writer.flush()

  def truncate_after(self, step: int) -> None:
    self._purge_step = step + 1

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class WandbWriter(Writer):
  """A Weights & Biases run in ``project``: the config once at the start, scalars, images.

  The run's id is kept in ``WORKDIR/wandb_id``, so a resumed training run continues the same W&B
  run (``resume="allow"``); it is named after the workdir. W&B's local files go to
  ``$WANDB_DIR`` if set, else into a local workdir (a ``gs://`` one cannot hold them: then
  W&B's default, the current directory).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path, project: str):
    self._wandb = _require("wandb", f"training.wandb_project={project!r}")
    id_path = workdir / "wandb_id"
    if id_path.exists():
      run_id = id_path.read_text().strip()
    else:
      run_id = secrets.token_hex(8)
      workdir.mkdir(parents=True, exist_ok=True)
      _write_text(id_path, run_id + "\n")
    local = None if os.environ.get("WANDB_DIR") or files.is_uri(workdir) else os.fspath(workdir)
    self.run = self._wandb.init(
      project=project,
      id=run_id,
      name=workdir.name,
      resume="allow",
      config=json.loads(config.to_json_best_effort()),
      dir=local,
    )

  def write_scalars(self, step: int, record: Record) -> None:
    self.run.log(_scalars(record), step=step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    # A grey grid is [H, W, 1]; wandb.Image wants [H, W] for it.
    logged = {n: self._wandb.Image(np.asarray(g).squeeze(-1) if np.shape(g)[-1] == 1 else g)
              for n, g in images.items()}  # fmt: skip
    self.run.log(logged, step=step)

  def close(self) -> None:
    if self.run is not None:  # closed inside an exception's `finally`: the run failed
      self.run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
      self.run = None


def require_extras(config: ml_collections.ConfigDict) -> None:
  """Raises ImportError (saying how to install or turn off) if a writer the config asks for
  lacks its optional package."""
  tcfg = config.training
  if tcfg.tensorboard:
    _require("tensorboard", "training.tensorboard=True")
  if tcfg.wandb_project:
    _require("wandb", f"training.wandb_project={tcfg.wandb_project!r}")


def make(config: ml_collections.ConfigDict, workdir: str | os.PathLike, enabled: bool) -> Writer:
  """The run's writer: ``metrics.jsonl`` and the plots always, TensorBoard if
  ``training.tensorboard``, W&B if ``training.wandb_project``.

  Every process checks that the optional packages import (so all fail alike, at setup and
  before any training); only the one with ``enabled`` (process 0) gets a writer that writes.
  """
  tcfg = config.training
  require_extras(config)
  if not enabled:
    return Writer()
  workdir = files.as_path(workdir)
  log = MetricsLog(workdir / "metrics.jsonl")
  chosen: list[Writer] = [log, Plots(workdir, log.records)]
  if tcfg.tensorboard:
    chosen.append(TensorBoardWriter(workdir / "tensorboard"))
  if tcfg.wandb_project:
    chosen.append(WandbWriter(config, workdir, tcfg.wandb_project))
  return MultiWriter(chosen)


def _save(fig, path: epath.Path) -> None:
  with files.atomic_path(path) as tmp, files.as_path(tmp).open("wb") as f:
    fig.savefig(f, format="png")


def plot_losses(records: Sequence[Record], path: str | os.PathLike) -> None:
  """The loss curve (and its running mean) to a PNG; nothing without a ``loss`` record.

  Drawn on a bare ``matplotlib.figure.Figure``: no pyplot, so no backend is switched.
  """
  from matplotlib import ticker
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
  # Plain labels at 1, 2, 5 x 10^k ("0.05"): the default mathtext labels doubled the redraw time.
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(alpha=0.3)
  ax.legend()
  fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.96)  # tight_layout: 2x the time
  _save(fig, files.as_path(path))


def plot_evals(records: Sequence[Record], path: str | os.PathLike) -> None:
  """Each ``eval_*`` metric over steps, one panel each (``eval_X_stderr`` as error bars on
  ``eval_X``), to a PNG; nothing without an evaluation record."""
  from matplotlib.figure import Figure

  names = sorted({k for r in records for k in r if k.startswith("eval_")})
  names = [n for n in names if not (n.endswith("_stderr") and n[: -len("_stderr")] in names)]
  if not names:
    return
  cols = min(len(names), 3)
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(3.2 * cols, 2.6 * rows), dpi=100)
  for ax, name in zip(fig.subplots(rows, cols, squeeze=False).flat, names, strict=False):
    have = [r for r in records if name in r]
    steps = [r["step"] for r in have]
    err = [r.get(f"{name}_stderr", 0.0) for r in have]
    ax.errorbar(steps, [r[name] for r in have], yerr=err, marker="o", ms=3, lw=1, capsize=2)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in fig.axes[len(names) :]:
    ax.set_visible(False)
  fig.subplots_adjust(left=0.7 / fig.get_figwidth(), right=1 - 0.15 / fig.get_figwidth(),
                      bottom=0.55 / fig.get_figheight(), top=1 - 0.35 / fig.get_figheight(),
                      wspace=0.35, hspace=0.6)  # fmt: skip
  _save(fig, files.as_path(path))
