"""MNIST, 28x28 grey: the Fashion-MNIST model on digits."""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.data.name = "mnist"
  config.data.manual_dir = "../shared/data/mnist"
  return config
