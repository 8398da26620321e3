"""The config validation pass: every field's check names the field, its value and what is
allowed; all problems come back at once; every shipped config passes. Nothing is compiled: the
model is traced with eval_shape only."""

import copy
import re
import textwrap
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdiff import config as config_lib
from jaxdiff import latent, models
from jaxdiff.core import diffusion
from jaxdiff.models.autoencoder import latent_side
from jaxdiff.training import ConfigError, evaluator, validate, validation
from tests.conftest import tiny_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _config(settings=None):
  """The defaults with ``{dotted key: value}`` set (types as the schema has them)."""
  config = config_lib.get_config()
  for dotted, value in (settings or {}).items():
    *sections, key = dotted.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  return config


def _retyped(dotted, value):
  """The defaults with one field replaced by a value of another type, as a config file that
  builds its own dict can have it (a locked ConfigDict refuses the assignment)."""
  config = config_lib.get_config()
  config.unlock()
  *sections, key = dotted.split(".")
  node = config
  for section in sections:
    node = node[section]
  del node[key]
  node[key] = value
  return config


def _assert_reported(lines, key, value, allowed):
  """Exactly one line is about ``key``, and it reads ``key=value: <allowed>``."""
  about = [line for line in lines if line.startswith(f"{key}=")]
  assert len(about) == 1, lines
  assert re.fullmatch(re.escape(f"{key}={value!r}: ") + allowed, about[0]), about[0]


# ----------------------------------------------------------------------------- every room passes
# the defaults, so that any line below is the bad value's doing


def test_the_defaults_have_no_problems():
  config = _config()
  assert config_lib.check_schema(config) == []
  assert validation.data_problems(config) == []
  assert models.check_config(config) == []
  assert diffusion.check_config(config.diffusion) == []
  assert validation.training_problems(config, 8) == []
  assert evaluator.problems(config) == []


def _resolved_by_the_autoencoder_file(config):
  """What ``latent.resolve`` reads from a trained ``configs/fashion_mnist_autoencoder.py`` run,
  computed from the file itself (a shipped latent config names a run no test has trained)."""
  ae = config_lib.from_file(CONFIGS[0].parent / "fashion_mnist_autoencoder.py")
  assert config.latent.autoencoder_workdir.endswith("runs/fm_autoencoder")
  assert ae.data.name == config.data.name and ae.data.image_size == config.data.image_size
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.latent.size = latent_side(ae.autoencoder.padded_size, tuple(ae.model.ch_mult))
    resolved.latent.channels = ae.autoencoder.latent_channels
    resolved.latent.scale_factor = 1.0
    resolved.latent.digest = "0" * 64
    resolved.latent.autoencoder_step = ae.training.num_steps
  return resolved


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_passes(path, monkeypatch):
  config = config_lib.from_file(path)
  if config_lib.is_latent(config):
    monkeypatch.setattr(latent, "resolve", _resolved_by_the_autoencoder_file)
  assert validation.problems(config, num_devices=1) == []


def test_the_tests_tiny_config_passes_on_8_devices(image_dir):
  validate(tiny_config(image_dir), num_devices=8)


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
  "key, value, allowed",
  [
    ("training.batch_size", 8.0, r"must be an int"),
    ("training.batch_size", True, r"must be an int"),
    ("training.tensorboard", 1, r"must be a bool \(True or False\)"),
    ("training.learning_rate", "1e-3", r"must be a number"),
    ("training.learning_rate", True, r"must be a number"),
    ("model.ch_mult", "1,2", r"must be a tuple or list"),
    ("diffusion.beta", "0.1", r"must be None or a number"),
    ("data.name", 3, r"must be a str"),
    ("data", 3, r"must be a section \(a dict of fields\)"),
  ],
)
def test_schema_types(key, value, allowed):
  _assert_reported(config_lib.check_schema(_retyped(key, value)), key, value, allowed)


@pytest.mark.parametrize(
  "key, value",
  [
    ("model.ch_mult", [1, 2, 2]),  # tuple fields take lists
    ("training.learning_rate", 1),  # float fields take ints
    ("diffusion.beta_end", 0.02),  # placeholders take numbers ...
    ("diffusion.beta_end", 1),
    ("diffusion.beta_end", None),  # ... or None
  ],
)
def test_schema_accepts_kindred_types(key, value):
  assert config_lib.check_schema(_retyped(key, value)) == []


