"""Fashion-MNIST as a DDPM: the README's main job until 2026-12-01.

``fashion_mnist.py``'s U-Net, data and training, with the discrete chain of Ho et al. (2020):
1,000 linear-schedule steps, eps-prediction, t uniform, DDIM-100 samples. The README's studies
"Fashion-MNIST on this CPU" (``benchmarks/study_fashion_mnist.py``) and the DDPM row of "The
noise processes at one budget" were measured with it.
"""

import os

from jaxdiff.config import from_file


def get_config():
  config = from_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"))
  config.diffusion.process = "ddpm"
  config.diffusion.t_sampler = ""  # the process's own: uniform for ddpm
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 100
  return config
