"""Train the classifier feature network on a config's dataset and write it to one file.

  python -m jaxdiff.cli.train_classifier --config configs/fashion_mnist.py --out fmnist.npz

Prints one JSON line (test accuracy, steps, seconds, final loss, path). To make the default
classifier that ``python -m jaxdiff.cli.evaluate --metric fid`` looks for, pass the ``--out``
its error message names (or run that command with ``--train_classifier``).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

# The defaults repeat jaxdiff.training.classifier's, so that defining the flags imports no JAX.
flags.DEFINE_string("out", None, "The .npz file to write.")
flags.DEFINE_integer("steps", 700, "Training steps.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "Initialisation and data-order seed.")
flags.DEFINE_string("eval_split", "test", "The split the accuracy is measured on.")
config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
flags.mark_flags_as_required(["config", "out"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Trains, writes ``--out`` and prints the result; an expected error is one line on stderr."""
  from jaxdiff.cli import start_jax

  start_jax(argv)
  from jaxdiff import data
  from jaxdiff.training import classifier

  try:
    result = classifier.train(
      FLAGS.config,
      FLAGS.out,
      steps=FLAGS.steps,
      batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate,
      eval_split=FLAGS.eval_split,
      seed=FLAGS.seed,
    )
  except (ValueError, FileNotFoundError, data.DatasetNotPreparedError) as e:
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(result), flush=True)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