def test_schema_reports_missing_fields():
  config = config_lib.get_config()
  config.unlock()
  del config.data["channels"]
  assert config_lib.check_schema(config) == ["data.channels: missing; the default is 1"]


def test_unknown_keys_get_the_nearest_real_key():
  config = config_lib.get_config()
  config.unlock()
  config.training.learning_rat = 1e-3
  config.training.image_siz = 8  # a field of another section
  config.trainig = {"batch_size": 8}
  assert config_lib.check_schema(config) == [
    "trainig: not a section of the schema; did you mean training?",
    "training.image_siz=8: not a field of the schema; did you mean data.image_size?",
    "training.learning_rat=0.001: not a field of the schema; did you mean training.learning_rate?",
  ]


def test_a_config_file_with_its_own_dict_gets_the_suggestion(tmp_path):
  path = tmp_path / "own.py"
  path.write_text(
    textwrap.dedent("""\
      import ml_collections
      from jaxdiff.config import get_config as defaults

      def get_config():
        config = ml_collections.ConfigDict(defaults().to_dict())
        config.training.learnig_rate = 1e-3
        return config
    """)
  )
  with pytest.raises(ConfigError) as e:
    validate(config_lib.from_file(path), num_devices=1)
  assert str(e.value) == (
    "the config has 1 problem: training.learnig_rate=0.001: not a field of the schema;"
    " did you mean training.learning_rate?"
  )


def test_a_wrong_type_is_reported_alone():
  # Range checks on a mistyped field would only add noise: the other bad value waits.
  config = _retyped("training.batch_size", 8.5)
  config.training.learning_rate = -1.0
  assert validation.problems(config, 1) == ["training.batch_size=8.5: must be an int"]


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize(
  "settings, key, value, allowed",
  [
    ({}, "data.name", "", r"must name a tfds dataset or be 'image_folder'"),
    ({}, "data.split", "", r"must name a split, e\.g\. 'train'"),
    ({}, "data.image_size", 0, r"must be an int >= 1"),
    ({}, "data.channels", 2, r"must be 1 \(grey\) or 3 \(RGB\)"),
    ({}, "data.num_classes", 0, r"must be an int >= 1"),
    ({}, "data.num_workers", -1, r"must be an int >= 0 \(0: no worker processes\)"),
    ({}, "data.prefetch", -1, r"must be an int >= 0"),
    (
      {"data.name": "image_folder"},
      "data.image_folder",
      "",
      r"must name a directory of images when data\.name='image_folder'",
    ),
    (
      {"data.name": "image_folder"},
      "data.image_folder",
      "/no/such/folder",
      r"must be an existing directory of images",
    ),
  ],
)
def test_data_fields(settings, key, value, allowed):
  lines = validation.data_problems(_config({**settings, key: value}))
  _assert_reported(lines, key, value, allowed)


def test_an_unknown_dataset_is_named():
  # The wording is jaxdiff.data.preparation.tfds_builder's; here it is one line, and the first.
  lines = validation.problems(_config({"data.name": "fashon_mnist"}), 1)
  assert len(lines) == 1 and lines[0].startswith("data.name='fashon_mnist'"), lines
  assert "\n" not in lines[0]


def test_a_field_two_rooms_read_is_reported_once():
  # data.channels is the data's and the model's: one line, the data's.
  lines = validation.problems(_config({"data.channels": 0}), 1)
  assert lines == ["data.channels=0: must be 1 (grey) or 3 (RGB)"]


# ----------------------------------------------------------------------------- model

DIT = {"model.name": "dit"}


