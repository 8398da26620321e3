"""Latent diffusion with a DiT (Peebles & Xie 2023) on the 8x8x4 latents of
``fashion_mnist_autoencoder.py``'s run: patch size 2 gives 16 tokens (patch 1: 64)::

  jaxdiff train --config configs/fashion_mnist_latent_dit.py --workdir runs/fm_latent_dit \\
    --config.latent.autoencoder_workdir=runs/fm_autoencoder
"""

import os

from jaxdiff.config import from_file


def get_config():
  config = from_file(os.path.join(os.path.dirname(__file__), "fashion_mnist_latent.py"))
  config.model.name = "dit"
  config.model.patch_size = 2
  config.model.hidden_size = 192
  config.model.depth = 6
  config.model.num_heads = 4
  config.model.mlp_ratio = 4.0
  config.training.learning_rate = 5e-4
  return config
