"""Checkpoints with orbax: the train state, the data iterator's position and the config.

A checkpoint is a step directory holding three items: ``state`` (the
:class:`~jaxdiff.training.TrainState`, saved from the sharded arrays, restored
straight into the shardings asked for), ``data`` (the input pipeline's
JSON state), so that a resumed run sees the same batches, and ``config`` (the run's config as
JSON: what the checkpoint was trained with; checkpoints of jaxdiff before 0.3 lack it), and for
an autoencoder run ``stats`` (JSON: the latent scale factor measured on its parameters). Saving is
asynchronous; orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves no checkpoint that looks finished.

A checkpoint that looks finished can still fail to restore (a disk that lost a file, a copy cut
short): :meth:`Checkpointer.restore_newest_good` then falls back on the previous one, with a
:class:`CheckpointWarning` naming both steps, and :func:`set_aside` moves the bad one out of the
way (renamed, never deleted) before training writes that step again.

Which checkpoints stay: the newest ``max_to_keep`` and, when a ``best_metric`` is named, also
the one whose saved metrics are best by it (orbax's preservation policies), so "the best
model" survives however long training goes on after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jaxdiff.io import files

ITEMS = ("state", "data", "config", "stats")


class CheckpointError(RuntimeError):
  """No checkpoint asked for (or none at all) could be restored."""


class CheckpointWarning(UserWarning):
  """A checkpoint could not be restored and an older one is used instead."""


def describe(error: BaseException) -> str:
  """One line about why a restore failed: the innermost cause (tensorstore's own error, which
  names the array and the file), not orbax's wrapper with its dozens of lines of spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().split("\n")[0]
  text = re.split(r"\s*See full TensorStore details", text)[0]
  text = text if len(text) <= 300 else text[:297] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
  """absl logging (which orbax uses) at ERROR inside the block, when ``enabled``."""
  if not enabled:
    yield
    return
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _is_abandoned_read(exc: BaseException | None) -> bool:
  text = str(exc)
  return text.startswith("Encountered error while reading array index") or (
    isinstance(exc, RuntimeError) and text == "Event loop is closed"
  )