@pytest.mark.parametrize(
  "settings, key, value, allowed",
  [
    ({}, "model.name", "vit", r"must be one of unet, dit, autoencoder"),
    ({}, "model.ch", 0, r"must be an int >= 1"),
    ({}, "model.ch_mult", (), r"must be a non-empty sequence of ints >= 1"),
    ({}, "model.ch_mult", (1, 0), r"must be a non-empty sequence of ints >= 1"),
    ({}, "model.num_res_blocks", 0, r"must be an int >= 1"),
    (
      {},
      "data.image_size",
      30,
      r"must be divisible by 2\*\*\(len\(model\.ch_mult\) - 1\) = 4: each U-Net level halves it"
      r" \(30 -> 15 -> 7\.5\); or use fewer levels",
    ),
    (
      {},
      "model.attn_resolutions",
      (13,),
      r"each must be one of the U-Net's resolutions 28, 14, 7",
    ),
    ({}, "model.dropout", 1.0, r"must be a probability in \[0, 1\)"),
    ({}, "model.class_dropout", -0.1, r"must be a probability in \[0, 1\)"),
    ({}, "model.resblock", "resnet", r"must be one of ddpm, biggan, convnext"),
    ({}, "model.attention", "flash", r"must be one of standard, linear"),
    ({}, "model.compute_dtype", "float16", r"must be one of float32, bfloat16"),
    ({}, "model.num_heads", 0, r"must be an int >= 1"),
    ({}, "model.num_head_channels", 0, r"must be -1 \(heads set by model\.num_heads\) or .*"),
    # Attention at 14x14 (width 128) and in the middle (width 128).
    (
      {},
      "model.num_head_channels",
      24,
      r"must divide the width of every attention layer \(the attention widths: 128\)",
    ),
    ({}, "model.num_heads", 3, r"must divide the width of every attention layer .*"),
    ({}, "model.num_groups", 0, r"must be an int >= 1 dividing every channel count 64, 128"),
    ({}, "model.num_groups", 48, r"must be an int >= 1 dividing every channel count 64, 128"),
    ({"model.resblock": "convnext"}, "model.mlp_ratio", 0.0, r"must be a number > 0"),
    (
      {"model.class_conditional": True},
      "data.num_classes",
      0,
      r"must be an int >= 1 for a class-conditional model",
    ),
    ({}, "data.channels", 0, r"must be an int >= 1"),
    (DIT, "model.patch_size", 0, r"must be an int >= 1"),
    (DIT, "model.patch_size", 3, r"must divide data\.image_size=28: DiT takes whole patches"),
    (DIT, "model.hidden_size", 30, r"must be an int >= 4 divisible by 4 .*"),
    (DIT, "model.num_heads", 5, r"must divide the width .*\(model\.hidden_size: 192\)"),
    (DIT, "model.depth", 0, r"must be an int >= 1"),
    (DIT, "model.mlp_ratio", 0.0, r"must be a number > 0"),
  ],
)
def test_model_fields(settings, key, value, allowed):
  _assert_reported(models.check_config(_config({**settings, key: value})), key, value, allowed)


def test_only_the_chosen_architectures_fields_are_checked():
  assert models.check_config(_config({"model.patch_size": 0})) == []  # a U-Net: no patches
  assert models.check_config(_config({**DIT, "model.num_groups": 5})) == []  # no GroupNorm


class _Halving(nnx.Module):
  """A "denoiser" whose output has half the rows of its input."""

  def __init__(self, rngs):
    self.w = nnx.Param(jnp.zeros(()))

  def __call__(self, x, t, y=None, *, key=None):
    return x[:, ::2]


class _Refusing(_Halving):
  def __call__(self, x, t, y=None, *, key=None):
    raise ValueError("no such shape here\nthe traceback's second line")


@pytest.mark.parametrize(
  "model, expected",
  [
    (_Halving, "model: maps 28x28x1 images to outputs of shape (1, 14, 28, 1), not (1, 28, 28, 1)"),
    (_Refusing, "model: cannot take 28x28x1 images: no such shape here"),
  ],
)
def test_the_forward_pass_catches_the_rest(monkeypatch, model, expected):
  monkeypatch.setattr(models, "build_model", lambda config, rngs: model(rngs))
  assert models.check_config(_config()) == [expected]


# ----------------------------------------------------------------------------- diffusion


@pytest.mark.parametrize(
  "settings, key, value, allowed",
  [
    ({}, "schedule", "foo", r"must be one of linear, cosine, quadratic, .*, constant"),
    ({}, "num_timesteps", 0, r"must be an int >= 1"),
    (
      {},
      "num_timesteps",
      10,
      r"the linear schedule's default beta_end 0\.02 \* 1000 / T = 2 makes a beta >= 1 at"
      r" T <= 20; use schedule 'cosine', or set diffusion\.beta_end < 1",
    ),
    ({}, "beta_start", 0.0, r"must be None \(the schedule's default\) or a number in \(0, 1\)"),
    ({}, "beta_end", 1.0, r"must be None \(the schedule's default\) or a number in \(0, 1\)"),
    ({"schedule": "constant"}, "beta", 2.0, r"must be None .* or a number in \(0, 1\)"),
    ({"schedule": "constant"}, "beta", None, r"schedule 'constant' needs a beta in \(0, 1\).*"),
    (
      {},
      "beta_start",
      0.05,
      r"must give beta_start <= beta_end; the linear schedule would run from 0\.05 down to 0\.02",
    ),
    ({"beta_end": 0.01}, "beta_start", 0.02, r".* would run from 0\.02 down to 0\.01"),
    ({}, "mean_type", "score", r"must be one of eps, x0, v"),
    ({}, "var_type", "learned_small", r"must be one of fixed_small, .*, learned_range"),
    ({}, "t_sampler", "loss", r"must be '' \(uniform\) or one of uniform, importance"),
    ({}, "min_snr_gamma", -1.0, r"must be a number >= 0 \(0 disables\)"),
  ],
)
def test_diffusion_fields(settings, key, value, allowed):
  config = _config({f"diffusion.{k}": v for k, v in {**settings, key: value}.items()})
  _assert_reported(diffusion.check_config(config.diffusion), f"diffusion.{key}", value, allowed)


