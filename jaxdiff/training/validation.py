"""One validation pass over a run config, before anything is written or compiled.

Bad values used to surface late: ``keep_checkpoints=0`` deleted every checkpoint, a zero
``log_every`` divided by zero after the first step, an unknown sampler failed at the first sample
grid. :func:`problems` returns every problem at once, one line per bad field naming the field, its
value and what is allowed::

  training.learning_rate=-1.0: must be a number > 0
  model.attn_resolutions=(13,): each must be one of the U-Net's resolutions 28, 14, 7

and :func:`validate` raises them together as one :class:`ConfigError`. Each room checks its own
section (``config.check_schema``, ``models.check_config``, ``core.process.check_config``,
``sampling.check_sampling``, the evaluator's ``problems``); the training and data sections are
checked here. Nothing is compiled or allocated: the model is traced with ``eval_shape`` only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from jaxdiff import config as config_lib
from jaxdiff import latent, models, prompts
from jaxdiff.checks import is_int, is_number
from jaxdiff.core import diffusion, losses, process
from jaxdiff.data import preparation
from jaxdiff.io import files
from jaxdiff.sampling import check_sampling
from jaxdiff.training import autoencoder, evaluator

# What jaxdiff.training.state's make_optimizer / learning_rate_schedule implement.
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
IMAGE_CHANNELS = (1, 3)  # grey or RGB: what the data sources convert images to


class ConfigError(ValueError):
  """A run config with problems; ``problems`` holds them, one line each."""

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    if len(self.problems) == 1:
      message = f"the config has 1 problem: {self.problems[0]}"
    else:
      message = f"the config has {len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
    super().__init__(message)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises :class:`ConfigError` listing every problem :func:`problems` finds.

  Args:
    config: the run config.
    num_devices: the devices the global batch is split over; None: ``jax.device_count()``.
  """
  lines = problems(config, num_devices)
  if lines:
    raise ConfigError(lines)


