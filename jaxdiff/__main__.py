"""``python -m jaxdiff COMMAND ...``: the same as the ``jaxdiff`` console script."""

from jaxdiff.cli import main

if __name__ == "__main__":
  main()
