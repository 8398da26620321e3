"""Prepare a tfds dataset once as array_record (needs ``pip install 'jaxdiff[prepare]'``).

  jaxdiff prepare --name fashion_mnist --manual_dir ../shared/data/fashion_mnist
  jaxdiff prepare --name mnist --data_dir gs://bucket/tensorflow_datasets

Training prepares its dataset itself (once, on process 0), so this is for doing it ahead of
time: on one machine before a multi-host run, or into shared storage.
"""

from __future__ import annotations

from absl import flags

from jaxdiff import cli

flags.DEFINE_string("name", None, "tfds name, e.g. fashion_mnist (config.data.name).")
flags.DEFINE_string("data_dir", "", "tfds data_dir ('' = ~/tensorflow_datasets; or gs://...).")
flags.DEFINE_string("manual_dir", "", "Folder with the official raw files ('' = download).")
flags.mark_flags_as_required(["name"])
FLAGS = flags.FLAGS


def _prepare() -> None:
  from jaxdiff.data import preparation

  if FLAGS.name == "image_folder":
    print("image_folder reads its files directly: nothing to prepare")
    return
  preparation.prepare(FLAGS.name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
  builder = preparation.tfds_builder(FLAGS.name, FLAGS.data_dir)
  sizes = preparation.split_sizes(FLAGS.name, FLAGS.data_dir)
  print(f"{FLAGS.name} prepared in {builder.data_dir}: {sizes}")


def main(argv: list[str]) -> None:
  """Prepares the dataset and prints its split sizes; a known error is one line on stderr."""
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.reporting_errors(_prepare)


if __name__ == "__main__":
  cli.run_main(main)
