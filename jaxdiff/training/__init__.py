"""Training: the state and optimizer, the sharded train step, the loop and its writers.

Example::

  from jaxdiff import training
  training.train(config, "runs/fashion_mnist")      # resumes if the workdir has checkpoints
  print(training.dry_run(config))                   # sizes, shapes and memory; no data
"""

from jaxdiff.training.loop import NonFiniteLossError, TrainingStopped, stream, train
from jaxdiff.training.resume import ResumeRefusedError, read_history
from jaxdiff.training.state import (
  TrainState,
  abstract_state,
  build,
  create_state,
  ema_decay,
  init_state,
  learning_rate_schedule,
  make_optimizer,
)
from jaxdiff.training.step import jit_train_step, make_loss_fn, make_train_step
from jaxdiff.training.summary import dry_run
from jaxdiff.training.validation import ConfigError, validate
from jaxdiff.training.writers import MetricsLog, plot_losses

__all__ = [
  "ConfigError",
  "MetricsLog",
  "NonFiniteLossError",
  "ResumeRefusedError",
  "TrainState",
  "TrainingStopped",
  "abstract_state",
  "build",
  "create_state",
  "dry_run",
  "ema_decay",
  "init_state",
  "jit_train_step",
  "learning_rate_schedule",
  "make_loss_fn",
  "make_optimizer",
  "make_train_step",
  "plot_losses",
  "read_history",
  "stream",
  "train",
  "validate",
]
