"""Fashion-MNIST's autoencoder for latent diffusion (LDM's KL-f4): 28x28x1 -> 8x8x4.

Images are edge-padded to 32x32 (28 is not a multiple of 4 * 2, the latent side the U-Net and a
DiT of patch 2 need) and the decoder's output is cropped back to 28x28. L1 + L2 reconstruction and
LDM's small KL weight; no perceptual or adversarial term (both are options: see
``config.autoencoder``). Train it first, then ``fashion_mnist_latent.py`` on top::

  jaxdiff train --config configs/fashion_mnist_autoencoder.py --workdir runs/fm_autoencoder
"""

from jaxdiff.config import get_config as defaults


def get_config():
  config = defaults()
  config.data.name = "fashion_mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.model.name = "autoencoder"
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 2)  # f = 4
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.autoencoder.latent_channels = 4
  config.autoencoder.padded_size = 32
  config.autoencoder.kl_weight = 1e-6
  config.autoencoder.l2_weight = 1.0
  config.training.batch_size = 64
  config.training.num_steps = 600
  config.training.learning_rate = 5e-4
  config.training.warmup_steps = 100
  config.training.ema_decay = 0.995
  config.training.checkpoint_every = 100
  config.training.log_every = 25
  config.training.sample_every = 300
  config.sampling.num_samples = 32  # the grid: 16 images above their reconstructions
  return config
