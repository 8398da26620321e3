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
import ml_collections
from flax import nnx

from jaxdiff.models import layers
from jaxdiff.models.dit import DiT, dit_preset
from jaxdiff.models.unet import UNet

__all__ = [
  "DiT",
  "UNet",
  "Apply",
  "bind",
  "build_model",
  "count_params",
  "dit_preset",
  "output_channels",
  "param_table",
]

MODELS = ("unet", "dit")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def output_channels(config: ml_collections.ConfigDict) -> int:
  """Image channels, doubled when the model also predicts variances (Nichol & Dhariwal 2021)."""
  var_type = config.diffusion.var_type
  if var_type not in VAR_TYPES:
    raise ValueError(
      f"diffusion.var_type={var_type!r} is not supported; expected one of {VAR_TYPES}."
    )
  channels = config.data.channels
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
    A :class:`UNet` or :class:`DiT`.

  Raises:
    ValueError: for a config the model cannot be built from, naming the bad value.
  """
  m, data = config.model, config.data
  if m.name not in MODELS:
    raise ValueError(f"model.name={m.name!r} is not supported; expected one of {MODELS}.")
  if data.channels < 1:
    raise ValueError(f"data.channels={data.channels} must be >= 1.")
  num_classes = 0
  if m.class_conditional:
    if data.num_classes < 1:
      raise ValueError(
        f"model.class_conditional needs data.num_classes >= 1, got {data.num_classes}."
      )
    num_classes = data.num_classes
  common = dict(
    in_channels=data.channels,
    out_channels=output_channels(config),
    image_size=data.image_size,
    num_heads=m.num_heads,
    num_head_channels=m.num_head_channels,
    dropout=m.dropout,
    num_classes=num_classes,
    class_dropout=m.class_dropout,
    mlp_ratio=m.mlp_ratio,
    dtype=layers.compute_dtype(m.compute_dtype),
    remat=m.remat,
    rngs=rngs,
  )
  if m.name == "dit":
    return DiT(
      patch_size=m.patch_size,
      hidden_size=m.hidden_size,
      depth=m.depth,
      **common,
    )
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
