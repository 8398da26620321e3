"""Thin command-line entry points, each run as ``python -m jaxdiff.cli.NAME``.

Each module defines its absl flags at import, so import one per process (as ``__main__``):
``train``, ``sample``, ``evaluate``, ``prepare``, ``train_classifier``, ``convert_inception``.
The top-level ``train.py`` and ``sample.py`` of the repository wrap ``train`` and ``sample``.
"""


def start_jax(argv: list[str]) -> None:
  """What every entry point does first, before anything touches a device: refuse stray
  positional arguments, quiet orbax (it logs every file it touches at INFO through absl), make
  one CPU device per core, and join a multi-host run when the environment asks for one.

  Raises:
    absl.app.UsageError: positional arguments (every option is a ``--flag``).
  """
  from absl import app, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxdiff import parallel

  logging.set_verbosity(logging.WARNING)
  parallel.use_all_cpu_cores()
  parallel.maybe_initialize_distributed()
