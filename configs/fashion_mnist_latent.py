"""Latent diffusion on Fashion-MNIST (Rombach et al. 2022): a DDPM U-Net on the 8x8x4 latents
of ``fashion_mnist_autoencoder.py``'s run, whose workdir ``latent.autoencoder_workdir`` names::

  jaxdiff train --config configs/fashion_mnist_latent.py --workdir runs/fm_latent \\
    --config.latent.autoencoder_workdir=runs/fm_autoencoder

The training split is encoded once (cached in the autoencoder's workdir); samples are decoded
back to 28x28 images by ``jaxdiff sample`` as for a pixel run.
"""

from jaxdiff.config import get_config as defaults


def get_config():
  config = defaults()
  config.data.name = "fashion_mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.latent.autoencoder_workdir = "runs/fm_autoencoder"
  config.model.name = "unet"
  config.model.ch = 64
  config.model.ch_mult = (1, 2)  # 8 -> 4
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 16
  config.model.dropout = 0.0
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.training.batch_size = 64
  config.training.num_steps = 3000
  config.training.learning_rate = 1e-3
  config.training.warmup_steps = 100
  config.training.ema_decay = 0.995
  config.training.checkpoint_every = 500
  config.training.log_every = 25
  config.training.sample_every = 1000
  # Latents are not confined to [-1, 1] as pixels are.
  config.sampling.clip_denoised = False
  config.eval.clip_denoised = False
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 100
  config.sampling.num_samples = 64
  return config
