"""Sample images from a trained run: the same as ``jaxdiff sample`` (see ``jaxdiff/cli/sample.py``).

  python sample.py --workdir runs/fmnist --num_samples 64 --sampler ddim --steps 50 --seed 0 \\
      --out runs/fmnist/grid
"""

import sys

from jaxdiff.cli import run_command

if __name__ == "__main__":
  run_command("sample", sys.argv)
