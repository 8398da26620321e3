"""A model and run small enough for tests: seconds on one CPU core."""

from jaxdiff.config import get_config as defaults


def get_config():
  config = defaults()
  config.data.image_size = 8
  config.data.channels = 1
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.model.hidden_size = 32
  config.model.depth = 2
  config.model.patch_size = 2
  config.diffusion.schedule = "cosine"  # linear at T=20 would reach beta = 1
  config.diffusion.num_timesteps = 20
  config.training.batch_size = 8
  config.training.num_steps = 4
  config.training.warmup_steps = 2
  config.training.checkpoint_every = 2
  config.training.log_every = 1
  config.training.sample_every = 0
  config.sampling.num_steps = 5
  config.sampling.num_samples = 4
  config.eval.num_examples = 8
  config.eval.batch_size = 8
  return config
