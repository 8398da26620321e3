"""Pieces shared by the denoisers: timestep embeddings, attention, norms, initialisers.

Every layer here follows one dtype rule: parameters are created and stored in float32, and
the arithmetic runs in ``dtype`` (the model's compute dtype, float32 or bfloat16). Reductions
that lose precision in bfloat16 (norm statistics, softmax) are done in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
DType = Any

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Ho et al.'s TF code initialises every conv and dense layer with
# variance_scaling(scale, "fan_avg", "uniform") (diffusion_tf/nn.py `default_init`); scale 0
# there means "start at zero" (they pass 1e-10 only because TF refuses 0).
ddpm_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nnx.initializers.zeros_init()


def compute_dtype(name: str) -> DType:
  """Maps a config string ("float32" | "bfloat16") to a JAX dtype.

  Raises:
    ValueError: for any other name.
  """
  if name not in COMPUTE_DTYPES:
    raise ValueError(
      f"model.compute_dtype={name!r} is not supported; expected one of {sorted(COMPUTE_DTYPES)}."
    )
  return COMPUTE_DTYPES[name]


def timestep_embedding(
  t: Array,
  dim: int,
  *,
  max_period: float = 10_000.0,
  freq_shift: float = 1.0,
  cos_first: bool = False,
) -> Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, Vaswani et al. 2017, sec. 3.5.

  With the defaults this is exactly `get_timestep_embedding` of Ho et al. 2020
  (diffusion_tf/nn.py): frequencies ``exp(-log(max_period) * i / (half - 1))`` and
  ``[sin, cos]`` order. DiT (Peebles & Xie 2023) uses ``freq_shift=0, cos_first=True``.

  Args:
    t: timesteps, shape ``[B]``; integer indices are embedded as floats, unscaled.
    dim: embedding width; an odd width is zero-padded by one column.
    max_period: the longest wavelength.
    freq_shift: the denominator of the exponent is ``half - freq_shift``.
    cos_first: put the cosine half first.

  Returns:
    A float32 array of shape ``[B, dim]``.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
  parts = (jnp.cos(args), jnp.sin(args)) if cos_first else (jnp.sin(args), jnp.cos(args))
  emb = jnp.concatenate(parts, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int) -> Array:
  """Fixed 2D sine-cosine positional embedding (MAE / DiT `get_2d_sincos_pos_embed`).

  Half of the channels encode the row, half the column, each with 1D sin-cos features of
  frequency ``1 / 10000**(i / (dim/4))``. Computed from static shapes, so under jit it is a
  compile-time constant and never part of the parameters.

  Args:
    dim: embedding width, divisible by 4.
    grid_h: number of patch rows.
    grid_w: number of patch columns.

  Returns:
    A float32 array of shape ``[grid_h * grid_w, dim]``, row-major over the grid.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}.")

  def embed_1d(pos: Array, d: int) -> Array:
    omega = 1.0 / 10_000.0 ** (jnp.arange(d // 2, dtype=jnp.float32) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)

  # DiT builds the grid as meshgrid(w, h), so the first half of the channels encodes the
  # column index; we keep that order so weights are interchangeable with the reference.
  rows, cols = jnp.meshgrid(
    jnp.arange(grid_h, dtype=jnp.float32), jnp.arange(grid_w, dtype=jnp.float32), indexing="ij"
  )
  return jnp.concatenate([embed_1d(cols, dim // 2), embed_1d(rows, dim // 2)], axis=-1)


def resolve_num_heads(channels: int, num_heads: int, num_head_channels: int, where: str) -> int:
  """Number of attention heads for a layer of width ``channels``.

  ``num_head_channels > 0`` fixes the head width (improved-diffusion's convention), otherwise
  ``num_heads`` fixes the head count.

  Raises:
    ValueError: if the width does not split evenly into heads.
  """
  if num_head_channels > 0:
    if channels % num_head_channels:
      raise ValueError(
        f"{where}: width {channels} is not divisible by model.num_head_channels="
        f"{num_head_channels}; choose a head width dividing every attention layer's width."
      )
    return channels // num_head_channels
  if num_heads < 1 or channels % num_heads:
    raise ValueError(
      f"{where}: width {channels} is not divisible by model.num_heads={num_heads}; "
      "choose a positive head count dividing every attention layer's width."
    )
  return num_heads


def conv(
  cin: int,
  cout: int,
  kernel: int,
  *,
  dtype: DType,
  rngs: nnx.Rngs,
  stride: int = 1,
  zero: bool = False,
  groups: int = 1,
) -> nnx.Conv:
  """A SAME-padded square conv with DDPM's initialisation (zero with ``zero``: a residual branch
  that starts as the identity)."""
  return nnx.Conv(
    cin,
    cout,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding="SAME",
    feature_group_count=groups,
    kernel_init=zeros_init if zero else ddpm_init,
    dtype=dtype,
    rngs=rngs,
  )


def group_norm(channels: int, num_groups: int, *, dtype: DType, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm over the channel axis with the TF-contrib epsilon (1e-6) DDPM used."""
  return nnx.GroupNorm(channels, num_groups=num_groups, epsilon=1e-6, dtype=dtype, rngs=rngs)


def dot_product_attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention, ``softmax(q k^T / sqrt(d)) v``, per head.

  Args:
    q: queries ``[B, N, heads, d]``.
    k: keys ``[B, M, heads, d]``.
    v: values ``[B, M, heads, e]``.

  Returns:
    ``[B, N, heads, e]`` in the dtype of ``v``.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (q.shape[-1] ** -0.5)
  # The softmax's exp/sum lose too much in bfloat16 once N is in the hundreds.
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhe->bnhe", weights, v)


def linear_attention(q: Array, k: Array, v: Array) -> Array:
  """Linear attention (Shen et al. 2021; denoising-diffusion-pytorch `LinearAttention`).

  ``q`` is softmaxed over its features and ``k`` over positions, so that
  ``context = k^T v`` is a ``[d, e]`` matrix per head and the cost is linear in positions.

  Args:
    q: queries ``[B, N, heads, d]``.
    k: keys ``[B, N, heads, d]``.
    v: values ``[B, N, heads, e]``.

  Returns:
    ``[B, N, heads, e]`` in the dtype of ``v``.
  """
  q = jax.nn.softmax(q.astype(jnp.float32), axis=-1) * (q.shape[-1] ** -0.5)
  k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
  context = jnp.einsum("bnhd,bnhe->bhde", k, v.astype(jnp.float32))
  return jnp.einsum("bhde,bnhd->bnhe", context, q).astype(v.dtype)


class SpatialAttention(nnx.Module):
  """Pre-norm residual self-attention over the pixels of an NHWC feature map.

  With one head this is DDPM's `attn_block` (GroupNorm, 1x1 q/k/v "NIN" projections, softmax
  over all positions, zero-initialised output projection). ``kind="linear"`` swaps the softmax
  attention for :func:`linear_attention`, keeping the same projections.
  """

  def __init__(
    self,
    channels: int,
    *,
    num_heads: int,
    num_groups: int,
    kind: str = "standard",
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if kind not in ("standard", "linear"):
      raise ValueError(
        f"model.attention={kind!r} is not supported; expected 'standard' or 'linear'."
      )
    self.num_heads = num_heads
    self.kind = kind
    self.norm = group_norm(channels, num_groups, dtype=dtype, rngs=rngs)

    def proj(init: Callable[..., Array] = ddpm_init) -> nnx.Linear:
      # A Dense on the channel axis of NHWC is DDPM's 1x1 "nin" layer.
      return nnx.Linear(channels, channels, kernel_init=init, dtype=dtype, rngs=rngs)

    self.q, self.k, self.v = proj(), proj(), proj()
    # Zero init makes each attention block the identity at initialisation (DDPM).
    self.proj_out = proj(zeros_init)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = self.norm(x).reshape(b, h * w, c)

    def heads(p: nnx.Linear) -> Array:
      return p(y).reshape(b, h * w, self.num_heads, c // self.num_heads)

    attend = dot_product_attention if self.kind == "standard" else linear_attention
    out = attend(heads(self.q), heads(self.k), heads(self.v)).reshape(b, h * w, c)
    return x + self.proj_out(out).reshape(b, h, w, c)


def maybe_remat(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
  """``nnx.remat(fn)`` when enabled, else ``fn``.

  ``fn`` must take the module as its first argument: nnx.remat refuses bound methods, and
  passing the module explicitly lets the lifted transform see its parameters.
  """
  return nnx.remat(fn) if enabled else fn


def apply_module(module: nnx.Module, *args: Any) -> Any:
  """Calls ``module(*args)``; the unbound form :func:`maybe_remat` needs."""
  return module(*args)


def fold_key(key: Array | None, index: int) -> Array | None:
  """A per-layer dropout key, or None (deterministic) when no key was given."""
  return None if key is None else jax.random.fold_in(key, index)


def batch_timesteps(t: Array, batch: int) -> Array:
  """Timesteps as a ``[B]`` array; a scalar (one step for the whole batch) is broadcast."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    t = jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t must have shape [B]=({batch},) or be a scalar, got {t.shape}.")
  return t


def check_labels(y: Array | None, num_classes: int) -> None:
  """Rejects labels given to an unconditional model (they would be silently ignored)."""
  if y is not None and num_classes == 0:
    raise ValueError(
      "Class labels y were passed to an unconditional model; set "
      "config.model.class_conditional=True to train a class-conditional model, or pass y=None."
    )


def labels_with_null(
  y: Array | None, batch: int, num_classes: int, drop_prob: float, key: Array | None
) -> Array:
  """Labels for a table whose extra row ``num_classes`` is the null class.

  The null class is what classifier-free guidance (Ho & Salimans 2022) uses as "no label".

  ``y=None`` selects the null class. With a key, each label is independently replaced by the
  null class with probability ``drop_prob``; without one (evaluation) labels are kept.
  """
  if y is None:
    return jnp.full((batch,), num_classes, dtype=jnp.int32)
  y = jnp.asarray(y, dtype=jnp.int32)
  if key is not None and drop_prob > 0:
    drop = jax.random.bernoulli(key, drop_prob, y.shape)
    y = jnp.where(drop, num_classes, y)
  return y
