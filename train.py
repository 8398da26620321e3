"""Train a diffusion model: a thin wrapper over ``python -m jaxdiff.cli.train``.

python train.py --config configs/fashion_mnist.py --workdir runs/fmnist
python train.py --config configs/cifar10.py --workdir /tmp/c --dry_run
"""

from jaxdiff.cli.train import run

if __name__ == "__main__":
  run()
