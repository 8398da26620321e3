"""Convert pytorch-fid's InceptionV3 weights to jaxdiff's ``.npz`` format (needs ``torch``).

  jaxdiff convert-inception --weights pt_inception-2015-12-05-6726825d.pth --out weights/

Writes ``OUT/inception.npz`` (the format is described in ``jaxdiff.evaluation.inception``); pass
that file to ``jaxdiff evaluate --metric fid --features_path OUT/inception.npz``.
"""

from __future__ import annotations

from absl import flags

from jaxdiff import cli
from jaxdiff.cli import overrides

flags.DEFINE_string("weights", None, "pytorch-fid's pt_inception-2015-12-05-*.pth.")
flags.DEFINE_string("out", None, "Output directory (made if missing).")
flags.mark_flags_as_required(["weights", "out"])
FLAGS = flags.FLAGS
FILE_NAME = "inception.npz"


def _convert() -> None:
  from jaxdiff.evaluation import featurenet, inception
  from jaxdiff.io import files

  target = files.as_path(FLAGS.out) / FILE_NAME
  inception.convert(FLAGS.weights, target)
  print(f"wrote {target} (sha256 prefix {featurenet.file_digest(target)})")


def main(argv: list[str]) -> None:
  """Converts ``--weights`` into ``--out``; a known error is one line on stderr (status 1)."""
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  overrides.check_out_dir(FLAGS.out)
  cli.reporting_errors(_convert)


if __name__ == "__main__":
  cli.run_main(main)
