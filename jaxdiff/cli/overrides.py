"""A trained run's config, changed from the command line (``sample`` and ``evaluate``).

``--config.sampling.num_steps=20`` changes a field of the run's own ``config.json`` for this
command only. Overrides are parsed against the schema (``jaxdiff.config``), so a misspelt key or a
wrong type fails while the flags are read; only the sections a command names may change (the
model, diffusion and data of a trained run are what its checkpoints were trained with). A short
flag such as ``--steps`` is another name for one field (``sampling.num_steps``); giving both with
different values is an error.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxdiff import config as config_lib

FLAGS = flags.FLAGS


def define(sections: Sequence[str]) -> None:
  """Defines ``--config.SECTION.KEY=value`` for ``sections`` of the run's config.

  ml_collections reads the overrides from ``sys.argv`` as the flag is defined, so a misspelt
  key is caught here first, as one line with the nearest real key.
  """
  check_keys(sys.argv, config_lib.get_config())
  names = " / ".join(f"{s}.*" for s in sections)
  config_flags.DEFINE_config_dict(
    "config",
    config_lib.get_config(),
    f"Overrides of the run's own config, for this command only ({names}), e.g."
    f" --config.{sections[0]}.{next(iter(config_lib.get_config()[sections[0]]))}=...",
  )
  flags.declare_key_flag("config")


def check_keys(argv: Sequence[str], schema: ml_collections.ConfigDict) -> None:
  """Exits with one line if a ``--config.a.b`` in ``argv`` names no field of ``schema``."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").split("=")[0]
    node, walked = schema, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(part, options, n=1)
        hint = f"; did you mean {'.'.join([*walked, near[0]])}?" if near else ""
        where = ".".join(walked) or "the config"
        raise SystemExit(f"error: --config.{key}: {where} has no field {part!r}{hint}")
      node = node[part]
      walked.append(part)


def collect(sections: Sequence[str], shorthands: Mapping[str, str]) -> dict[str, Any]:
  """``{dotted key: value}`` of every override given, by ``--config.`` or by a short flag.

  Args:
    sections: the config sections the command may change.
    shorthands: ``{flag name: dotted key}``; a flag left at None is not an override.

  Raises:
    absl.app.UsageError: a key outside ``sections``, or a short flag and its ``--config.``
      field given different values.
  """
  values = dict(config_flags.get_override_values(FLAGS["config"]))
  outside = sorted(k for k in values if k.split(".")[0] not in sections)
  if outside:
    allowed = ", ".join(f"config.{s}.*" for s in sections)
    raise app.UsageError(
      f"--config.{outside[0]} cannot change for a trained run; allowed here: {allowed}"
    )
  for name, key in shorthands.items():
    value = FLAGS[name].value
    if value is None:
      continue
    if key in values and values[key] != value:
      raise app.UsageError(f"--{name}={value} and --config.{key}={values[key]} disagree")
    values[key] = value
  return values


def apply(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``values`` (``{dotted key: value}``) set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def check_checkpoint_choice() -> None:
  """``--checkpoint_step`` and ``--best`` (of ``sample`` and ``evaluate``) are exclusive."""
  if FLAGS.checkpoint_step is not None and FLAGS.best:
    raise app.UsageError("--checkpoint_step and --best both choose the checkpoint; give one")


def check_out_dir(path: str, flag: str = "out") -> None:
  """``--out`` names a folder (made if missing) that can be written: checked now, not after the
  work is done."""
  from jaxdiff.io import files

  try:
    files.check_writable(path, f"--{flag}")
  except (NotADirectoryError, PermissionError) as e:
    raise app.UsageError(str(e)) from None