def test_one_step_is_a_diffusion():
  # get_betas and make_diffusion take T = 1 (the decoder is all there is).
  assert diffusion.check_config(_config({"diffusion.num_timesteps": 1}).diffusion) == []


@pytest.mark.parametrize(
  "settings, allowed",
  [
    ({"diffusion.loss_type": "l2"}, r"must be one of mse, l1, huber, kl, hybrid"),
    (
      {"diffusion.loss_type": "mse", "diffusion.var_type": "learned"},
      r"loss_type 'mse' gives the learned variance .* no training signal; .*",
    ),
    ({"diffusion.loss_type": "hybrid"}, r"loss_type 'hybrid' trains a learned variance, .*"),
  ],
)
def test_loss_types(settings, allowed):
  lines = validation.problems(_config(settings), 1)
  _assert_reported(lines, "diffusion.loss_type", settings["diffusion.loss_type"], allowed)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
  "settings, key, value, allowed",
  [
    ({}, "seed", -1, r"must be an int in \[0, 2\*\*32\)"),
    ({}, "seed", 2**32, r"must be an int in \[0, 2\*\*32\)"),
    ({}, "training.batch_size", 0, r"must be an int >= 1"),
    ({}, "training.grad_accum_steps", 0, r"must be an int >= 1 dividing batch_size=128"),
    ({}, "training.grad_accum_steps", 3, r"must be an int >= 1 dividing batch_size=128"),
    ({}, "training.num_steps", 0, r"must be an int >= 1"),
    ({}, "training.optimizer", "sgd", r"must be one of adam, adamw"),
    ({}, "training.learning_rate", -1.0, r"must be a number > 0"),
    ({}, "training.learning_rate", 0.0, r"must be a number > 0"),
    ({}, "training.learning_rate", float("inf"), r"must be a number > 0"),
    ({}, "training.weight_decay", -0.1, r"must be a number >= 0"),
    ({}, "training.b1", 1.0, r"must be a number in \[0, 1\)"),
    ({}, "training.b2", -0.1, r"must be a number in \[0, 1\)"),
    ({}, "training.warmup_steps", -1, r"must be an int >= 0"),
    ({}, "training.lr_schedule", "linear", r"must be one of constant, cosine"),
    ({}, "training.grad_clip", float("nan"), r"must be a finite number .*<= 0 disables.*"),
    ({}, "training.ema_decay", 1.5, r"must be a number in \[0, 1\]"),
    ({}, "training.checkpoint_every", 0, r"must be an int >= 1"),
    ({}, "training.keep_checkpoints", 0, r"must be an int >= 1 \(the newest checkpoint is .*\)"),
    ({}, "training.log_every", 0, r"must be an int >= 1"),
    ({}, "training.sample_every", -1, r"must be an int >= 0 \(0: no sample grids\)"),
  ],
)
def test_training_fields(settings, key, value, allowed):
  lines = validation.training_problems(_config({**settings, key: value}), 1)
  _assert_reported(lines, key, value, allowed)


@pytest.mark.parametrize(
  "key, value, allowed",
  [
    ("training.tensorboard", 1, r"must be a bool \(True or False\)"),
    ("training.wandb_project", None, r"must be a str \('' = no wandb\)"),
  ],
)
def test_training_flag_types(key, value, allowed):
  _assert_reported(validation.training_problems(_retyped(key, value), 1), key, value, allowed)


