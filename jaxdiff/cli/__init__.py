"""The ``jaxdiff`` command: one console script, one subcommand per module of this package.

  jaxdiff train --config my_config.py --workdir runs/x [--config.training.batch_size=64]
  jaxdiff sample --workdir runs/x --out grid/ [--steps 20 | --config.sampling.num_steps=20]
  jaxdiff evaluate --workdir runs/x --metric bpd
  jaxdiff prepare --name mnist --manual_dir raw/mnist
  jaxdiff train-classifier --config my_config.py
  jaxdiff convert-inception --weights pt_inception.pth --out weights/

Every subcommand takes absl flags only (``jaxdiff CMD --help`` lists them). A subcommand module
defines its flags when it is imported, so a process imports exactly one (``main`` below does
that); ``python -m jaxdiff.cli.NAME`` runs one directly, and the repository's ``train.py`` and
``sample.py`` wrap ``train`` and ``sample``. An expected error (bad flag values, missing files,
an unprepared dataset) ends the command with one line on stderr, ``error: ...``, and a non-zero
exit status; ``JAXDIFF_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# name: (module, what it does). The order is the order of `jaxdiff --help`.
COMMANDS = {
  "train": ("train", "train a diffusion model (re-running a workdir resumes it)"),
  "sample": ("sample", "draw samples from a trained run"),
  "evaluate": ("evaluate", "bits/dim, or FD / IS of samples, of a trained run"),
  "prepare": ("prepare", "prepare a tfds dataset once (needs jaxdiff[prepare])"),
  "train-classifier": ("train_classifier", "train the classifier features that FD uses"),
  "convert-inception": ("convert_inception", "convert pytorch-fid's InceptionV3 weights"),
}


def define_common_flags() -> None:
  """Flags every subcommand has; each subcommand module calls this once, when it is imported."""
  from absl import flags

  flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
    "Keep compiled programs here and reuse them in later runs (local or gs://; default:"
    " $JAX_COMPILATION_CACHE_DIR; '' = off).",
  )


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
  return (
    "usage: jaxdiff COMMAND [--flags]\n\ncommands:\n"
    + "\n".join(lines)
    + ("\n\n`jaxdiff COMMAND --help` lists a command's flags.\n")
  )


def main(argv: Sequence[str] | None = None) -> None:
  """The ``jaxdiff`` console script: ``argv[1]`` names the subcommand, the rest are its flags."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(_usage())
    raise SystemExit(0 if len(argv) >= 2 else 1)
  name = argv[1]
  if name not in COMMANDS:
    sys.stderr.write(_usage())
    raise SystemExit(f"error: unknown command {name!r}; allowed: {', '.join(COMMANDS)}")
  run_command(name, [f"jaxdiff {name}", *argv[2:]])


def run_command(name: str, argv: Sequence[str]) -> None:
  """Runs subcommand ``name`` with ``argv`` (``argv[0]`` is the program name shown in usage).

  absl prints ``__main__``'s docstring and the key flags of the module named by
  ``sys.argv[0]`` as usage; the subcommand's module is neither when it runs under the console
  script or a wrapper, so both are pointed at it first.
  """
  from absl import flags

  module = importlib.import_module(f"jaxdiff.cli.{COMMANDS[name][0]}")
  main_module = sys.modules["__main__"]
  if main_module is not module:
    main_module.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  _run(module.main, list(argv))


def run_main(main_fn: Callable[[list[str]], None]) -> None:
  """``python -m jaxdiff.cli.NAME``: runs that module's ``main`` (already ``__main__``)."""
  _run(main_fn, sys.argv)


def _run(main_fn: Callable[[list[str]], None], argv: list[str]) -> None:
  """``app.run(main_fn)``; a usage error (a flag value the command cannot use) prints a usage
  line and the error, not the whole flag list."""
  from absl import app

  def main_with_usage(args: list[str]) -> None:
    try:
      main_fn(args)
    except app.UsageError as e:
      print(f"usage: {argv[0]} --flag=value ... (--help lists the flags)", file=sys.stderr)
      fail(str(e))

  app.run(main_with_usage, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, plus one line instead of a traceback for a misspelt ``--config.`` key
  (ml_collections raises AttributeError/KeyError with the suggestion in its message), and
  exit status 0 after ``--help``."""
  from absl import app

  try:
    return app.parse_flags_with_usage(argv)
  except SystemExit as e:  # absl's --help prints the help, then exits with status 1
    asked = {"-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml"} & set(argv[1:])
    raise SystemExit(0 if asked and e.code == 1 else e.code) from None
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    fail(f"unknown config key: {message}")


def fail(message: str) -> NoReturn:
  """Ends the command with ``error: message`` on stderr and exit status 1."""
  raise SystemExit(f"error: {message}") from None


def expected_errors() -> tuple[type[BaseException], ...]:
  """The exceptions a command reports as one message: bad values, missing or unprepared files,
  paths that cannot be written, checkpoints that cannot be restored, a run that stopped on a
  non-finite loss, a missing optional package."""
  from jaxdiff.data.preparation import DatasetNotPreparedError
  from jaxdiff.io.checkpoints import CheckpointError

  return (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PermissionError,
    DatasetNotPreparedError,
    CheckpointError,
    FloatingPointError,
    ImportError,
  )


def reporting_errors(fn: Callable[[], object]) -> object:
  """``fn()``, with an expected error turned into one line (``JAXDIFF_TRACEBACK=1``: raised)."""
  try:
    return fn()
  except expected_errors() as e:
    if os.environ.get("JAXDIFF_TRACEBACK"):
      raise
    fail(str(e))


def _show_own_warnings() -> None:
  """jaxdiff's warnings (a checkpoint skipped, bad images skipped) as ``warning: ...`` lines,
  like the errors; other libraries' warnings as Python shows them."""
  import warnings

  default = warnings.showwarning

  def show(message, category, filename, lineno, file=None, line=None):
    if category.__module__.startswith("jaxdiff"):
      print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
      default(message, category, filename, lineno, file, line)

  warnings.showwarning = show


def start_jax(argv: list[str]) -> None:
  """What every entry point does first, before anything touches a device: refuse stray
  positional arguments, quiet orbax (it logs every file it touches at INFO through absl), turn
  on the persistent compilation cache if asked, make one CPU device per core, and join a
  multi-host run when the environment asks for one.

  Raises:
    absl.app.UsageError: positional arguments (every option is a ``--flag``).
  """
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from jaxdiff import parallel

  logging.set_verbosity(logging.WARNING)
  _show_own_warnings()
  if cache := flags.FLAGS.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache)
  parallel.use_all_cpu_cores()
  parallel.maybe_initialize_distributed()
