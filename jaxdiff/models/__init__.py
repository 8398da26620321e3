"""Denoising networks: the DDPM U-Net family and DiT, built from a config.

Every model is called as ``model(x, t, y=None, *, key=None) -> output`` with ``x`` NHWC
``[B, H, W, C]``, ``t`` ``[B]`` timestep indices and ``y`` ``[B]`` labels or None; ``key=None``
is deterministic evaluation, a key turns on dropout and label dropout. The model holds no RNG
state, so ``nnx.split(model)`` yields parameters only::

  model = build_model(config, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  out = nnx.merge(graphdef, params)(x, t, y, key=key)  # inside jit
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxdiff.checks import is_int, is_number
from jaxdiff.config import is_latent, is_text, sample_shape
from jaxdiff.models import layers, noise_schedule, text_transformer
from jaxdiff.models.autoencoder import Autoencoder
from jaxdiff.models.dit import DiT, dit_preset
from jaxdiff.models.unet import RESBLOCKS, UNet

__all__ = [
  "Autoencoder",
  "DiT",
  "UNet",
  "Apply",
  "bind",
  "build_model",
  "check_config",
  "count_params",
  "dit_preset",
  "output_channels",
  "param_table",
]

MODELS = ("unet", "dit", "autoencoder")
DENOISERS = ("unet", "dit")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
VDM_SCHEDULES = ("learned", "fixed")  # diffusion.vdm_schedule
ATTENTIONS = ("standard", "linear")  # the kinds layers.SpatialAttention implements


def output_channels(config: ml_collections.ConfigDict) -> int:
  """Image channels, doubled when the model also predicts variances (Nichol & Dhariwal 2021)."""
  var_type = config.diffusion.var_type
  if var_type not in VAR_TYPES:
    raise ValueError(
      f"diffusion.var_type={var_type!r} is not supported; expected one of {VAR_TYPES}."
    )
  channels = sample_shape(config)[2]
  return 2 * channels if var_type in ("learned", "learned_range") else channels


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the denoiser described by ``config.model``.

  Reads ``config.model`` (``name`` "unet" | "dit" and that architecture's fields),
  ``config.data.image_size``, ``config.data.channels``, ``config.data.num_classes`` (only when
  ``model.class_conditional``) and ``config.diffusion.var_type``. To count parameters without
  allocating them, build under ``nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))``.

  Args:
    config: the full run config.
    rngs: keys for parameter initialisation (only the ``params`` stream is used).

  Returns:
    A :class:`UNet` or :class:`DiT`; for ``text.encoder = "transformer"``, that denoiser behind
    its jointly trained text encoder (:class:`~jaxdiff.models.text_transformer.TextConditioned`).

  Raises:
    ValueError: for a config the model cannot be built from, naming the bad value.
  """
  m, data = config.model, config.data
  if m.name not in MODELS:
    raise ValueError(f"model.name={m.name!r} is not supported; expected one of {MODELS}.")
  if data.channels < 1:
    raise ValueError(f"data.channels={data.channels} must be >= 1.")
  if m.name == "autoencoder":
    return build_autoencoder(config, rngs=rngs)
  size, _, channels = sample_shape(config)
  num_classes = 0
  if m.class_conditional:
    if data.num_classes < 1:
      raise ValueError(
        f"model.class_conditional needs data.num_classes >= 1, got {data.num_classes}."
      )
    num_classes = data.num_classes
  vdm = config.diffusion.get("process", "ddpm") == "vdm"
  fourier = vdm and bool(config.diffusion.get("fourier_features", False))
  n_fourier = 2 * (noise_schedule.FOURIER_RANGE[1] - noise_schedule.FOURIER_RANGE[0])
  common = dict(
    in_channels=channels * (1 + n_fourier) if fourier else channels,
    out_channels=output_channels(config),
    image_size=size,
    num_heads=m.num_heads,
    num_head_channels=m.num_head_channels,
    dropout=m.dropout,
    num_classes=num_classes,
    class_dropout=m.class_dropout,
    context_dim=context_width(config),
    mlp_ratio=m.mlp_ratio,
    dtype=layers.compute_dtype(m.compute_dtype),
    remat=m.remat,
    rngs=rngs,
  )
  if m.name == "dit":
    denoiser = DiT(
      patch_size=m.patch_size,
      hidden_size=m.hidden_size,
      depth=m.depth,
      **common,
    )
  else:
    denoiser = _unet(m, common)
  if is_text(config) and config.text.encoder == "transformer":
    denoiser = text_transformer.build(
      config.text, denoiser=denoiser, dtype=common["dtype"], rngs=rngs
    )
  if vdm:
    return noise_schedule.ScheduledDenoiser(denoiser, vdm_schedule(config, rngs), fourier=fourier)
  return denoiser


