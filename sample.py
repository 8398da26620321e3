"""Sample images from a trained run: a thin wrapper over ``python -m jaxdiff.cli.sample``.

  python sample.py --workdir runs/fmnist --num_samples 64 --sampler ddim --steps 50 --seed 0 \\
    --out runs/fmnist/grid
"""

from jaxdiff.cli.sample import run

if __name__ == "__main__":
  run()
