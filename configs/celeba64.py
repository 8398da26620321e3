"""CelebA at 64x64 (center crop + resize), the improved-diffusion-style U-Net.

tfds' celeb_a needs its raw files (``data.manual_dir``) or a download to prepare.
"""

from jaxdiff.config import get_config as defaults


def get_config():
  config = defaults()
  config.data.name = "celeb_a"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.random_flip = True
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.resblock = "biggan"
  config.model.scale_shift_norm = True
  config.model.num_head_channels = 64
  config.diffusion.schedule = "cosine"
  config.diffusion.var_type = "learned_range"
  config.diffusion.loss_type = "hybrid"
  config.training.batch_size = 64
  config.training.num_steps = 500_000
  config.training.learning_rate = 1e-4
  config.training.ema_decay = 0.9999
  config.training.checkpoint_every = 5000
  config.training.sample_every = 10_000
  return config