def vdm_schedule(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The gamma(t) of a vdm run: ``diffusion.vdm_schedule`` "learned" (:class:`LearnedGamma`,
  endpoints starting at ``diffusion.gamma_min``, ``gamma_max``) or "fixed" (the line between
  them)."""
  dcfg = config.diffusion
  ends = dict(gamma_min=float(dcfg.gamma_min), gamma_max=float(dcfg.gamma_max))
  if dcfg.vdm_schedule == "learned":
    return noise_schedule.LearnedGamma(**ends, rngs=rngs)
  if dcfg.vdm_schedule == "fixed":
    return noise_schedule.FixedLinearGamma(**ends)
  raise ValueError(
    f"diffusion.vdm_schedule={dcfg.vdm_schedule!r}: must be one of {', '.join(VDM_SCHEDULES)}"
  )


def _unet(m: ml_collections.ConfigDict, common: dict[str, Any]) -> UNet:
  return UNet(
    ch=m.ch,
    ch_mult=m.ch_mult,
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=m.attn_resolutions,
    resblock=m.resblock,
    resample_with_conv=m.resample_with_conv,
    scale_shift_norm=m.scale_shift_norm,
    attention=m.attention,
    num_groups=m.num_groups,
    **common,
  )


def context_width(config: ml_collections.ConfigDict) -> int:
  """The width of the text tokens the denoiser attends to (``text.width``), 0 without text.

  Raises:
    ValueError: a text run whose width has not been read from its encoder yet
      (``jaxdiff.prompts.resolve`` does that when the run starts).
  """
  if not is_text(config):
    return 0
  if config.text.width is None:
    raise ValueError(
      "text.width is unset: jaxdiff.prompts.resolve(config) reads it from the text encoder"
    )
  return int(config.text.width)


def text_inputs(config: ml_collections.ConfigDict, batch: int) -> dict[str, Any]:
  """Abstract ``[batch]`` text conditioning of a text run's denoiser (for shape checks)."""
  width, length = context_width(config), config.text.max_length
  if config.text.encoder == "transformer":
    return {
      "ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
      "mask": jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    }
  return {
    "tokens": jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
    "mask": jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    "pooled": jax.ShapeDtypeStruct((batch, width), jnp.float32),
  }


def padded_size(config: ml_collections.ConfigDict) -> int:
  """The side an autoencoder run pads its images to (``autoencoder.padded_size``, 0: none)."""
  return config.autoencoder.padded_size or config.data.image_size


def build_autoencoder(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Autoencoder:
  """The :class:`Autoencoder` of an autoencoder run's config (``model.name = "autoencoder"``):
  its widths from ``config.model``, its latent and losses from ``config.autoencoder``."""
  m, ae = config.model, config.autoencoder
  heads = m.num_heads if m.num_head_channels <= 0 else None
  return Autoencoder(
    in_channels=config.data.channels,
    latent_channels=ae.latent_channels,
    image_size=config.data.image_size,
    padded_size=padded_size(config),
    ch=m.ch,
    ch_mult=tuple(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    num_groups=m.num_groups,
    num_heads=heads or 1,
    dropout=m.dropout,
    disc_ch=ae.disc_ch,
    disc_layers=ae.disc_layers if ae.disc_weight > 0 else 0,
    dtype=layers.compute_dtype(m.compute_dtype),
    rngs=rngs,
  )


def check_config(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem :func:`build_model` would meet in ``config``, one line each naming the field,
  its value and what is allowed; empty when the model builds and maps images to outputs.

  Checks ``config.model`` (the chosen architecture's fields only) and the ``data`` and
  ``diffusion`` fields the model reads. When each field is sound on its own, one abstract forward
  pass (:func:`jax.eval_shape`: no compiling, no parameters allocated) catches the rest.
  """
  m = config.model
  if m.name not in MODELS:
    return [f"model.name={m.name!r}: must be one of {', '.join(MODELS)}"]
  if m.name == "autoencoder":
    return _autoencoder_problems(config) or _forward_problems(config)
  problems = _common_problems(config)
  if m.name == "dit":
    problems += _dit_problems(m, _denoised_size(config))
  else:
    problems += _unet_problems(m, _denoised_size(config))
  return problems or _forward_problems(config)


def _denoised_size(config: ml_collections.ConfigDict) -> int:
  return config.latent.size if is_latent(config) else config.data.image_size


def _problem(key: str, value: Any, allowed: str) -> str:
  return f"{key}={value!r}: {allowed}"


def _common_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The fields both architectures read."""
  m, data, problems = config.model, config.data, []
  if not is_int(data.image_size, 1):
    problems.append(_problem("data.image_size", data.image_size, "must be an int >= 1"))
  if not is_int(data.channels, 1):
    problems.append(_problem("data.channels", data.channels, "must be an int >= 1"))
  if m.class_conditional and not is_int(data.num_classes, 1):
    allowed = "must be an int >= 1 for a class-conditional model"
    problems.append(_problem("data.num_classes", data.num_classes, allowed))
  dcfg = config.diffusion
  if dcfg.get("process", "ddpm") == "vdm" and dcfg.vdm_schedule not in VDM_SCHEDULES:
    allowed = f"must be one of {', '.join(VDM_SCHEDULES)}"
    problems.append(_problem("diffusion.vdm_schedule", dcfg.vdm_schedule, allowed))
  if config.diffusion.var_type not in VAR_TYPES:
    allowed = f"must be one of {', '.join(VAR_TYPES)}"
    problems.append(_problem("diffusion.var_type", config.diffusion.var_type, allowed))
  for name in ("dropout", "class_dropout"):
    p = m[name]
    if not (is_number(p) and 0.0 <= p < 1.0):
      problems.append(_problem(f"model.{name}", p, "must be a probability in [0, 1)"))
  if m.compute_dtype not in layers.COMPUTE_DTYPES:
    allowed = f"must be one of {', '.join(layers.COMPUTE_DTYPES)}"
    problems.append(_problem("model.compute_dtype", m.compute_dtype, allowed))
  if not is_int(m.num_heads, 1):
    problems.append(_problem("model.num_heads", m.num_heads, "must be an int >= 1"))
  if not (is_int(m.num_head_channels, 1) or m.num_head_channels == -1):
    allowed = "must be -1 (heads set by model.num_heads) or an int > 0 (the width of a head)"
    problems.append(_problem("model.num_head_channels", m.num_head_channels, allowed))
  return problems


def _heads_problems(m: ml_collections.ConfigDict, widths: list[int], where: str) -> list[str]:
  """Whether the head width (or count) divides every attention layer's width."""
  if m.num_head_channels > 0:
    bad = [w for w in widths if w % m.num_head_channels]
    key, value = "model.num_head_channels", m.num_head_channels
  else:
    bad = [w for w in widths if w % m.num_heads]
    key, value = "model.num_heads", m.num_heads
  if not bad:
    return []
  shown = ", ".join(map(str, widths))
  return [
    _problem(key, value, f"must divide the width of every attention layer ({where}: {shown})")
  ]


def _unet_problems(m: ml_collections.ConfigDict, image_size: int) -> list[str]:
  problems = []
  ch_ok = is_int(m.ch, 1)
  if not ch_ok:
    problems.append(_problem("model.ch", m.ch, "must be an int >= 1"))
  mult = m.ch_mult
  mult_ok = isinstance(mult, tuple | list) and len(mult) > 0 and all(is_int(x, 1) for x in mult)
  if not mult_ok:
    problems.append(
      _problem("model.ch_mult", m.ch_mult, "must be a non-empty sequence of ints >= 1")
    )
  if not is_int(m.num_res_blocks, 1):
    problems.append(_problem("model.num_res_blocks", m.num_res_blocks, "must be an int >= 1"))
  if m.resblock not in RESBLOCKS:
    problems.append(
      _problem("model.resblock", m.resblock, f"must be one of {', '.join(RESBLOCKS)}")
    )
  if m.attention not in ATTENTIONS:
    allowed = f"must be one of {', '.join(ATTENTIONS)}"
    problems.append(_problem("model.attention", m.attention, allowed))
  if m.resblock == "convnext" and not (is_number(m.mlp_ratio) and m.mlp_ratio > 0):
    problems.append(_problem("model.mlp_ratio", m.mlp_ratio, "must be a number > 0"))
  if not (ch_ok and mult_ok):
    return problems
  widths = sorted({m.ch, *(m.ch * k for k in m.ch_mult)})
  if not is_int(m.num_groups, 1) or any(w % m.num_groups for w in widths):
    allowed = f"must be an int >= 1 dividing every channel count {', '.join(map(str, widths))}"
    problems.append(_problem("model.num_groups", m.num_groups, allowed))
  if not is_int(image_size, 1):
    return problems
  factor = 2 ** (len(m.ch_mult) - 1)
  sides = [image_size / 2**i for i in range(len(m.ch_mult))]
  if image_size % factor:
    halvings = " -> ".join(f"{s:g}" for s in sides)
    allowed = (
      f"must be divisible by 2**(len(model.ch_mult) - 1) = {factor}: each U-Net level halves"
      f" it ({halvings}); or use fewer levels"
    )
    return [*problems, _problem("data.image_size", image_size, allowed)]
  sides = [int(s) for s in sides]
  attn = m.attn_resolutions
  if not (isinstance(attn, tuple | list) and all(r in sides for r in attn)):
    allowed = f"each must be one of the U-Net's resolutions {', '.join(map(str, sides))}"
    return [*problems, _problem("model.attn_resolutions", attn, allowed)]
  # Attention runs at the listed resolutions and always in the middle, at the lowest one.
  attn_widths = {m.ch * k for k, s in zip(m.ch_mult, sides, strict=True) if s in attn}
  attn_widths.add(m.ch * m.ch_mult[-1])
  if problems or not (is_int(m.num_heads, 1) and is_int(m.num_head_channels, -1)):
    return problems
  return _heads_problems(m, sorted(attn_widths), "the attention widths")


def _dit_problems(m: ml_collections.ConfigDict, image_size: int) -> list[str]:
  problems = []
  if not is_int(m.patch_size, 1):
    problems.append(_problem("model.patch_size", m.patch_size, "must be an int >= 1"))
  elif is_int(image_size, 1) and image_size % m.patch_size:
    allowed = f"must divide data.image_size={image_size}: DiT takes whole patches"
    problems.append(_problem("model.patch_size", m.patch_size, allowed))
  if not is_int(m.depth, 1):
    problems.append(_problem("model.depth", m.depth, "must be an int >= 1"))
  if not (is_number(m.mlp_ratio) and m.mlp_ratio > 0):
    problems.append(_problem("model.mlp_ratio", m.mlp_ratio, "must be a number > 0"))
  if not is_int(m.hidden_size, 1) or m.hidden_size % 4:
    # The 2-D sin-cos position embedding splits the width in four.
    allowed = "must be an int >= 4 divisible by 4 (the 2-D sin-cos position embedding)"
    problems.append(_problem("model.hidden_size", m.hidden_size, allowed))
  elif is_int(m.num_heads, 1) and is_int(m.num_head_channels, -1):
    problems += _heads_problems(m, [m.hidden_size], "model.hidden_size")
  return problems


def _forward_problems(config: ml_collections.ConfigDict) -> list[str]:
  """One abstract forward pass of a ``[1, H, W, C]`` batch: shapes only, nothing compiled."""
  size, _, channels = shape = sample_shape(config)
  if config.model.name == "autoencoder":
    size, channels = config.data.image_size, config.data.channels
    shape = (size, size, channels)
  what = f"{size}x{size}x{channels} {'latents' if is_latent(config) else 'images'}"
  try:
    graphdef, params = nnx.split(_abstract_model(config))
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    if config.model.name == "autoencoder":
      out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x)[0], params, x)
      expected = (1, *shape)
    else:
      t = jax.ShapeDtypeStruct((1,), jnp.int32)
      y = jax.ShapeDtypeStruct((1,), jnp.int32) if config.model.class_conditional else None
      if is_text(config):
        y = {**text_inputs(config, 1), **({} if y is None else {"label": y})}
      out = jax.eval_shape(Apply(graphdef), params, x, t, y)
      expected = (1, size, size, output_channels(config))
  except Exception as e:  # whatever the model raises is the message
    first = next(iter(str(e).splitlines()), "") or type(e).__name__
    return [f"model: cannot take {what}: {first}"]
  if tuple(out.shape) != expected:
    return [f"model: maps {what} to outputs of shape {tuple(out.shape)}, not {expected}"]
  return []


def _autoencoder_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The fields an autoencoder run reads: ``model``'s widths and ``autoencoder``."""
  m, ae, data, problems = config.model, config.autoencoder, config.data, []
  if is_latent(config):
    allowed = "must be empty for an autoencoder run (model.name='autoencoder')"
    problems.append(
      _problem("latent.autoencoder_workdir", config.latent.autoencoder_workdir, allowed)
    )
  for key in ("image_size", "channels"):
    if not is_int(data[key], 1):
      problems.append(_problem(f"data.{key}", data[key], "must be an int >= 1"))
  if not is_int(ae.latent_channels, 1):
    problems.append(
      _problem("autoencoder.latent_channels", ae.latent_channels, "must be an int >= 1")
    )
  for key in ("kl_weight", "l2_weight", "perceptual_weight", "disc_weight"):
    if not (is_number(ae[key]) and ae[key] >= 0):
      problems.append(_problem(f"autoencoder.{key}", ae[key], "must be a number >= 0"))
  for key, low in (("disc_start", 0), ("disc_ch", 1), ("disc_layers", 1), ("scale_examples", 1)):
    if not is_int(ae[key], low):
      problems.append(_problem(f"autoencoder.{key}", ae[key], f"must be an int >= {low}"))
  if not (is_number(m.dropout) and 0.0 <= m.dropout < 1.0):
    problems.append(_problem("model.dropout", m.dropout, "must be a probability in [0, 1)"))
  problems += _unet_problems(m, padded_size(config) if is_int(data.image_size, 1) else 0)
  if (
    is_int(data.image_size, 1) and is_int(ae.padded_size, 0) and isinstance(m.ch_mult, tuple | list)
  ):
    factor = 2 ** (len(m.ch_mult) - 1)
    side = padded_size(config)
    if side < data.image_size or side % factor:
      nearest = -(-data.image_size // factor) * factor
      allowed = (
        f"must be 0 (no padding) or a multiple of the downsampling factor {factor} that is"
        f" >= data.image_size={data.image_size}, e.g. {nearest}"
      )
      problems = [p for p in problems if not p.startswith("data.image_size=")]
      problems.append(_problem("autoencoder.padded_size", ae.padded_size, allowed))
  elif not is_int(ae.padded_size, 0):
    problems.append(_problem("autoencoder.padded_size", ae.padded_size, "must be an int >= 0"))
  return problems


def _abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """``nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))``, five times faster.

  nnx.Rngs counts its draws in a JAX array, so under a trace every draw stores a tracer, and
  storing one makes nnx read the tracer's ``.sharding``; JAX answers that AttributeError by
  scanning and printing the trace so far: quadratic in the model's size (1.4 s of 1.7 s for
  configs/fashion_mnist.py). Counting in NumPy draws the same keys, fold_in(key, n), as
  constants. Should a new flax refuse that, the plain build decides (and names any error).
  """

  def build() -> nnx.Module:
    rngs = nnx.Rngs(0)
    rngs.default.count = nnx.RngCount(np.zeros((), np.uint32), tag="default")
    return build_model(config, rngs=rngs)

  try:
    return nnx.eval_shape(build)
  except Exception:  # the plain build below raises the config's own error, if it has one
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class Apply:
  """``apply(params, x, t, y=None, *, key=None)``: the model of ``graphdef`` with ``params``.

  Hashable and compared by its graphdef, so every ``Apply`` of one architecture shares jit
  caches; the parameters stay an argument, never a constant baked into a program.
  """

  graphdef: nnx.GraphDef

  def __call__(
    self,
    params: Any,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
  ) -> jax.Array:
    return nnx.merge(self.graphdef, params)(x, t, y, key=key)

  def gamma(self, params: Any, t: jax.Array) -> jax.Array:
    """The noise schedule gamma(t) of a vdm model (a
    :class:`~jaxdiff.models.noise_schedule.ScheduledDenoiser`): what ``jaxdiff.core.process``
    finds on a bound model function to evaluate the learned schedule inside jit."""
    model = nnx.merge(self.graphdef, params)
    if not isinstance(model, noise_schedule.ScheduledDenoiser):
      raise ValueError(
        f"a {type(model).__name__} has no noise schedule: only a diffusion.process='vdm' model"
        " (ScheduledDenoiser) does"
      )
    return model.gamma(t)


def bind(graphdef: nnx.GraphDef, params: Any) -> jax.tree_util.Partial:
  """The one binder of a graphdef and parameters into ``model_fn(x, t, y=None, *, key=None)``.

  The result is a ``jax.tree_util.Partial``: a pytree whose leaves are the parameters, so a
  jitted sampler or evaluator takes it as an argument and new parameters (another checkpoint,
  the EMA or raw set) reuse the compiled code.
  """
  return jax.tree_util.Partial(Apply(graphdef), params)


def _leaf_size(x: Any) -> int:
  shape = getattr(x, "shape", None)
  return math.prod(shape) if shape is not None else 0


def _as_tree(tree: Any) -> Any:
  # A module is counted by its parameters; anything else is taken as a pytree of arrays
  # (an nnx.State, a pure dict, or the ShapeDtypeStructs of an eval_shape).
  return nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree of arrays or ShapeDtypeStructs (or a module's params)."""
  return sum(_leaf_size(x) for x in jax.tree.leaves(_as_tree(tree)))


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def param_table(state: Any, depth: int | None = None) -> list[tuple[str, int]]:
  """Parameter counts per module, for a ``--dry_run`` summary.

  Args:
    state: an ``nnx.State`` / pytree of parameters (or a module, or eval_shape output).
    depth: aggregate at this many path components (e.g. 1: ``down``, ``up``, ``mid_attn``...);
      None lists every module that owns parameters.

  Returns:
    ``(module_path, count)`` pairs in tree order, with dotted paths such as
    ``"down.0.blocks.1.conv1"``; the counts sum to :func:`count_params`.
  """
  table: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(_as_tree(state))[0]:
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":  # nnx.Variable flattens to its `.value`
      names = names[:-1]
    module = names[:-1]  # drop the parameter's own name (kernel, bias, ...)
    if depth is not None:
      module = module[:depth]
    name = ".".join(module) or "<root>"
    table[name] = table.get(name, 0) + _leaf_size(leaf)
  return list(table.items())
