"""DDPM on CIFAR-10: the paper's 35.7M-parameter U-Net and training setup.

Ho et al. 2020, sec. 4 and App. B: 32x32 images, U-Net with ch=128, ch_mult=(1, 2, 2, 2), two
residual blocks per resolution, self-attention at 16x16, dropout 0.1; T=1000 linear betas
1e-4..0.02, epsilon prediction, fixed sigma_t^2 = beta_t; Adam at 2e-4 with 5000 warmup steps,
batch 128, gradient clipping at 1, EMA 0.9999, random horizontal flips, 800k steps.
"""

import ml_collections

from jaxdiff.config import get_config as defaults


def get_config() -> ml_collections.ConfigDict:
  """The DDPM CIFAR-10 config (locked; derived from jaxdiff.config)."""
  config = defaults()

  data = config.data
  data.name = "cifar10"
  data.image_size = 32
  data.channels = 3
  data.random_flip = True

  model = config.model
  model.name = "unet"
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resblock = "ddpm"
  model.resample_with_conv = True
  model.scale_shift_norm = False
  model.attention = "standard"
  model.num_heads = 1
  model.num_head_channels = -1
  model.num_groups = 32
  model.class_conditional = False

  diffusion = config.diffusion
  diffusion.schedule = "linear"
  diffusion.num_timesteps = 1000
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.mean_type = "eps"
  diffusion.var_type = "fixed_large"

  training = config.training
  training.learning_rate = 2e-4
  training.batch_size = 128
  training.ema_decay = 0.9999
  training.ema_warmup = False  # DDPM averages with a plain 0.9999 from the start
  training.warmup_steps = 5000
  training.grad_clip = 1.0
  training.num_steps = 800_000
  return config
