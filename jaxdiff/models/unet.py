"""The DDPM U-Net (Ho et al. 2020, App. B) and its improved-diffusion / ConvNeXt variants.

With ``resblock="ddpm"`` and default options the module mirrors the official TF model
(diffusion_tf/models/unet.py) layer for layer, so the CIFAR-10 configuration has the paper's
35.7M parameters (35,746,307). The variants, all chosen by constructor arguments:

* ``resblock="biggan"``: resampling happens inside residual blocks (Brock et al. 2019, as used
  by Nichol & Dhariwal 2021 / Dhariwal & Nichol 2021).
* ``scale_shift_norm=True``: AdaGN, ``norm(h) * (1 + scale) + shift`` with ``(scale, shift)``
  projected from the embedding (Dhariwal & Nichol 2021, sec. 3).
* ``resblock="convnext"``: ConvNeXt blocks (Liu et al. 2022) with time conditioning.
* ``num_heads`` / ``num_head_channels``: multi-head attention; ``attention="linear"``: linear
  attention.
* ``num_classes``: class-conditional, with a learned null class for classifier-free guidance
  (Ho & Salimans 2022).
* ``context_dim``: text-conditional: cross-attention to text tokens after every self-attention
  layer, and the pooled text embedding added to the timestep embedding (Rombach et al. 2022).

All feature maps are NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import cross_attention, layers
from jaxdiff.models.cross_attention import SpatialCrossAttention
from jaxdiff.models.layers import Array, DType

RESBLOCKS = ("ddpm", "biggan", "convnext")


def _upsample_nearest(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling of ``[B, H, W, C]``."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool_2x(x: Array) -> Array:
  """2x2 average pooling with stride 2 (``tf.nn.avg_pool(x, 2, 2, "SAME")`` on even sizes)."""
  b, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  return x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).mean(axis=(2, 4))


class Downsample(nnx.Module):
  """Halves the resolution: a stride-2 3x3 conv (DDPM) or 2x2 average pooling."""

  def __init__(self, channels: int, *, with_conv: bool, dtype: DType, rngs: nnx.Rngs):
    self.conv = (
      layers.conv(channels, channels, 3, stride=2, dtype=dtype, rngs=rngs) if with_conv else None
    )

  def __call__(self, x: Array, emb: Array, key: Array | None = None) -> Array:
    del emb, key  # same call signature as a resampling ResBlock
    return self.conv(x) if self.conv is not None else _avg_pool_2x(x)


class Upsample(nnx.Module):
  """Doubles the resolution: nearest neighbour, then (DDPM) a 3x3 conv."""

  def __init__(self, channels: int, *, with_conv: bool, dtype: DType, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, dtype=dtype, rngs=rngs) if with_conv else None

  def __call__(self, x: Array, emb: Array, key: Array | None = None) -> Array:
    del emb, key
    x = _upsample_nearest(x)
    return self.conv(x) if self.conv is not None else x


class ResBlock(nnx.Module):
  """DDPM's `resnet_block`, optionally with AdaGN and BigGAN-style internal resampling.

  ``h = conv1(silu(norm1(x)))``; the embedding enters after the first conv, either added
  (DDPM) or as a scale and shift of ``norm2`` (AdaGN); then ``conv2(dropout(silu(.)))`` with
  ``conv2`` zero-initialised, and a 1x1 projection on the skip path when the width changes.
  """

  def __init__(
    self,
    cin: int,
    cout: int,
    emb_dim: int,
    *,
    dropout: float,
    num_groups: int,
    scale_shift_norm: bool = False,
    resample: str | None = None,
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.scale_shift_norm = scale_shift_norm
    self.resample = resample
    self.norm1 = layers.group_norm(cin, num_groups, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    emb_out = 2 * cout if scale_shift_norm else cout
    self.emb_proj = nnx.Linear(
      emb_dim, emb_out, kernel_init=layers.ddpm_init, dtype=dtype, rngs=rngs
    )
    self.norm2 = layers.group_norm(cout, num_groups, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = layers.conv(cout, cout, 3, zero=True, dtype=dtype, rngs=rngs)
    # DDPM's `nin_shortcut` is a dense layer on channels, i.e. a 1x1 conv.
    self.skip = layers.conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def _resample(self, x: Array) -> Array:
    if self.resample == "up":
      return _upsample_nearest(x)
    if self.resample == "down":
      return _avg_pool_2x(x)
    return x

  def __call__(self, x: Array, emb: Array, key: Array | None = None) -> Array:
    h = nnx.silu(self.norm1(x))
    # improved-diffusion resamples after the first norm+activation, before the conv.
    h = self._resample(h)
    x = self._resample(x)
    h = self.conv1(h)
    e = self.emb_proj(nnx.silu(emb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h + e)
    h = self.dropout(nnx.silu(h), deterministic=key is None, rngs=key)
    h = self.conv2(h)
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class ConvNeXtBlock(nnx.Module):
  """A ConvNeXt block (Liu et al. 2022) conditioned on the embedding.

  ``dwconv7x7 -> (+emb | AdaLN) -> LayerNorm -> Dense(mult*cout) -> GELU -> dropout ->
  Dense(cout)``, plus a residual (1x1 projected when the width changes). As in
  denoising-diffusion-pytorch's `ConvNextBlock`, the embedding is added right after the
  depthwise conv; with ``scale_shift_norm`` it modulates the norm instead. The last Dense is
  zero-initialised so the block starts as the identity, like DDPM's blocks.
  """

  def __init__(
    self,
    cin: int,
    cout: int,
    emb_dim: int,
    *,
    dropout: float,
    mlp_ratio: float,
    scale_shift_norm: bool = False,
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.scale_shift_norm = scale_shift_norm
    hidden = int(round(mlp_ratio * cout))
    self.dwconv = layers.conv(cin, cin, 7, groups=cin, dtype=dtype, rngs=rngs)
    emb_out = 2 * cin if scale_shift_norm else cin
    self.emb_proj = nnx.Linear(
      emb_dim, emb_out, kernel_init=layers.ddpm_init, dtype=dtype, rngs=rngs
    )
    self.norm = nnx.LayerNorm(cin, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(cin, hidden, kernel_init=layers.ddpm_init, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.fc2 = nnx.Linear(hidden, cout, kernel_init=layers.zeros_init, dtype=dtype, rngs=rngs)
    self.skip = layers.conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x: Array, emb: Array, key: Array | None = None) -> Array:
    h = self.dwconv(x)
    e = self.emb_proj(nnx.silu(emb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm(h) * (1 + scale) + shift
    else:
      h = self.norm(h + e)
    h = nnx.gelu(self.fc1(h))
    h = self.fc2(self.dropout(h, deterministic=key is None, rngs=key))
    if self.skip is not None:
      x = self.skip(x)
    return x + h


class _Level(nnx.Module):
  """The blocks (and their attention layers) of one resolution, then an optional resampler."""

  def __init__(
    self,
    blocks: list[nnx.Module],
    attns: list[nnx.Module],
    cross_attns: list[SpatialCrossAttention | None],
    resample: nnx.Module | None,
  ):
    self.blocks = nnx.List(blocks)
    self.attns = nnx.List(attns)  # empty, or one per block
    self.cross_attns = nnx.List([a for a in cross_attns if a is not None])  # [] without text
    self.resample = resample

  def attend(self, j: int, h: Array, call: Callable[..., Array], text: tuple[Array, ...]) -> Array:
    """Block ``j``'s self-attention and then its cross-attention to ``text``, where present."""
    if self.attns:
      h = call(self.attns[j], h)
    if self.cross_attns:
      h = call(self.cross_attns[j], h, *text)
    return h


