"""Train a diffusion model.

  jaxdiff train --config configs/fashion_mnist.py --workdir runs/fmnist \\
      --config.data.manual_dir=../shared/data/fashion_mnist
  jaxdiff train --config my_config.py --workdir gs://bucket/runs/x --config.training.batch_size=256
  jaxdiff train --config configs/cifar10.py --dry_run

``--config`` is any config file (one defining ``get_config()``, usually starting from
``jaxdiff.config.get_config()``); ``--config.SECTION.KEY=value`` overrides a field. Re-running the
same command on the same workdir resumes from its newest checkpoint. The workdir may be local or
``gs://``; on several hosts it must be storage they all share.
"""

from absl import flags
from ml_collections import config_flags

from jaxdiff import cli
from jaxdiff.cli import overrides

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples (or gs://).")
flags.DEFINE_bool("dry_run", False, "Build the model and optimizer, print a summary, and exit.")
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
  training.train(FLAGS.config, FLAGS.workdir)


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