def problems(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[str]:
  """Every problem with ``config``, one line each; empty when the run can start.

  Unknown keys and types come first. A missing or mistyped field stops there: range checks on
  it would only add noise (or fail themselves). A field that two rooms read (``data.channels``
  for the data and the model) is reported once, by the first.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  unknown = config_lib.unknown_keys(config)
  mistyped = config_lib.type_problems(config)
  if mistyped:
    return unknown + mistyped
  lines = unknown + data_problems(config)
  name = config.data.name
  if name != "image_folder" and isinstance(name, str) and name:
    try:
      preparation.tfds_builder(name, config.data.data_dir)
    except ValueError as e:
      lines.append(str(e))
  if config_lib.is_latent(config):
    latent_lines = latent.problems(config)
    if latent_lines:  # without its autoencoder the model's shapes are unknown
      return _one_per_field(lines + latent_lines)
    config = latent.resolve(config)
  if config_lib.is_text(config):
    text_lines = prompts.problems(config)
    if text_lines:  # without its encoder the model's token width is unknown
      return _one_per_field(lines + text_lines)
    config = prompts.resolve(config)
  lines += autoencoder.problems(config)
  lines += models.check_config(config)
  lines += process.check_config(config.diffusion)
  if config.diffusion.process == "ddpm":
    lines += _loss_problems(config.diffusion)
  lines += training_problems(config, num_devices)
  lines += check_sampling(config)
  lines += evaluator.problems(config)
  return _one_per_field(lines)


def _one_per_field(lines: list[str]) -> list[str]:
  seen, kept = set(), []
  for line in lines:
    field = line.split("=", 1)[0]
    if " " in field or ":" in field:  # not a "key=value: ..." line: keep it as it is
      field = line
    if field not in seen:
      seen.add(field)
      kept.append(line)
  return kept


def _in_unit(x: Any, *, closed: bool) -> bool:
  """x in [0, 1] (``closed``) or [0, 1)."""
  return is_number(x) and x >= 0.0 and (x <= 1.0 if closed else x < 1.0)


def _loss_problems(dcfg: Any) -> list[str]:
  """``diffusion.loss_type`` by the losses' own check (core.diffusion cannot ask: losses import
  it)."""
  if dcfg.loss_type not in losses.LOSS_TYPES:
    return [
      f"diffusion.loss_type={dcfg.loss_type!r}: must be one of {', '.join(losses.LOSS_TYPES)}"
    ]
  if dcfg.var_type not in diffusion.VAR_TYPES:
    return []  # diffusion.check_config names it
  # check_loss_type asks the diffusion only for its variance: a one-step one will do.
  probe = diffusion.make_diffusion([0.5], var_type=dcfg.var_type)
  try:
    losses.check_loss_type(probe, dcfg.loss_type)
  except ValueError as e:
    return [f"diffusion.loss_type={dcfg.loss_type!r}: {e}"]
  return []


def training_problems(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  """The ``seed`` and the ``training`` section, for a global batch split over ``num_devices``."""
  tcfg, lines = config.training, []

  def need(ok: bool, name: str, allowed: str) -> None:
    if not ok:
      lines.append(f"training.{name}={tcfg[name]!r}: {allowed}")

  if not (is_int(config.seed, 0) and config.seed < 2**32):
    lines.append(f"seed={config.seed!r}: must be an int in [0, 2**32)")
  lines += _batch_problems(tcfg, num_devices)
  need(is_int(tcfg.num_steps, 1), "num_steps", "must be an int >= 1")
  need(tcfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
  lr = tcfg.learning_rate
  need(is_number(lr) and math.isfinite(lr) and lr > 0, "learning_rate", "must be a number > 0")
  wd = tcfg.weight_decay
  need(is_number(wd) and math.isfinite(wd) and wd >= 0, "weight_decay", "must be a number >= 0")
  for name in ("b1", "b2"):
    need(_in_unit(tcfg[name], closed=False), name, "must be a number in [0, 1)")
  need(is_int(tcfg.warmup_steps, 0), "warmup_steps", "must be an int >= 0")
  need(tcfg.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
  clip = tcfg.grad_clip
  need(is_number(clip) and math.isfinite(clip), "grad_clip",
       "must be a finite number (the largest global norm; <= 0 disables clipping)")  # fmt: skip
  need(_in_unit(tcfg.ema_decay, closed=True), "ema_decay", "must be a number in [0, 1]")
  need(is_int(tcfg.checkpoint_every, 1), "checkpoint_every", "must be an int >= 1")
  need(is_int(tcfg.keep_checkpoints, 1), "keep_checkpoints",
       "must be an int >= 1 (the newest checkpoint is always kept)")  # fmt: skip
  need(is_int(tcfg.log_every, 1), "log_every", "must be an int >= 1")
  need(is_int(tcfg.sample_every, 0), "sample_every", "must be an int >= 0 (0: no sample grids)")
  for name in ("tensorboard", "ema_warmup", "fsdp"):
    need(isinstance(tcfg[name], bool), name, "must be a bool (True or False)")
  need(isinstance(tcfg.wandb_project, str), "wandb_project", "must be a str ('' = no wandb)")
  return lines


def _batch_problems(tcfg: ml_collections.ConfigDict, num_devices: int) -> list[str]:
  """The global batch splits over the devices, and (with accumulation) so does each micro-batch:
  the train step reshapes the batch to ``[accum, B // accum, ...]`` and scans over the first
  axis, so every micro-batch is spread over the data axis."""
  batch, accum = tcfg.batch_size, tcfg.grad_accum_steps
  devices = f"the {num_devices} device{'s' if num_devices != 1 else ''}"
  if not is_int(batch, 1):
    return [f"training.batch_size={batch!r}: must be an int >= 1"]
  if batch % num_devices:
    return [f"training.batch_size={batch!r}: must be a multiple of {devices}"]
  if not is_int(accum, 1) or batch % accum:
    return [f"training.grad_accum_steps={accum!r}: must be an int >= 1 dividing batch_size={batch}"]
  if (batch // accum) % num_devices:
    return [
      f"training.grad_accum_steps={accum!r}: each micro-batch of batch_size // grad_accum_steps"
      f" = {batch // accum} must be a multiple of {devices}"
    ]
  return []


def data_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The ``data`` section's values, as far as they need no dataset: whether tfds knows
  ``data.name`` is asked by :func:`problems`."""
  data, lines = config.data, []

  def need(ok: bool, name: str, allowed: str) -> None:
    if not ok:
      lines.append(f"data.{name}={data[name]!r}: {allowed}")

  need(isinstance(data.name, str) and bool(data.name), "name",
       "must name a tfds dataset or be 'image_folder'")  # fmt: skip
  need(isinstance(data.split, str) and bool(data.split), "split", "must name a split, e.g. 'train'")
  need(is_int(data.image_size, 1), "image_size", "must be an int >= 1")
  need(data.channels in IMAGE_CHANNELS, "channels", "must be 1 (grey) or 3 (RGB)")
  need(is_int(data.num_classes, 1), "num_classes", "must be an int >= 1")
  need(is_int(data.num_workers, 0), "num_workers", "must be an int >= 0 (0: no worker processes)")
  need(is_int(data.prefetch, 0), "prefetch", "must be an int >= 0")
  if data.name == "image_folder":
    folder = data.image_folder
    if not folder:
      need(False, "image_folder", "must name a directory of images when data.name='image_folder'")
    elif not files.is_uri(folder) and not files.as_path(folder).is_dir():
      need(False, "image_folder", "must be an existing directory of images")
  return lines