class UNet(nnx.Module):
  """The DDPM U-Net denoiser, ``model(x, t, y=None, *, key=None) -> output``.

  Args:
    in_channels: channels of the input image.
    out_channels: channels of the output (2x in_channels for learned variances).
    image_size: the side the model is built for; attention placement depends on it.
    ch: base width.
    ch_mult: width multiplier per resolution level.
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (feature-map sides) that get self-attention.
    dropout: dropout rate inside residual blocks.
    resblock: "ddpm" | "biggan" | "convnext".
    resample_with_conv: DDPM's conv resamplers (else avg-pool / plain nearest).
    scale_shift_norm: AdaGN time conditioning.
    attention: "standard" | "linear".
    num_heads, num_head_channels: attention heads (``num_head_channels > 0`` wins).
    num_groups: GroupNorm groups.
    num_classes: 0 for an unconditional model, else the number of classes; the embedding
      table gets one extra row, the null class ``num_classes``.
    class_dropout: probability of replacing a label by the null class during training.
    context_dim: 0 for no text, else the width of the text token embeddings the model attends
      to (with as many heads as its self-attention) and of the pooled embedding.
    mlp_ratio: hidden-width multiplier of ConvNeXt blocks.
    dtype: compute dtype (parameters stay float32).
    remat: rematerialise every block in the backward pass.
    rngs: parameter initialisation keys.
  """

  # Long: a model constructor: its arguments, their checks, and its layers in order.
  def __init__(
    self,
    *,
    in_channels: int,
    out_channels: int,
    image_size: int,
    ch: int,
    ch_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    dropout: float = 0.0,
    resblock: str = "ddpm",
    resample_with_conv: bool = True,
    scale_shift_norm: bool = False,
    attention: str = "standard",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_groups: int = 32,
    num_classes: int = 0,
    class_dropout: float = 0.0,
    context_dim: int = 0,
    mlp_ratio: float = 4.0,
    dtype: DType = jnp.float32,
    remat: bool = False,
    rngs: nnx.Rngs,
  ):
    ch_mult = tuple(ch_mult)
    attn_resolutions = tuple(attn_resolutions)
    _validate(
      image_size=image_size,
      ch=ch,
      ch_mult=ch_mult,
      num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions,
      resblock=resblock,
      attention=attention,
      num_groups=num_groups,
      dropout=dropout,
      class_dropout=class_dropout,
    )
    self.ch = ch
    self.num_classes = num_classes
    self.class_dropout = class_dropout
    self.context_dim = context_dim
    self.dtype = dtype
    self.remat = remat
    emb_dim = 4 * ch
    parts = _Parts(
      emb_dim=emb_dim,
      resblock=resblock,
      dropout=dropout,
      mlp_ratio=mlp_ratio,
      scale_shift_norm=scale_shift_norm,
      num_groups=num_groups,
      resample_with_conv=resample_with_conv,
      attention=attention,
      num_heads=num_heads,
      num_head_channels=num_head_channels,
      context_dim=context_dim,
      dtype=dtype,
      rngs=rngs,
    )
    # Layers are created in the order they run: the order fixes which initialisation key
    # each one draws.
    # Timestep embedding MLP: sinusoid(ch) -> Dense(4ch) -> SiLU -> Dense(4ch).
    dense = functools.partial(nnx.Linear, kernel_init=layers.ddpm_init, dtype=dtype, rngs=rngs)
    self.temb_dense0 = dense(ch, emb_dim)
    self.temb_dense1 = dense(emb_dim, emb_dim)
    self.label_emb = (
      nnx.Embed(num_classes + 1, emb_dim, dtype=dtype, rngs=rngs) if num_classes > 0 else None
    )
    # The pooled text embedding joins the timestep embedding, like a class label's.
    self.pooled_proj = dense(context_dim, emb_dim) if context_dim > 0 else None
    self.conv_in = layers.conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
    widths = [ch * m for m in ch_mult]
    sides = [image_size // 2**i for i in range(len(ch_mult))]
    down, skip_ch = _down_levels(parts, ch, widths, sides, num_res_blocks, attn_resolutions)
    self.down = nnx.List(down)
    cur = widths[-1]
    self.mid_block1 = parts.block(cur, cur)
    self.mid_attn, self.mid_cross_attn = parts.attn(cur, "middle")
    self.mid_block2 = parts.block(cur, cur)
    self.up = nnx.List(_up_levels(parts, widths, sides, num_res_blocks, attn_resolutions, skip_ch))
    self.norm_out = layers.group_norm(ch * ch_mult[0], num_groups, dtype=dtype, rngs=rngs)
    self.conv_out = layers.conv(ch * ch_mult[0], out_channels, 3, zero=True, dtype=dtype, rngs=rngs)

  def _embed(self, t: Array, y: Array | None, pooled: Array | None, key: Array | None) -> Array:
    emb = layers.timestep_embedding(t, self.ch)
    emb = self.temb_dense1(nnx.silu(self.temb_dense0(emb)))
    if self.label_emb is not None:
      y = layers.labels_with_null(y, t.shape[0], self.num_classes, self.class_dropout, key)
      emb = emb + self.label_emb(y)
    if self.pooled_proj is not None:
      emb = emb + self.pooled_proj(pooled)
    return emb

  def __call__(
    self, x: Array, t: Array, y: Array | None = None, *, key: Array | None = None
  ) -> Array:
    """Predicts the model output for noisy images ``x`` at timesteps ``t``.

    Args:
      x: ``[B, H, W, C]`` float images.
      t: ``[B]`` timesteps (embedded as given; a scalar is broadcast to the batch).
      y: ``[B]`` int class labels, or None (the null class on a class-conditional model); with
        ``context_dim > 0`` a mapping of text and optional labels, see
        :func:`jaxdiff.models.cross_attention.split_conditioning`.
      key: dropout key; None means deterministic evaluation.

    Returns:
      ``[B, H, W, out_channels]`` float32.
    """
    t = layers.batch_timesteps(t, x.shape[0])
    labels, tokens, mask, pooled = cross_attention.split_conditioning(y)
    layers.check_labels(labels, self.num_classes)
    cross_attention.check_text(tokens, batch=x.shape[0], context_dim=self.context_dim)
    text = (tokens, mask)  # [B, L, Dc], [B, L]
    # Independent streams for label dropout and for the blocks' dropout masks.
    label_key = layers.fold_key(key, 0)
    block_key = layers.fold_key(key, 1)
    emb = self._embed(t, labels, pooled, label_key)
    call = layers.maybe_remat(layers.apply_module, self.remat)
    n = 0

    def run_block(blk: nnx.Module, h: Array) -> Array:
      nonlocal n
      n += 1
      return call(blk, h, emb, layers.fold_key(block_key, n))

    h = self.conv_in(x.astype(self.dtype))  # [B, H, W, ch]
    hs = [h]
    for level in self.down:
      for j, blk in enumerate(level.blocks):
        h = level.attend(j, run_block(blk, h), call, text)
        hs.append(h)
      if level.resample is not None:
        h = run_block(level.resample, h)
        hs.append(h)

    h = run_block(self.mid_block1, h)
    h = call(self.mid_attn, h)
    if self.mid_cross_attn is not None:
      h = call(self.mid_cross_attn, h, *text)
    h = run_block(self.mid_block2, h)

    for level in self.up:
      for j, blk in enumerate(level.blocks):
        h = run_block(blk, jnp.concatenate([h, hs.pop()], axis=-1))
        h = level.attend(j, h, call, text)
      if level.resample is not None:
        h = run_block(level.resample, h)

    h = self.conv_out(nnx.silu(self.norm_out(h)))
    return h.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Parts:
  """Makes the U-Net's blocks, attention layers and resamplers with its options closed over."""

  emb_dim: int
  resblock: str
  dropout: float
  mlp_ratio: float
  scale_shift_norm: bool
  num_groups: int
  resample_with_conv: bool
  attention: str
  num_heads: int
  num_head_channels: int
  context_dim: int
  dtype: DType
  rngs: nnx.Rngs

  def block(self, cin: int, cout: int, resample: str | None = None) -> nnx.Module:
    common = dict(dropout=self.dropout, scale_shift_norm=self.scale_shift_norm, dtype=self.dtype)
    common.update(rngs=self.rngs)
    if self.resblock == "convnext":
      return ConvNeXtBlock(cin, cout, self.emb_dim, mlp_ratio=self.mlp_ratio, **common)
    common.update(num_groups=self.num_groups)
    return ResBlock(cin, cout, self.emb_dim, resample=resample, **common)

  def attn(self, c: int, where: str) -> tuple[nnx.Module, nnx.Module | None]:
    """A self-attention layer and, with text, the cross-attention that follows it (same heads)."""
    heads = layers.resolve_num_heads(c, self.num_heads, self.num_head_channels, where)
    common = dict(num_heads=heads, num_groups=self.num_groups, dtype=self.dtype, rngs=self.rngs)
    attn = layers.SpatialAttention(c, kind=self.attention, **common)
    cross = SpatialCrossAttention(c, self.context_dim, **common) if self.context_dim else None
    return attn, cross

  def resampler(self, c: int, direction: str) -> nnx.Module:
    if self.resblock == "biggan":
      return self.block(c, c, resample=direction)
    cls = Downsample if direction == "down" else Upsample
    return cls(c, with_conv=self.resample_with_conv, dtype=self.dtype, rngs=self.rngs)


def _down_levels(
  parts: _Parts,
  ch: int,
  widths: Sequence[int],
  sides: Sequence[int],
  num_res_blocks: int,
  attn_resolutions: Sequence[int],
) -> tuple[list[_Level], list[int]]:
  """The down path's levels, and the width of every tensor it pushes on the skip stack."""
  skip_ch, cur, levels = [ch], ch, []
  for i, (width, side) in enumerate(zip(widths, sides, strict=True)):
    blocks, attns, crosses = [], [], []
    for j in range(num_res_blocks):
      blocks.append(parts.block(cur, width))
      cur = width
      if side in attn_resolutions:
        attn, cross = parts.attn(cur, f"down level {i} block {j} (resolution {side})")
        attns.append(attn)
        crosses.append(cross)
      skip_ch.append(cur)
    resample = None
    if i != len(widths) - 1:
      resample = parts.resampler(cur, "down")
      skip_ch.append(cur)
    levels.append(_Level(blocks, attns, crosses, resample))
  return levels, skip_ch


def _up_levels(
  parts: _Parts,
  widths: Sequence[int],
  sides: Sequence[int],
  num_res_blocks: int,
  attn_resolutions: Sequence[int],
  skip_ch: list[int],
) -> list[_Level]:
  """The up path's levels; each block takes one skip tensor, so ``skip_ch`` is used up."""
  cur, levels = widths[-1], []
  for i in reversed(range(len(widths))):
    blocks, attns, crosses = [], [], []
    for j in range(num_res_blocks + 1):
      blocks.append(parts.block(cur + skip_ch.pop(), widths[i]))
      cur = widths[i]
      if sides[i] in attn_resolutions:
        attn, cross = parts.attn(cur, f"up level {i} block {j} (resolution {sides[i]})")
        attns.append(attn)
        crosses.append(cross)
    resample = parts.resampler(cur, "up") if i != 0 else None
    levels.append(_Level(blocks, attns, crosses, resample))
  assert not skip_ch, "every skip connection must be consumed"
  return levels


def _validate(
  *,
  image_size: int,
  ch: int,
  ch_mult: tuple[int, ...],
  num_res_blocks: int,
  attn_resolutions: tuple[int, ...],
  resblock: str,
  attention: str,
  num_groups: int,
  dropout: float,
  class_dropout: float,
) -> None:
  """Build-time checks, so a bad config fails before any tracing with a readable message."""
  if resblock not in RESBLOCKS:
    raise ValueError(f"model.resblock={resblock!r} is not supported; expected one of {RESBLOCKS}.")
  if attention not in ("standard", "linear"):
    raise ValueError(
      f"model.attention={attention!r} is not supported; expected 'standard' or 'linear'."
    )
  if not ch_mult or any(m < 1 for m in ch_mult):
    raise ValueError(f"model.ch_mult={ch_mult} must be a non-empty tuple of positive ints.")
  if num_res_blocks < 1:
    raise ValueError(f"model.num_res_blocks={num_res_blocks} must be >= 1.")
  factor = 2 ** (len(ch_mult) - 1)
  if image_size % factor:
    raise ValueError(
      f"data.image_size={image_size} is not divisible by 2**(len(model.ch_mult)-1)={factor} "
      f"(model.ch_mult={ch_mult}); use an image size divisible by {factor} or fewer levels."
    )
  widths = sorted({ch, *(ch * m for m in ch_mult)})
  bad = [w for w in widths if w % num_groups]
  if bad:
    raise ValueError(
      f"model.num_groups={num_groups} does not divide the channel widths {bad} "
      f"(model.ch={ch}, model.ch_mult={ch_mult}); choose num_groups dividing all of {widths}."
    )
  resolutions = [image_size // 2**i for i in range(len(ch_mult))]
  missing = [r for r in attn_resolutions if r not in resolutions]
  if missing:
    raise ValueError(
      f"model.attn_resolutions={attn_resolutions}: resolutions {missing} are never reached; "
      f"with data.image_size={image_size} and model.ch_mult={ch_mult} the feature maps are "
      f"{resolutions}."
    )
  for name, p in (("model.dropout", dropout), ("model.class_dropout", class_dropout)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name}={p} must be a probability in [0, 1].")
