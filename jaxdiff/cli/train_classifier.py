"""Train the classifier feature network (what ``jaxdiff evaluate --metric fd`` uses by default)
on a config's dataset.

  jaxdiff train-classifier --config configs/fashion_mnist.py \\
      --config.data.manual_dir=../shared/data/fashion_mnist
  jaxdiff train-classifier --config my_config.py --out weights/ --train_steps 2000

Writes ``OUT/classifier-{dataset}-{size}x{channels}.npz``. ``--out`` defaults to the cache
(``config.eval.cache_dir``, else ``$JAXDIFF_CACHE`` or ``~/.cache/jaxdiff``), where ``evaluate``
and evaluation inside training look for it; elsewhere, pass the file as ``--features_path``.
Prints one JSON line (test accuracy, steps, seconds, final loss, path).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from jaxdiff import cli
from jaxdiff.cli import overrides

# The defaults repeat jaxdiff.training.classifier's, so that defining the flags imports no JAX.
flags.DEFINE_string("out", None, "Output directory (default: the cache; see above).")
flags.DEFINE_integer("train_steps", 700, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "Initialisation and data-order seed.")
flags.DEFINE_string("eval_split", "test", "The split the accuracy is measured on.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
cli.define_common_flags()
flags.declare_key_flag("compilation_cache_dir")
FLAGS = flags.FLAGS


def _train() -> None:
  from jaxdiff import data, evaluation
  from jaxdiff.training import classifier

  config = FLAGS.config
  # As `jaxdiff train` does: a tfds dataset is prepared from data.manual_dir (a no-op if it is).
  data.prepare(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  out = FLAGS.out or config.eval.cache_dir or None
  path = evaluation.default_classifier_path(config.data, out)
  result = classifier.train(
    config, path, steps=FLAGS.train_steps, batch_size=FLAGS.batch_size,
    learning_rate=FLAGS.learning_rate, eval_split=FLAGS.eval_split, seed=FLAGS.seed,
    progress=True,
  )  # fmt: skip
  print(json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
  """Trains, writes into ``--out`` and prints the result; an expected error is one line."""
  from absl import app

  for name in ("train_steps", "batch_size"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value}: an integer >= 1")
  if FLAGS.learning_rate <= 0:
    raise app.UsageError(f"--learning_rate={FLAGS.learning_rate}: a number > 0")
  if FLAGS.out:
    overrides.check_out_dir(FLAGS.out)
  cli.start_jax(argv)
  cli.reporting_errors(_train)


if __name__ == "__main__":
  cli.run_main(main)
