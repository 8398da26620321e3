"""Convert pytorch-fid's Inception weights to jaxdiff's ``.npz`` format (needs ``torch``).

  python -m jaxdiff.cli.convert_inception pt_inception-2015-12-05-6726825d.pth inception.npz

The file format is described in ``jaxdiff.evaluation.inception``.
"""

from __future__ import annotations

from absl import app


def main(argv: list[str]) -> None:
  """``argv = [prog, IN.pth, OUT.npz]``; a known error is one line on stderr (exit status 1)."""
  if len(argv) != 3:
    raise app.UsageError("usage: python -m jaxdiff.cli.convert_inception IN.pth OUT.npz")
  from jaxdiff.evaluation import featurenet, inception

  _, source, target = argv
  try:
    inception.convert(source, target)
  except (ImportError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {target} (sha256 prefix {featurenet.file_digest(target)})")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