def test_the_batch_must_split_over_the_devices():
  lines = validation.problems(_config({"training.batch_size": 12}))  # 8 test devices
  assert lines == ["training.batch_size=12: must be a multiple of the 8 devices"]


def test_so_must_each_micro_batch():
  config = _config({"training.batch_size": 64, "training.grad_accum_steps": 16})
  assert validation.training_problems(config, 8) == [
    "training.grad_accum_steps=16: each micro-batch of batch_size // grad_accum_steps = 4 must"
    " be a multiple of the 8 devices"
  ]
  assert validation.training_problems(config, 4) == []


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize(
  "key, value, allowed",
  [
    ("split", "", r"must name a split, e\.g\. 'test'"),
    ("num_examples", -1, r"must be an int >= 0 \(0: the whole split\)"),
    ("num_samples", 1, r"must be an int >= 2 \(a covariance needs 2\)"),
    ("batch_size", 0, r"must be an int >= 1"),
    ("features", "fid", r"must be one of .*classifier.*"),
    ("features_path", "/no/such/net.npz", r"must be '' \(the cached classifier\) or an .*file"),
    ("every", -1, r"must be an int >= 0 \(0: no evaluation while training\)"),
    ("bpd_examples", -1, r"must be an int >= 0 \(0: no bits/dim\)"),
    ("ode_steps", 0, r"must be an int >= 1"),
    ("fd_samples", 1, r"must be 0 \(no FD\) or an int >= 2: a covariance needs at least 2 .*"),
    ("best_metric", "loss", r"must be '' or one of bpd, fd"),
  ],
)
def test_eval_fields(key, value, allowed):
  lines = evaluator.problems(_config({f"eval.{key}": value}))
  _assert_reported(lines, f"eval.{key}", value, allowed)


def test_remote_feature_weights_are_not_looked_up():
  assert evaluator.problems(_config({"eval.features_path": "gs://bucket/net.npz"})) == []


def test_evaluator_check_still_raises_the_joined_lines():
  with pytest.raises(ValueError, match=r"^eval\.split='': .*; eval\.batch_size=0: "):
    evaluator.check(_config({"eval.split": "", "eval.batch_size": 0}))


@pytest.mark.parametrize(
  "settings, fine",
  [
    ({"sampling.sampler": "ddim", "sampling.eta": 0.0}, False),
    ({"sampling.sampler": "ddim", "sampling.eta": 1.0}, True),
    ({"sampling.sampler": "dpm++2m"}, False),
    ({"sampling.sampler": "heun"}, False),
    ({"sampling.sampler": "ddpm"}, True),
  ],
)
def test_a_temperature_that_changes_nothing_is_reported(settings, fine):
  lines = validation.problems(_config({**settings, "sampling.temperature": 0.7}), num_devices=1)
  if fine:
    assert lines == []
  else:
    sampler = re.escape(settings["sampling.sampler"])
    allowed = rf"sampler '{sampler}' is deterministic here .*allowed: 1\.0.*"
    _assert_reported(lines, "sampling.temperature", 0.7, allowed)
  # 1.0 (the default) is always fine.
  assert validation.problems(_config(settings), num_devices=1) == []


# ----------------------------------------------------------------------------- all at once


def test_every_problem_comes_back_in_one_error():
  config = _config(
    {
      "training.learning_rate": -1.0,
      "training.keep_checkpoints": 0,
      "training.checkpoint_every": 0,
      "sampling.sampler": "foo",
      "model.attn_resolutions": (13,),
      "diffusion.t_sampler": "loss",
      "eval.batch_size": 0,
    }
  )
  with pytest.raises(ConfigError) as e:
    validate(config, num_devices=1)
  assert e.value.problems == [
    "model.attn_resolutions=(13,): each must be one of the U-Net's resolutions 28, 14, 7",
    "diffusion.t_sampler='loss': must be '' (uniform) or one of uniform, importance",
    "training.learning_rate=-1.0: must be a number > 0",
    "training.checkpoint_every=0: must be an int >= 1",
    "training.keep_checkpoints=0: must be an int >= 1 (the newest checkpoint is always kept)",
    "sampling.sampler='foo': allowed: ddpm, ddim, dpm++2m, euler_maruyama, pc, euler, heun,"
    " edm_stochastic",
    "eval.batch_size=0: must be an int >= 1",
  ]
  assert str(e.value) == "the config has 7 problems:\n  " + "\n  ".join(e.value.problems)
  assert isinstance(e.value, ValueError)  # callers catching ValueError still do
