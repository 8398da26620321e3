"""Train a diffusion model: the same as ``jaxdiff train`` (see ``jaxdiff/cli/train.py``).

  python train.py --config configs/fashion_mnist.py --workdir runs/fmnist \\
      --config.data.manual_dir=../shared/data/fashion_mnist
"""

import sys

from jaxdiff.cli import run_command

if __name__ == "__main__":
  run_command("train", sys.argv)
