"""MNIST, 28x28 grey: the Fashion-MNIST model on digits."""

import os

from jaxdiff.config import from_file


def get_config():
  config = from_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"))
  config.data.name = "mnist"
  return config
