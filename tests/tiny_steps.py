"""One train step and a few samples of a tiny config, on one device: the end-to-end check of a
diffusion choice without the training loop's checkpoint writes (the loop itself is covered by
``tests/test_training.py``)."""

from __future__ import annotations

import chex
import jax
import numpy as np

from jaxdiff import models, parallel, training
from jaxdiff.sampling import sample_from_config


def train_step_and_sample(config, num_samples: int = 4, **sampling) -> tuple[dict, np.ndarray]:
  """The metrics of one sharded train step of ``config`` on random 8-bit images, and
  ``num_samples`` samples of the stepped EMA parameters drawn as ``config.sampling`` says
  (``sampling``: overrides such as ``sampler=``)."""
  mesh = parallel.make_mesh(1)
  graphdef, _, optimizer, diffusion = training.build(config)
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  step = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  rng = np.random.default_rng(0)
  size, channels = config.data.image_size, config.data.channels
  pixels = rng.integers(0, 256, (config.training.batch_size, size, size, channels))
  batch = {
    "image": (pixels / 127.5 - 1).astype(np.float32),
    "label": rng.integers(0, config.data.num_classes, (config.training.batch_size,)),
  }
  state, metrics = step(state, parallel.global_batch(mesh, batch), jax.random.key(1))
  chex.assert_tree_all_finite(metrics)
  model_fn = models.bind(graphdef, state.ema_params)
  samples = sample_from_config(
    config, diffusion, model_fn, jax.random.key(2), num_samples, mesh=mesh, **sampling
  )
  return jax.device_get(metrics), samples
