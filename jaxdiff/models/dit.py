"""Diffusion Transformer, DiT (Peebles & Xie 2023), with adaLN-Zero conditioning.

Follows the official PyTorch model (facebookresearch/DiT, models.py): patchify with a
stride-``patch`` conv, fixed 2D sin-cos position embedding, ``depth`` transformer blocks whose
LayerNorms are modulated by ``c = t_emb (+ y_emb)`` through a zero-initialised
``SiLU -> Dense(6 * hidden)`` (shift/scale/gate for attention and MLP), then an adaLN final
layer projecting each token to a ``patch x patch x out_channels`` patch. Images are NHWC.

With ``context_dim > 0`` the model is text-conditional as PixArt-alpha (Chen et al. 2023): each
block cross-attends to the text tokens between self-attention and MLP (a residual, not
adaLN-modulated), and the pooled text embedding is projected and added to ``c``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import cross_attention, layers
from jaxdiff.models.cross_attention import CrossAttention
from jaxdiff.models.layers import Array, DType

# DiT's initialisation: xavier-uniform Linear layers with zero bias; N(0, 0.02) for the
# timestep MLP and label table; zeros for every adaLN modulation and the output projection.
xavier_init = nnx.initializers.xavier_uniform()
normal_init = nnx.initializers.normal(0.02)
zeros_init = layers.zeros_init
# The patch-embedding conv kernel [p, p, C, D] is initialised as the [p*p*C, D] matrix it is.
patch_init = nnx.initializers.variance_scaling(
  1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1
)

# Model sizes of Peebles & Xie 2023, Table 1, plus scaled-down ones for small images and tests.
_DIT_SIZES = {
  "xl": dict(depth=28, hidden_size=1152, num_heads=16),
  "l": dict(depth=24, hidden_size=1024, num_heads=16),
  "b": dict(depth=12, hidden_size=768, num_heads=12),
  "s": dict(depth=12, hidden_size=384, num_heads=6),
  # Not in the paper: DiT-S halved in width and depth (~4M params), and a test-sized one.
  "xs": dict(depth=6, hidden_size=192, num_heads=3),
  "xxs": dict(depth=2, hidden_size=64, num_heads=2),
}


def dit_preset(name: str) -> dict[str, Any]:
  """Model-config overrides for a named DiT size, e.g. ``"dit_s2"`` = DiT-S/2.

  Names are ``dit_<size><patch>`` with size in xl, l, b, s (the paper's) or xs, xxs (scaled
  down for 32x32 images / tests) and patch in 2, 4, 8. Usage::

    config.model.update(dit_preset("dit_xs2"))

  Returns:
    A dict of ``config.model`` fields (``name``, ``depth``, ``hidden_size``, ``num_heads``,
    ``num_head_channels``, ``patch_size``, ``mlp_ratio``).

  Raises:
    ValueError: for an unknown name.
  """
  allowed = [f"dit_{s}{p}" for s in _DIT_SIZES for p in (2, 4, 8)]
  if name not in allowed:
    raise ValueError(f"Unknown DiT preset {name!r}; expected one of {allowed}.")
  size, patch = name[4:-1], int(name[-1])
  return dict(name="dit", patch_size=patch, mlp_ratio=4.0, num_head_channels=-1, **_DIT_SIZES[size])


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """adaLN: ``x * (1 + scale) + shift`` with per-example ``[B, D]`` shift and scale."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _linear(din: int, dout: int, init: Any, dtype: DType, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=init, dtype=dtype, rngs=rngs)


def _layer_norm(dim: int, dtype: DType, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # No affine parameters: adaLN supplies the scale and shift.
  return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, rngs=rngs)


