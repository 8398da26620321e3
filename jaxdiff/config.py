"""The configuration schema: every key jaxdiff reads, with its default.

A config file, in any folder, defines ``get_config()`` and starts from this one::

  # my_config.py
  from jaxdiff.config import get_config as defaults

  def get_config():
    config = defaults()
    config.data.name = "mnist"
    config.training.num_steps = 5000
    return config

``jaxdiff train --config my_config.py --config.training.batch_size=64`` then loads it, with
overrides. The dict is locked: a misspelt key (``--config.training.batchsize=8``) is an error,
not a silent new field. To build on another config file rather than on the defaults, load it by
path with :func:`from_file` (a config folder is not a package that can be imported).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import numbers
import os
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from etils import epath


# Long: the schema is one flat list of fields, one per line, read top to bottom.
def get_config() -> ml_collections.ConfigDict:
  """The defaults (locked): a 28x28 grey DDPM U-Net on Fashion-MNIST, T = 1000."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.name = "fashion_mnist"  # any tfds image dataset, or "image_folder"
  data.split = "train"
  data.data_dir = ""  # tfds data_dir; "" = tfds' default (~/tensorflow_datasets)
  data.manual_dir = ""  # folder with the dataset's official raw files (offline prepare)
  data.image_folder = ""  # with name == "image_folder": a directory of PNG/JPEG files
  data.skip_bad_images = False  # image_folder: skip unreadable files with a warning (else: error)
  data.image_size = 28
  data.channels = 1
  data.num_classes = 10  # used only when model.class_conditional
  data.random_flip = False
  data.num_workers = 0  # grain worker processes; 0 reads in the main process
  data.prefetch = 2

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # "unet" | "dit" | "autoencoder" (trains config.autoencoder's model)
  # U-Net (Ho et al. 2020, App. B, and improved-diffusion variants).
  model.ch = 64
  model.ch_mult = (1, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (14,)
  model.dropout = 0.1
  model.resblock = "ddpm"  # "ddpm" | "biggan" | "convnext"
  model.resample_with_conv = True
  model.scale_shift_norm = False  # AdaGN time conditioning (improved-diffusion)
  model.attention = "standard"  # "standard" | "linear"
  model.num_heads = 1
  model.num_head_channels = -1  # > 0 overrides num_heads
  model.num_groups = 32  # GroupNorm groups (DDPM: 32)
  model.class_conditional = False
  model.class_dropout = 0.1  # label dropout for classifier-free guidance
  model.compute_dtype = "float32"  # "float32" | "bfloat16" (params stay float32)
  model.remat = False
  # DiT (Peebles & Xie 2023).
  model.patch_size = 2
  model.hidden_size = 192
  model.depth = 6
  model.mlp_ratio = 4.0

  # ---------------------------------------------------------------- autoencoder
  # With model.name = "autoencoder" the run trains LDM's KL autoencoder (Rombach et al. 2022):
  # its encoder and decoder use model.ch, ch_mult (f = 2 ** (len - 1)), num_res_blocks,
  # attn_resolutions (of the padded image), num_groups, num_heads and dropout.
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.latent_channels = 4
  ae.padded_size = 0  # images are edge-padded to this side and cropped back; 0 = data.image_size
  ae.kl_weight = 1e-6  # beta of the KL term (LDM: 1e-6)
  ae.l2_weight = 0.0  # reconstruction = L1 + l2_weight * L2
  ae.perceptual_weight = 0.0  # > 0: squared distance of the dataset classifier's features
  ae.disc_weight = 0.0  # > 0: a PatchGAN with the hinge loss
  ae.disc_start = 1000  # the adversarial terms count from this step on (LDM's warm-up)
  ae.disc_ch = 32
  ae.disc_layers = 2
  ae.scale_examples = 2048  # training images whose latents set the stored scale factor

  # ---------------------------------------------------------------- latent
  # Diffusion in an autoencoder's latent space (LDM): set autoencoder_workdir to a finished
  # autoencoder run. The training split is encoded once into a cache keyed by its checkpoint.
  config.latent = latent = ml_collections.ConfigDict()
  latent.autoencoder_workdir = ""  # "" = pixel space
  latent.autoencoder_step = ml_collections.config_dict.placeholder(int)  # None = newest
  latent.sample = False  # cache a seeded posterior draw instead of the posterior mean
  latent.cache_dir = ""  # "" = AUTOENCODER_WORKDIR/latents
  latent.encode_batch_size = 512
  # Filled in from the autoencoder when the run starts (and stored in config.json):
  latent.size = ml_collections.config_dict.placeholder(int)
  latent.channels = ml_collections.config_dict.placeholder(int)
  latent.scale_factor = ml_collections.config_dict.placeholder(float)
  latent.digest = ""  # of the autoencoder checkpoint the run trains on

  # ---------------------------------------------------------------- text
  # Text-to-image: every training image gets a caption (made from its label and measured
  # attributes for mnist / fashion_mnist; captions.jsonl or a .txt beside each image of an
  # image folder; a tfds dataset's text feature), and the denoiser attends to its encoding.
  config.text = text = ml_collections.ConfigDict()
  # "" = no text; "minilm" = all-MiniLM-L6-v2, frozen (jaxdiff[text]); "transformer" = a small
  # byte-level transformer trained jointly with the denoiser (GLIDE); "file" = precomputed
  # embeddings read from encoder_path (an encoder run elsewhere: T5, CLIP, ...).
  text.encoder = ""
  # minilm: another BERT's folder (model.safetensors, tokenizer.json), "" = the packaged MiniLM;
  # file: the .npz of embeddings (jaxdiff.text_files).
  text.encoder_path = ""
  # Tokens per caption: minilm's [CLS] and [SEP] included; the transformer's UTF-8 bytes plus
  # BOS and EOS (a caption needs about 3x as many as minilm's); a file's own length.
  text.max_length = 16
  text.caption_dropout = 0.1  # captions replaced by the empty prompt (classifier-free guidance)
  text.cache_dir = ""  # encoded caption tables; "" = $JAXDIFF_CACHE/text or ~/.cache/jaxdiff/text
  text.feature = ""  # a tfds dataset's text feature holding each image's caption
  text.transformer = ml_collections.ConfigDict()  # encoder="transformer" only
  text.transformer.width = 256
  text.transformer.depth = 4
  text.transformer.num_heads = 4
  # Filled in from the encoder when the run starts (and stored in config.json): its token
  # width, and a frozen encoder's SHA-256 (minilm: weights and tokenizer; file: the .npz), which a
  # resumed run and every later read of the run check, so changed encoder files never go unseen.
  text.width = ml_collections.config_dict.placeholder(int)
  text.digest = ml_collections.config_dict.placeholder(str)

  # ---------------------------------------------------------------- diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  # "ddpm" (the discrete chain) | "flow" (rectified flow; samplers "euler", "heun");
  # "edm" (Karras et al. 2022; samplers "heun", "euler", "edm_stochastic"). Flow reads
  # t_sampler, loss_type (mse, l1, huber) and logit_mean..time_shift; EDM reads sigma_data..rho;
  # "vdm" (Kingma et al. 2021; samplers "vdm", "vdm_ddim") reads t_sampler and vdm_schedule..
  # fourier_features; the others are ddpm's.
  diffusion.process = "ddpm"
  diffusion.schedule = "linear"  # see jaxdiff.core.schedules.SCHEDULES
  diffusion.num_timesteps = 1000
  # None: the schedule's default (linear: 1e-4..0.02 scaled by 1000 / T).
  diffusion.beta_start = ml_collections.config_dict.placeholder(float)
  diffusion.beta_end = ml_collections.config_dict.placeholder(float)
  diffusion.beta = ml_collections.config_dict.placeholder(float)  # "constant" only
  diffusion.mean_type = "eps"  # "eps" | "x0" | "v"
  diffusion.var_type = "fixed_large"  # "fixed_small" | "fixed_large" | "learned" | "learned_range"
  diffusion.loss_type = "mse"  # "mse" | "l1" | "huber" | "kl" | "hybrid"
  diffusion.min_snr_gamma = 0.0  # > 0 enables min-SNR-gamma weighting
  # How training draws t; "" = the process's own: uniform (ddpm, flow), log_normal (edm),
  # low_discrepancy (vdm). Else "uniform" | "importance" (ddpm) | "logit_normal" (flow).
  diffusion.t_sampler = ""
  # Rescale the schedule to alpha_bar_T = 0 (Lin et al. 2024); needs mean_type "v" (or "x0").
  diffusion.zero_terminal_snr = False
  # Flow: logit-normal training times sigmoid(m + s n) (SD3 eq. 19), and the shift
  # t' = f t / (1 + (f - 1) t) (SD3 eq. 23) of the training times and the sampling grid.
  diffusion.logit_mean = 0.0
  diffusion.logit_std = 1.0
  diffusion.time_shift = 1.0
  # EDM (Karras et al. 2022; t_sampler log_normal, loss_type "mse"): the data's std (0.5 for
  # [-1, 1]), ln sigma ~ N(p_mean, p_std^2) in training, and the sampling grid's sigma range and
  # rho (eq. 5), which also map c_noise onto the backbone's time range.
  diffusion.sigma_data = 0.5
  diffusion.p_mean = -1.2
  diffusion.p_std = 1.2
  diffusion.sigma_min = 0.002
  diffusion.sigma_max = 80.0
  diffusion.rho = 7.0
  # VDM (process "vdm"; Kingma et al. 2021): t_sampler low_discrepancy (VDM's) | "uniform";
  # the schedule gamma(t) "learned" (a monotone network, in the model's params) | "fixed" (the
  # line); gamma_min, gamma_max: the fixed ends, the learned ones' start; vdm_timesteps T > 0:
  # the T-step loss, 0: continuous time; fourier_features: sin/cos(2^n pi z), n = 7, 8, as
  # extra input channels.
  diffusion.vdm_schedule = "learned"
  diffusion.gamma_min = -13.3
  diffusion.gamma_max = 5.0
  diffusion.vdm_timesteps = 0
  diffusion.fourier_features = False

  # ---------------------------------------------------------------- training
  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global, across all devices and hosts
  training.num_steps = 20_000
  training.optimizer = "adam"  # "adam" | "adamw"
  training.learning_rate = 2e-4
  training.weight_decay = 0.0
  training.b1 = 0.9
  training.b2 = 0.999
  training.warmup_steps = 1000
  training.lr_schedule = "constant"  # "constant" | "cosine" (after warmup)
  training.grad_clip = 1.0  # global norm; <= 0 disables
  training.grad_accum_steps = 1
  training.ema_decay = 0.9999
  training.ema_warmup = True  # decay = min(ema_decay, (1 + n) / (10 + n))
  training.fsdp = False  # shard params and optimizer state over the data axis
  training.checkpoint_every = 1000
  training.keep_checkpoints = 3
  training.log_every = 50
  training.sample_every = 5000
  training.tensorboard = False  # also TensorBoard: scalars, sample grids (jaxdiff[tensorboard])
  training.wandb_project = ""  # also log to this Weights & Biases project (jaxdiff[wandb]); "" = no

  # ---------------------------------------------------------------- sampling
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ddim"  # ddpm: "ddpm" | "ddim" | "dpm++2m" | "euler_maruyama" | "pc";
  # flow: "euler" | "heun" (also ddim, dpm++2m); edm: "heun" | "euler" | "edm_stochastic";
  # ddpm also "heun" | "euler" | "edm_stochastic" on the chain's sigma grid (Karras et al. eq. 4)
  sampling.num_steps = 50
  sampling.spacing = ""  # "" = the sampler's own | "sections" | "ddim" | "logsnr" | "trailing"
  sampling.eta = 0.0
  sampling.clip_denoised = True
  sampling.guidance_scale = 1.0
  sampling.temperature = 1.0
  # edm_stochastic (Karras et al. 2022, Alg. 2): churn over the sigma window [s_tmin, s_tmax]
  # (s_tmax = 0: no upper bound) and the added noise's scale.
  sampling.s_churn = 0.0
  sampling.s_tmin = 0.0
  sampling.s_tmax = 0.0
  sampling.s_noise = 1.0
  sampling.num_samples = 64
  sampling.batch_size = 256  # per chunk, global

  # ---------------------------------------------------------------- eval
  config.eval = ev = ml_collections.ConfigDict()
  ev.split = "test"
  ev.num_examples = 1000  # bits/dim examples of `jaxdiff evaluate` (0 = the whole split)
  ev.num_samples = 10_000  # FD/IS samples of `jaxdiff evaluate`
  ev.batch_size = 128
  ev.clip_denoised = True
  ev.features = "classifier"  # feature network for FD/IS: "classifier" | "inception"
  ev.features_path = ""  # its weight file; "" = the cached classifier of the dataset
  ev.cache_dir = ""  # reference statistics and classifiers; "" = $JAXDIFF_CACHE or ~/.cache/jaxdiff
  # Evaluation inside training, of the EMA parameters the loop holds (no checkpoint read):
  ev.every = 0  # steps between evaluations; 0 = none
  # bits/dim on this many fixed test images (0 = skip): the bound of ddpm and vdm, the
  # probability-flow ODE's of flow and edm
  ev.bpd_examples = 0
  ev.fd_samples = 0  # FD/IS of this many samples drawn per config.sampling (0 = skip)
  # Fixed RK4 steps (even in ln sigma) of the probability-flow ODE's bits/dim: of flow and edm
  # inside training, and of `jaxdiff evaluate --metric ode_bpd`
  ev.ode_steps = 32
  ev.best_metric = ""  # "bpd" | "fd": also keep the checkpoint that is best by it

  config.lock()
  return config


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """A run's ``config.json`` (``workdir`` local or ``gs://``), with the schema's defaults for any
  field the run's jaxdiff version did not have yet.

  Raises:
    FileNotFoundError: ``workdir`` has no ``config.json``.
  """
  path = epath.Path(os.fspath(workdir)) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training run's workdir?")
  return _with_defaults(ml_collections.ConfigDict(json.loads(path.read_text())), get_config())


def _with_defaults(
  config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """``config`` plus every field of ``defaults`` it lacks (recursively); its own values kept."""
  for key, default in defaults.items():
    if key not in config:
      config[key] = default
    elif isinstance(default, ml_collections.ConfigDict):
      _with_defaults(config[key], default)
  return config


def is_latent(config: ml_collections.ConfigDict) -> bool:
  """Whether the run diffuses in an autoencoder's latent space (``latent.autoencoder_workdir``)."""
  latent = config.get("latent")
  return bool(latent is not None and latent.get("autoencoder_workdir"))


def is_text(config: ml_collections.ConfigDict) -> bool:
  """Whether the run is conditioned on captions through a text encoder (``text.encoder``)."""
  text = config.get("text")
  return bool(text is not None and text.get("encoder"))


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """``(H, W, C)`` of what the denoiser sees: the images, or in a latent run the latents.

  Raises:
    ValueError: a latent run whose latent shape has not been read from its autoencoder yet
      (``jaxdiff.latent.resolve`` does that when the run starts).
  """
  if is_latent(config):
    latent = config.latent
    if latent.size is None or latent.channels is None:
      raise ValueError(
        "latent.size and latent.channels are unset: jaxdiff.latent.resolve(config) reads them"
        f" from the autoencoder run {latent.autoencoder_workdir}"
      )
    return (latent.size, latent.size, latent.channels)
  data = config.data
  return (data.image_size, data.image_size, data.channels)


def from_file(path: str | os.PathLike, *args: str) -> ml_collections.ConfigDict:
  """``get_config(*args)`` of the config file at ``path`` (relative paths are taken from the
  current directory; a config file can find its neighbours with
  ``os.path.join(os.path.dirname(__file__), "base.py")``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file defines no ``get_config``.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  name = f"_jaxdiff_config_{abs(hash(path))}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses and pickling look modules up by name
  try:
    spec.loader.exec_module(module)
  finally:
    sys.modules.pop(name, None)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} defines no get_config()")
  return module.get_config(*args)


# ----------------------------------------------------------------------------- schema checks

# What a config section may be: a ConfigDict is no Mapping to isinstance.
_SECTION = (Mapping, ml_collections.ConfigDict)


def check_schema(config: ml_collections.ConfigDict) -> list[str]:
  """Where ``config`` departs from the schema, one line each; empty when it fits.

  A config file may build its own dict rather than start from :func:`get_config`, and then
  nothing stops a misspelt key or a string where a number belongs. Reports
  :func:`unknown_keys` first, then :func:`type_problems`.
  """
  return unknown_keys(config) + type_problems(config)


def unknown_keys(config: ml_collections.ConfigDict) -> list[str]:
  """Fields of ``config`` that the schema lacks, each with the nearest real key, e.g.
  ``training.learning_rat=0.001: not a field of the schema; did you mean training.learning_rate?``
  """
  schema = get_config()
  return _unknown(config, schema, schema, "")


def type_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Schema fields ``config`` lacks, and values whose type is not the schema default's.

  An int field takes an int (not a bool or a float), a float field an int or a float, a tuple
  field a tuple or a list, a placeholder (``None`` by default) None or a number, a bool field
  only a bool. Ranges are not checked here: see ``jaxdiff.training.validation``.
  """
  return _mistyped(config, get_config(), "")


def _unknown(
  config: ml_collections.ConfigDict,
  schema: ml_collections.ConfigDict,
  root: ml_collections.ConfigDict,
  prefix: str,
) -> list[str]:
  problems = []
  for name in config:
    key = prefix + name
    if name not in schema:
      value = config[name]
      shown = key if isinstance(value, _SECTION) else f"{key}={value!r}"
      what = "a section" if isinstance(value, _SECTION) else "a field"
      problems.append(f"{shown}: not {what} of the schema{_suggestion(name, schema, root, prefix)}")
    elif isinstance(schema[name], ml_collections.ConfigDict) and isinstance(config[name], _SECTION):
      problems.extend(_unknown(config[name], schema[name], root, key + "."))
  return problems


def _suggestion(
  name: str, schema: ml_collections.ConfigDict, root: ml_collections.ConfigDict, prefix: str
) -> str:
  near = difflib.get_close_matches(name, list(schema.keys()), n=1)
  if near:
    return f"; did you mean {prefix}{near[0]}?"
  # A field put in the wrong section (training.image_size) is found among all the others.
  elsewhere = {
    field: f"{section}.{field}"
    for section, fields in root.items()
    if isinstance(fields, ml_collections.ConfigDict)
    for field in fields
  }
  near = difflib.get_close_matches(name, list(elsewhere), n=1)
  return f"; did you mean {elsewhere[near[0]]}?" if near else ""


def _mistyped(
  config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str
) -> list[str]:
  problems = []
  for name in schema:
    key, default = prefix + name, schema[name]
    if name not in config:
      shown = (
        "" if isinstance(default, ml_collections.ConfigDict) else f"; the default is {default!r}"
      )
      problems.append(f"{key}: missing{shown}")
      continue
    value = config[name]
    if isinstance(default, ml_collections.ConfigDict):
      if isinstance(value, _SECTION):
        problems.extend(_mistyped(value, default, key + "."))
      else:
        problems.append(f"{key}={value!r}: must be a section (a dict of fields)")
      continue
    allowed = _allowed_type(value, schema.get_type(name), placeholder=default is None)
    if allowed:
      problems.append(f"{key}={value!r}: must be {allowed}")
  return problems


def _allowed_type(value: Any, expected: type, *, placeholder: bool) -> str | None:
  """None if ``value`` may stand in a field of type ``expected``, else what it must be."""
  # bool is an int to Python, but True as a batch size (or 1 as a flag) is a mistake.
  is_bool = isinstance(value, bool)
  if expected is bool:
    return None if is_bool else "a bool (True or False)"
  if placeholder and value is None:
    return None
  if expected is int:
    return None if isinstance(value, numbers.Integral) and not is_bool else "an int"
  if expected is float:
    ok = isinstance(value, numbers.Real) and not is_bool
    return None if ok else ("None or a number" if placeholder else "a number")
  if expected is tuple:
    return None if isinstance(value, tuple | list) else "a tuple or list"
  if expected is str:
    return None if isinstance(value, str) else "a str"
  return None if isinstance(value, expected) else f"a {expected.__name__}"
