"""Train a diffusion model.

  jaxdiff train --config configs/fashion_mnist.py --workdir runs/fmnist \\
      --config.data.manual_dir=../shared/data/fashion_mnist
  jaxdiff train --config my_config.py --workdir gs://bucket/runs/x --config.training.batch_size=256
  jaxdiff train --config configs/cifar10.py --dry_run

``--config`` is any config file (one defining ``get_config()``, usually starting from
``jaxdiff.config.get_config()``); ``--config.SECTION.KEY=value`` overrides a field. Every field is
checked before anything is read or written, and all bad ones are named at once.

Re-running the same command on the same workdir resumes from its newest checkpoint that restores
(``--checkpoint_step`` picks an older one; newer ones are set aside, renamed). A resumed run may
change training length, intervals, the learning rate, sampling and evaluation options; changes to
the model, diffusion or data are refused before any file is touched. Each start, resume and stop
is recorded in ``WORKDIR/history.jsonl``. The workdir may be local or ``gs://``; on several hosts
it must be storage they all share.

Exit status: 0 when training reached ``training.num_steps``; 1 on an error (one line on stderr);
128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal stopped it, after every
process saved the same step.
"""

import sys

from absl import flags
from ml_collections import config_flags

from jaxdiff import cli
from jaxdiff import config as config_lib
from jaxdiff.cli import overrides

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (or gs://).")
flags.DEFINE_bool("dry_run", False, "Build the model and optimizer, print a summary, and exit.")
flags.DEFINE_integer(
  "checkpoint_step", None, "Resume from this checkpoint (default: the newest that restores)."
)
# Config files build on the schema, so a --config.KEY it lacks is a typo: one line, with the
# nearest key, before ml_collections reads the overrides (it would raise from inside absl).
overrides.check_keys(sys.argv, config_lib.get_config())
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
cli.define_common_flags()
flags.declare_key_flag("compilation_cache_dir")
FLAGS = flags.FLAGS


def _train() -> None:

  from jaxdiff import training

  if FLAGS.dry_run:
    print(training.dry_run(FLAGS.config))
    return
  try:
    training.train(FLAGS.config, FLAGS.workdir, checkpoint_step=FLAGS.checkpoint_step)
  except training.TrainingStopped as e:
    print(str(e), file=sys.stderr)
    raise SystemExit(128 + e.signum) from None


def main(argv: list[str]) -> None:
  from absl import app

  if not FLAGS.dry_run and not FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  if FLAGS.workdir:
    overrides.check_out_dir(FLAGS.workdir, "workdir")
  cli.start_jax(argv)
  cli.reporting_errors(_train)


if __name__ == "__main__":
  cli.run_main(main)
