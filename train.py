"""Train a diffusion model.

  python train.py --config configs/fashion_mnist.py --workdir runs/fmnist
  python train.py --config configs/tiny.py --workdir /tmp/t --config.training.num_steps=10
  python train.py --config configs/cifar10.py --workdir /tmp/c --dry_run

Re-running the same command on the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool("dry_run", False, "Build model and optimizer, print a summary, and exit.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from jaxdiff import parallel

  # Both before anything touches a device.
  parallel.use_all_cpu_cores()
  parallel.maybe_initialize_distributed()
  from jaxdiff import trainer

  config = FLAGS.config
  if FLAGS.dry_run:
    print(trainer.dry_run(config))
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  trainer.train(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
