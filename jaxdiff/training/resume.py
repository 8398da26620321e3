"""Re-running a workdir: which config changes a resumed run may take, and the run's history.

A checkpoint means something only under the config it was trained with: its arrays have the
model's shapes, its noise levels are the diffusion's, its data position counts batches of one
stream (dataset, split, seed, batch size, flips, workers), and its optimiser state has the
optimiser's structure. Changing any of those and resuming would either fail deep inside orbax
or, worse, silently continue a different experiment, so :func:`check` refuses them before
anything in the workdir is touched. Everything else (more steps, intervals, the learning rate,
sampling and evaluation options, where the data lives, memory knobs such as FSDP, gradient
accumulation or remat) may change; :func:`record` writes each start and resume, with what
changed, to ``WORKDIR/history.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from jaxdiff.config import get_config
from jaxdiff.io import files

# Dotted keys (or prefixes ending in ".") that a resumed run must keep.
FIXED = (
  "seed",
  "text.",  # the encoder, its token length and width: what the model attends to
  "model.",
  "diffusion.",
  "data.name",
  "data.split",
  "data.image_size",
  "data.channels",
  "data.num_classes",
  "data.random_flip",
  "data.num_workers",  # grain's saved position is per worker
  "training.batch_size",
  "training.optimizer",
  "autoencoder.",  # an autoencoder run's architecture and objective
  # A latent run's latents: which autoencoder checkpoint (by content, wherever it lies now), how
  # its latents are taken and scaled.
  "latent.autoencoder_step",
  "latent.digest",
  "latent.sample",
  "latent.size",
  "latent.channels",
  "latent.scale_factor",
)
# Exceptions to FIXED prefixes: knobs that change memory or speed, not the result.
FREE = ("model.remat", "autoencoder.scale_examples", "text.caption_dropout", "text.cache_dir")

HISTORY = "history.jsonl"


class ResumeRefusedError(ValueError):
  """The new config changes what the workdir's checkpoints were trained with."""


def as_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """``config`` as plain JSON types (tuples become lists), the form ``config.json`` holds."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changes(
  old: Mapping[str, Any], new: ml_collections.ConfigDict | Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
  """``{dotted key: (old value, new value)}`` for every field of ``new`` that differs. A field
  the old config lacks (an older jaxdiff) counts as its schema default; one only the old config
  has (since removed from the schema) is not compared."""
  defaults = _flatten(as_json(get_config()))
  before = {**defaults, **_flatten(as_json(old))}
  after = _flatten(as_json(new))
  return {
    key: (before.get(key), after[key]) for key in sorted(after) if before.get(key) != after[key]
  }


def _why_fixed(key: str, old: Any, new: Any) -> bool:
  if key in FREE:
    return False
  if key == "text.digest" and old is None:  # a run from before the digest was recorded
    return False
  if key == "training.grad_clip":  # on <-> off changes the optimiser state's structure
    return (old is not None and old > 0) != (new is not None and new > 0)
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED)


def check(
  stored: Mapping[str, Any], config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, tuple[Any, Any]]:
  """The changes from ``stored`` (the config the checkpoints were trained with) to ``config``.

  Raises:
    ResumeRefusedError: a change the checkpoints cannot take, every such field named with its
      old and new value.
  """
  diff = changes(stored, config)
  fixed = {k: v for k, v in diff.items() if _why_fixed(k, *v)}
  if fixed:
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
    raise ResumeRefusedError(
      f"cannot resume {workdir} with this config: it changes what its checkpoints were trained"
      f" with:\n{lines}\nThese fields cannot change within a run: train into a new --workdir,"
      f" or drop these changes. Nothing in {workdir} was changed."
    )
  return diff


def record(workdir: str | os.PathLike, event: str, **fields: Any) -> None:
  """Appends ``{"time", "event", **fields}`` to ``WORKDIR/history.jsonl`` (rewritten whole and
  atomically, so a crash leaves the old file or the new one)."""
  path = files.as_path(workdir) / HISTORY
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):
    old += "\n"
  entry = {
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "event": event,
    **fields,
  }
  with files.atomic_path(path) as tmp:
    files.as_path(tmp).write_text(old + json.dumps(entry, default=str) + "\n")


def read_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The events of ``WORKDIR/history.jsonl`` (empty for a run without one)."""
  path = files.as_path(workdir) / HISTORY
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe_changes(diff: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())


def environment() -> dict[str, Any]:
  """What a history entry says about where the run ran."""
  return {
    "processes": jax.process_count(),
    "devices": jax.device_count(),
    "platform": jax.devices()[0].platform,
  }