class DiTBlock(nnx.Module):
  """A transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3).

  With ``context_dim > 0``, cross-attention to the text follows the self-attention (PixArt).
  """

  def __init__(
    self,
    hidden: int,
    *,
    num_heads: int,
    mlp_ratio: float,
    dropout: float,
    context_dim: int = 0,
    dtype: DType,
    rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    mlp_hidden = int(hidden * mlp_ratio)
    self.norm1 = _layer_norm(hidden, dtype, rngs)
    self.qkv = _linear(hidden, 3 * hidden, xavier_init, dtype, rngs)
    self.proj = _linear(hidden, hidden, xavier_init, dtype, rngs)
    self.cross_attn = (
      CrossAttention(hidden, context_dim, num_heads=num_heads, dtype=dtype, rngs=rngs)
      if context_dim > 0
      else None
    )
    self.norm2 = _layer_norm(hidden, dtype, rngs)
    self.fc1 = _linear(hidden, mlp_hidden, xavier_init, dtype, rngs)
    self.fc2 = _linear(mlp_hidden, hidden, xavier_init, dtype, rngs)
    self.dropout = nnx.Dropout(dropout)
    # Zero init: every block starts as the identity ("adaLN-Zero").
    self.ada_ln = _linear(hidden, 6 * hidden, zeros_init, dtype, rngs)

  def __call__(
    self,
    x: Array,
    c: Array,
    key: Array | None = None,
    context: Array | None = None,
    mask: Array | None = None,
  ) -> Array:
    """``x`` ``[B, N, D]``, ``c`` ``[B, D]``; ``context`` ``[B, L, Dc]`` and ``mask`` ``[B, L]``
    the text when the block has cross-attention."""
    b, n, d = x.shape
    mod = self.ada_ln(nnx.silu(c))  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    drop_keys = (layers.fold_key(key, 0), layers.fold_key(key, 1))

    h = _modulate(self.norm1(x), shift_msa, scale_msa)
    q, k, v = jnp.split(self.qkv(h).reshape(b, n, 3 * self.num_heads, d // self.num_heads), 3, 2)
    h = self.proj(layers.dot_product_attention(q, k, v).reshape(b, n, d))
    h = self.dropout(h, deterministic=key is None, rngs=drop_keys[0])
    x = x + gate_msa[:, None, :] * h
    if self.cross_attn is not None:
      x = self.cross_attn(x, context, mask)

    h = _modulate(self.norm2(x), shift_mlp, scale_mlp)
    h = nnx.gelu(self.fc1(h), approximate=True)  # DiT: GELU(approximate="tanh")
    h = self.fc2(self.dropout(h, deterministic=key is None, rngs=drop_keys[1]))
    return x + gate_mlp[:, None, :] * h


class DiT(nnx.Module):
  """The DiT denoiser, ``model(x, t, y=None, *, key=None) -> output``.

  Args:
    in_channels: channels of the input image.
    out_channels: channels of the output (2x in_channels for learned variances).
    image_size: image side; must be divisible by ``patch_size``.
    patch_size: side of the square patches (tokens).
    hidden_size: token width.
    depth: number of transformer blocks.
    num_heads, num_head_channels: attention heads (``num_head_channels > 0`` wins).
    mlp_ratio: MLP hidden width / token width.
    dropout: dropout on the attention output and MLP hidden layer (the paper uses 0).
    num_classes: 0 for unconditional; otherwise the label table has a null row ``num_classes``.
    class_dropout: label dropout probability for classifier-free guidance (paper: 0.1).
    context_dim: 0 for no text, else the width of the text token embeddings every block
      attends to (with as many heads as its self-attention) and of the pooled embedding.
    freq_dim: width of the sinusoidal timestep features (paper: 256).
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
    patch_size: int,
    hidden_size: int,
    depth: int,
    num_heads: int = 1,
    num_head_channels: int = -1,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    num_classes: int = 0,
    class_dropout: float = 0.0,
    context_dim: int = 0,
    freq_dim: int = 256,
    dtype: DType = jnp.float32,
    remat: bool = False,
    rngs: nnx.Rngs,
  ):
    if patch_size < 1 or image_size % patch_size:
      raise ValueError(
        f"data.image_size={image_size} is not divisible by model.patch_size={patch_size}; "
        "DiT needs a whole number of patches per side."
      )
    if hidden_size % 4:
      raise ValueError(
        f"model.hidden_size={hidden_size} must be divisible by 4 for the 2D sin-cos position "
        "embedding."
      )
    if depth < 1:
      raise ValueError(f"model.depth={depth} must be >= 1.")
    for name, p in (("model.dropout", dropout), ("model.class_dropout", class_dropout)):
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} must be a probability in [0, 1].")
    heads = layers.resolve_num_heads(hidden_size, num_heads, num_head_channels, "DiT")

    self.patch_size = patch_size
    self.out_channels = out_channels
    self.hidden_size = hidden_size
    self.freq_dim = freq_dim
    self.num_classes = num_classes
    self.class_dropout = class_dropout
    self.context_dim = context_dim
    self.dtype = dtype
    self.remat = remat

    self.patch_embed = nnx.Conv(
      in_channels,
      hidden_size,
      kernel_size=(patch_size, patch_size),
      strides=(patch_size, patch_size),
      padding="VALID",
      kernel_init=patch_init,
      dtype=dtype,
      rngs=rngs,
    )
    self.t_dense0 = _linear(freq_dim, hidden_size, normal_init, dtype, rngs)
    self.t_dense1 = _linear(hidden_size, hidden_size, normal_init, dtype, rngs)
    self.label_emb = (
      nnx.Embed(num_classes + 1, hidden_size, embedding_init=normal_init, dtype=dtype, rngs=rngs)
      if num_classes > 0
      else None
    )
    # The pooled text embedding joins c, like a class label's (initialised like the label table).
    self.pooled_proj = (
      _linear(context_dim, hidden_size, normal_init, dtype, rngs) if context_dim > 0 else None
    )
    self.blocks = nnx.List(
      [
        DiTBlock(
          hidden_size,
          num_heads=heads,
          mlp_ratio=mlp_ratio,
          dropout=dropout,
          context_dim=context_dim,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(depth)
      ]
    )
    self.final_norm = _layer_norm(hidden_size, dtype, rngs)
    self.final_ada_ln = _linear(hidden_size, 2 * hidden_size, zeros_init, dtype, rngs)
    self.final_linear = _linear(
      hidden_size, patch_size * patch_size * out_channels, zeros_init, dtype, rngs
    )

  def __call__(
    self, x: Array, t: Array, y: Array | None = None, *, key: Array | None = None
  ) -> Array:
    """Predicts the model output for noisy images ``x`` at timesteps ``t``.

    Args:
      x: ``[B, H, W, C]`` float images, ``H`` and ``W`` divisible by the patch size.
      t: ``[B]`` timesteps (embedded as given; a scalar is broadcast to the batch).
      y: ``[B]`` int class labels, or None (the null class on a class-conditional model); with
        ``context_dim > 0`` a mapping of text and optional labels, see
        :func:`jaxdiff.models.cross_attention.split_conditioning`.
      key: dropout key; None means deterministic evaluation.

    Returns:
      ``[B, H, W, out_channels]`` float32.
    """
    b, height, width, _ = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"DiT input {height}x{width} is not divisible by patch size {p}.")
    t = layers.batch_timesteps(t, b)
    labels, tokens, mask, pooled = cross_attention.split_conditioning(y)
    layers.check_labels(labels, self.num_classes)
    cross_attention.check_text(tokens, batch=b, context_dim=self.context_dim)
    gh, gw = height // p, width // p

    h = self.patch_embed(x.astype(self.dtype)).reshape(b, gh * gw, self.hidden_size)  # [B, N, D]
    h = h + layers.sincos_2d_pos_embed(self.hidden_size, gh, gw).astype(self.dtype)[None]

    t_freq = layers.timestep_embedding(t, self.freq_dim, freq_shift=0.0, cos_first=True)
    c = self.t_dense1(nnx.silu(self.t_dense0(t_freq)))  # [B, D]
    if self.label_emb is not None:
      labels = layers.labels_with_null(
        labels, b, self.num_classes, self.class_dropout, layers.fold_key(key, 0)
      )
      c = c + self.label_emb(labels)
    if self.pooled_proj is not None:
      c = c + self.pooled_proj(pooled)

    call = layers.maybe_remat(layers.apply_module, self.remat)
    block_key = layers.fold_key(key, 1)
    text = () if tokens is None else (tokens, mask)  # [B, L, Dc], [B, L]
    for i, blk in enumerate(self.blocks):
      h = call(blk, h, c, layers.fold_key(block_key, i), *text)

    shift, scale = jnp.split(self.final_ada_ln(nnx.silu(c)), 2, axis=-1)
    h = self.final_linear(_modulate(self.final_norm(h), shift, scale))  # [B, N, p*p*C_out]
    h = h.reshape(b, gh, gw, p, p, self.out_channels)
    h = h.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, self.out_channels)
    return h.astype(jnp.float32)
