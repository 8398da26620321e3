"""Train a diffusion model.

  python -m jaxdiff.cli.train --config configs/fashion_mnist.py --workdir runs/fmnist
  python train.py --config configs/tiny.py --workdir /tmp/t --config.training.num_steps=10
  python train.py --config configs/cifar10.py --workdir /tmp/c --dry_run

Re-running the same command on the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool("dry_run", False, "Build model and optimizer, print a summary, and exit.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  from jaxdiff.cli import start_jax

  start_jax(argv)
  from jaxdiff import training

  if FLAGS.dry_run:
    print(training.dry_run(FLAGS.config))
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  training.train(FLAGS.config, FLAGS.workdir)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