def _quiet_abandoned_reads() -> None:
  """From now on, drops what orbax's abandoned reads print (installed once per process).

  A restore that fails on one array leaves orbax's other reads in flight: as they finish they
  call back into an event loop orbax has already closed, and their coroutines are collected
  unawaited, each printing a traceback of up to 80 lines (from tensorstore's threads, at any
  moment, or at exit) through ``sys.unraisablehook``, or a "never awaited" warning. Those, and
  only those, are dropped, so that a failed restore is the one message about it. Installed
  before a restore starts: the first callbacks can fire before the failure reaches us.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_jaxdiff", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      previous(unraisable)

  hook._jaxdiff = True
  sys.unraisablehook = hook
  warnings.filterwarnings(
    "ignore", r"coroutine '_read_array_index_and_device_put' was never awaited", RuntimeWarning
  )


class Checkpointer:
  """Saves and restores ``(state, data_state)`` pairs under ``directory``.

  ``directory`` goes through ``files.as_path``: a local one is made absolute, a ``gs://`` one is
  handed to orbax as it is. With ``read_only`` nothing is created, saved or deleted (what
  ``load_run`` uses: reading a run must not change it).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int = 3,
    async_save: bool = True,
    best_metric: str | None = None,
    best_mode: str = "min",
    read_only: bool = False,
  ):
    self.directory = files.as_path(directory)
    self.best_metric = best_metric
    with _quiet(read_only):  # orbax warns that a read-only directory is read-only
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=_options(max_to_keep, async_save, best_metric, best_mode, read_only),
        item_names=ITEMS,
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step whose metrics are best by ``best_metric`` (None: none has metrics)."""
    return None if self.best_metric is None else self._manager.best_step()

  def save(
    self,
    step: int,
    state: Any,
    data_state: dict | None = None,
    metrics: dict[str, float] | None = None,
    config: dict | None = None,
    stats: dict | None = None,
  ) -> None:
    """Starts writing checkpoint ``step`` (returns before the write finishes).

    ``metrics`` (e.g. the evaluation at this step) are stored with it and rank it for
    ``best_metric``; ``config`` (JSON-able) is stored with it as what it was trained with;
    ``stats`` (JSON-able) as facts measured on its parameters.
    """
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      metrics = None  # ranked only by what it was evaluated on
    items = {
      "state": ocp.args.StandardSave(state),
      "data": ocp.args.JsonSave(data_state if data_state is not None else {}),
      "config": ocp.args.JsonSave(config if config is not None else {}),
    }
    if stats is not None:
      items["stats"] = ocp.args.JsonSave(stats)
    self._manager.save(
      step,
      args=ocp.args.Composite(**items),
      metrics=metrics if self.best_metric is not None else None,
      force=True,
    )

  def restore(
    self, abstract_state: Any, shardings: Any = None, step: int | None = None
  ) -> tuple[Any, dict]:
    """Restores checkpoint ``step`` (default: latest) into ``abstract_state``'s structure.

    Args:
      abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct`` giving the
        structure, shapes and dtypes.
      shardings: a matching pytree of shardings to restore into (default:
        those of ``abstract_state``).
      step: which checkpoint.

    Returns:
      ``(state, data_state)``.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if shardings is None:
      shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_state)
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["data"] or {})

  def read_config(self, step: int) -> dict | None:
    """The config stored with checkpoint ``step``; None if it has none (older jaxdiff) or it
    cannot be read."""
    return self.read_json(step, "config")

  def read_json(self, step: int, item: str) -> dict | None:
    """The JSON item ``item`` ("config", "stats", "data") of checkpoint ``step``; None if the
    checkpoint has none or it cannot be read."""
    try:
      with _quiet(True):
        restored = self._manager.restore(
          step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        )
    except Exception:  # noqa: BLE001 - any failure means: nothing stored to go by
      return None
    return dict(restored[item]) if restored[item] else None

  def digest(self, step: int) -> str:
    """SHA-256 (hex) of checkpoint ``step``'s ``state`` files, names and bytes: what tells one
    set of parameters from another (a retrained or replaced checkpoint gets a new digest)."""
    root = self.directory / str(step) / "state"
    if not root.is_dir():
      raise CheckpointError(f"no checkpoint {step} in {self.directory}")
    h = hashlib.sha256()
    for path in _files_under(root):
      h.update(str(path.relative_to(root)).encode() + b"\0")
      h.update(path.read_bytes())
    return h.hexdigest()

  def restore_newest_good(
    self, abstract_state: Any, shardings: Any = None, step: int | None = None
  ) -> tuple[int, Any, dict, list[tuple[int, str]]]:
    """Restores checkpoint ``step``, or by default the newest one that restores.

    A checkpoint that fails to restore is skipped with a :class:`CheckpointWarning` naming it,
    why, and the step used instead. A ``step`` asked for by name is never replaced by another.

    Returns:
      ``(step, state, data_state, skipped)``; ``skipped`` lists ``(step, reason)`` of the newer
      checkpoints that failed.

    Raises:
      CheckpointError: ``step`` (or, without ``step``, every checkpoint) fails to restore; or
        there is no checkpoint ``step``.
    """
    available = self.all_steps()
    if step is not None:
      if step not in available:
        raise CheckpointError(f"no checkpoint {step} in {self.directory}; available: {available}")
      candidates = [step]
    else:
      candidates = sorted(available, reverse=True)
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    skipped: list[tuple[int, str]] = []
    for candidate in candidates:
      _quiet_abandoned_reads()
      try:
        state, data_state = self.restore(abstract_state, shardings, candidate)
      except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise plain Exception
        skipped.append((candidate, describe(e)))
        continue
      for bad, why in skipped:
        warnings.warn(
          f"checkpoint {bad} in {self.directory} cannot be restored ({why}); using checkpoint"
          f" {candidate} instead",
          CheckpointWarning,
          stacklevel=2,
        )
      return candidate, state, data_state, skipped
    if step is not None:
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} cannot be restored: {skipped[0][1]}"
      )
    reasons = "; ".join(f"{s}: {why}" for s, why in skipped)
    raise CheckpointError(f"no checkpoint in {self.directory} can be restored ({reasons})")

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _files_under(root: epath.Path) -> list[epath.Path]:
  """Every file below ``root``, sorted (epath refuses ``rglob`` on remote paths: walk by hand)."""
  found = []
  for path in sorted(root.iterdir()):
    found.extend(_files_under(path) if path.is_dir() else [path])
  return found


def set_aside(directory: str | os.PathLike, steps: Sequence[int], why: str) -> list[epath.Path]:
  """Renames checkpoints ``steps`` in ``directory`` to ``STEP.WHY`` (``STEP.WHY-2``, ... if
  taken): out of orbax's sight, so those steps can be written again, yet kept. Call it with no
  :class:`Checkpointer` open on ``directory`` (orbax caches the steps it has seen), on one
  process. Returns the new paths."""
  directory = files.as_path(directory)
  moved = []
  for step in steps:
    target, n = directory / f"{step}.{why}", 1
    while target.exists():
      n += 1
      target = directory / f"{step}.{why}-{n}"
    (directory / str(step)).rename(target)
    moved.append(target)
  return moved


def _options(
  max_to_keep: int, async_save: bool, best_metric: str | None, best_mode: str, read_only: bool
) -> ocp.CheckpointManagerOptions:
  # read_only: orbax would switch max_to_keep and create off itself, with a warning for each.
  common = {
    "create": not read_only,
    "read_only": read_only,
    "enable_async_checkpointing": async_save,
  }
  if best_metric is None:
    return ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep, **common)
  if best_mode not in ("min", "max"):
    raise ValueError(f"best_mode={best_mode!r}; allowed: min, max")
  policies = ocp.checkpoint_managers
  rank = lambda metrics: metrics[best_metric]  # noqa: E731
  return ocp.CheckpointManagerOptions(
    **common,
    best_fn=rank,
    best_mode=best_mode,
    preservation_policy=policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=max_to_keep),
        policies.BestN(
          get_metric_fn=rank,
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    ),
  )
