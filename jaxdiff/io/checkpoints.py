"""Checkpoints with orbax: the train state plus the data iterator's position.

A checkpoint is a step directory holding two items: ``state`` (the
:class:`~jaxdiff.training.TrainState`, saved from the sharded arrays, restored
straight into the shardings asked for) and ``data`` (the input pipeline's
JSON state), so that a resumed run sees the same batches. Saving is
asynchronous; orbax writes into a temporary directory and renames it when
complete, so a run killed mid-save leaves no checkpoint that looks finished.

Which checkpoints stay: the newest ``max_to_keep`` and, when a ``best_metric`` is named, also
the one whose saved metrics are best by it (orbax's preservation policies), so "the best
model" survives however long training goes on after it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxdiff.io import files


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
        item_names=("state", "data"),
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
  ) -> None:
    """Starts writing checkpoint ``step`` (returns before the write finishes).

    ``metrics`` (e.g. the evaluation at this step) are stored with it and rank it for
    ``best_metric``.
    """
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      metrics = None  # ranked only by what it was evaluated on
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
      ),
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

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
