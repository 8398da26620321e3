"""Prepare a tfds dataset once as array_record (needs ``pip install 'jaxdiff[prepare]'``).

  python -m jaxdiff.cli.prepare --name fashion_mnist --manual_dir ../shared/data/fashion_mnist \\
      --data_dir ~/tensorflow_datasets

Training prepares its dataset itself when ``data.manual_dir`` is set; this is for doing it once
by hand (or on one host before a multi-host run).
"""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_string("name", None, "tfds name, e.g. fashion_mnist.")
flags.DEFINE_string("data_dir", "", "tfds data_dir ('' = ~/tensorflow_datasets).")
flags.DEFINE_string("manual_dir", "", "Folder with the official raw files ('' = download).")
flags.mark_flags_as_required(["name"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Prepares the dataset and prints its split sizes; a known error is one line on stderr."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxdiff.data import preparation

  if FLAGS.name == "image_folder":
    print("image_folder reads its files directly: nothing to prepare")
    return
  try:
    preparation.prepare(FLAGS.name, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
  except (preparation.DatasetNotPreparedError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  builder = preparation.tfds_builder(FLAGS.name, FLAGS.data_dir)
  sizes = preparation.split_sizes(FLAGS.name, FLAGS.data_dir)
  print(f"{FLAGS.name} prepared in {builder.data_dir}: {sizes}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
