"""Cross-attention from image tokens to text token embeddings, and the text conditioning input.

A text-conditional denoiser takes its conditioning as a mapping (what ``jaxdiff.text.encode``
returns, optionally with class labels)::

  y = {
    "tokens": tokens,  # [B, L, Dc] float: text token embeddings
    "mask": mask,      # [B, L] bool (or 0/1 ints): True at real tokens, False at padding
    "pooled": pooled,  # [B, Dc] float: one sentence embedding per caption
    "label": labels,   # [B] int, optional: class labels, as a plain ``y`` array means
  }

The image attends to the tokens as in Rombach et al. 2022 (LDM's spatial transformer) and
Chen et al. 2023 (PixArt-alpha): queries from the image, keys and values from the text, padding
never attended to. The pooled embedding is added to the timestep embedding by the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import layers
from jaxdiff.models.layers import Array, DType

TEXT_KEYS = ("tokens", "mask", "pooled")
CONDITIONING_KEYS = ("label", *TEXT_KEYS)


def _describe(v: Any) -> str:
  return f"shape {tuple(jnp.shape(v))} {jnp.result_type(v)}"


def split_conditioning(y: Any) -> tuple[Array | None, Array | None, Array | None, Array | None]:
  """Splits a model's ``y`` into ``(labels, tokens, mask, pooled)``.

  A ``y`` that is not a mapping (an int ``[B]`` array or None) is class labels, as always, and
  is returned untouched with no text. A mapping may hold the keys ``"label"``, ``"tokens"``,
  ``"mask"`` and ``"pooled"`` (a None value counts as absent); the three text keys come
  together or not at all. An encoder without a sentence embedding can pass zeros as
  ``"pooled"``.

  Returns:
    ``labels`` ``[B]`` or None; ``tokens`` ``[B, L, Dc]``, ``mask`` ``[B, L]`` bool and
    ``pooled`` ``[B, Dc]``, or three Nones.

  Raises:
    ValueError: for unknown keys, a partial text triple, or shapes and dtypes that do not fit,
      naming the bad value and what is allowed.
  """
  if not isinstance(y, Mapping):
    return y, None, None, None
  unknown = sorted(str(k) for k in y if k not in CONDITIONING_KEYS)
  if unknown:
    raise ValueError(
      f"y has unknown keys {unknown}; a conditioning mapping may hold {list(CONDITIONING_KEYS)}."
    )
  given = {k: y[k] for k in CONDITIONING_KEYS if y.get(k) is not None}
  labels = given.get("label")
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"y['label'] must be [B] int class labels, got {_describe(labels)}.")
  text = [k for k in TEXT_KEYS if k in given]
  if not text:
    return labels, None, None, None
  if len(text) != len(TEXT_KEYS):
    missing = [k for k in TEXT_KEYS if k not in given]
    raise ValueError(
      f"y has {text} but not {missing}: text conditioning needs all of {list(TEXT_KEYS)} "
      "(tokens [B, L, Dc], mask [B, L] True at real tokens, pooled [B, Dc]; what "
      "jaxdiff.text.encode returns)."
    )
  tokens, mask, pooled = (jnp.asarray(given[k]) for k in TEXT_KEYS)
  if tokens.ndim != 3 or not jnp.issubdtype(tokens.dtype, jnp.floating):
    raise ValueError(f"y['tokens'] must be [B, L, Dc] floats, got {_describe(tokens)}.")
  b, length, dim = tokens.shape
  if mask.shape != (b, length) or not (
    mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)
  ):
    raise ValueError(
      f"y['mask'] must be [B, L]=({b}, {length}) bools (True at real tokens) to match "
      f"y['tokens'] of shape {tokens.shape}, got {_describe(mask)}."
    )
  if pooled.shape != (b, dim) or not jnp.issubdtype(pooled.dtype, jnp.floating):
    raise ValueError(
      f"y['pooled'] must be [B, Dc]=({b}, {dim}) floats to match y['tokens'] of shape "
      f"{tokens.shape}, got {_describe(pooled)}."
    )
  if labels is not None and labels.shape != (b,):
    raise ValueError(
      f"y['label'] has shape {labels.shape} but y['tokens'] has batch {b}; both are per example."
    )
  return labels, tokens, mask.astype(jnp.bool_), pooled


def check_text(tokens: Array | None, *, batch: int, context_dim: int) -> None:
  """Checks that text is given exactly when the model attends to text, at the right width.

  Raises:
    ValueError: text for a model without cross-attention (``context_dim=0``), no text for one
      with it, or tokens whose batch or width do not fit.
  """
  if context_dim == 0:
    if tokens is not None:
      raise ValueError(
        "y has text ('tokens', 'mask', 'pooled') but the model has no cross-attention "
        "(context_dim=0); build it with context_dim=<text embedding width> to condition on "
        "text, or pass only class labels."
      )
    return
  if tokens is None:
    raise ValueError(
      f"The model attends to text (context_dim={context_dim}) but y has no text: pass "
      f"y={{'tokens': [B, L, {context_dim}], 'mask': [B, L] bool, 'pooled': [B, "
      f"{context_dim}]}} (plus 'label' for class labels); for an unconditional sample pass the "
      "empty caption's encoding."
    )
  if tokens.shape[0] != batch or tokens.shape[2] != context_dim:
    raise ValueError(
      f"y['tokens'] has shape {tokens.shape}; the model needs [B, L, Dc] with B={batch} (the "
      f"batch of x) and Dc=context_dim={context_dim}."
    )


def masked_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Softmax attention that never attends to padding; a row with no real key gives zeros.

  Args:
    q: queries ``[B, N, heads, d]``.
    k: keys ``[B, L, heads, d]``.
    v: values ``[B, L, heads, e]``.
    mask: ``[B, L]`` bool, True at real keys.

  Returns:
    ``[B, N, heads, e]`` in the dtype of ``v``.
  """
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)  # [B, heads, N, L] float32
  keep = mask[:, None, None, :]  # [B, 1, 1, L]
  # Padding's logits are replaced (not offset), so no token value there can reach the output.
  logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  # With a real key, padding's weights are exactly 0 already; with none, the softmax is
  # uniform over padding, and zeroing it makes the row's output 0 rather than an average.
  weights = jnp.where(keep, weights, 0.0).astype(v.dtype)
  return jnp.einsum("bhnm,bmhe->bnhe", weights, v)


class CrossAttention(nnx.Module):
  """Pre-norm residual cross-attention, ``x + proj_out(attn(norm(x), context))``, on tokens.

  Queries come from the ``[B, N, channels]`` tokens, keys and values from the
  ``[B, L, context_dim]`` context. The output projection is zero-initialised and has no bias,
  so the layer is the identity at initialisation and for a context that is all padding.

  Args:
    channels: width of the attending tokens.
    context_dim: width of the context (text) tokens.
    num_heads: attention heads; must divide ``channels``.
    num_groups: None for a LayerNorm over channels (transformer tokens); a count for a
      GroupNorm (the U-Net's feature maps, see :class:`SpatialCrossAttention`).
    dtype: compute dtype (parameters stay float32).
    rngs: parameter initialisation keys.
  """

  def __init__(
    self,
    channels: int,
    context_dim: int,
    *,
    num_heads: int,
    num_groups: int | None = None,
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_heads < 1 or channels % num_heads:
      raise ValueError(f"Cross-attention width {channels} is not divisible by {num_heads} heads.")
    self.num_heads = num_heads
    if num_groups is None:
      self.norm = nnx.LayerNorm(channels, epsilon=1e-6, dtype=dtype, rngs=rngs)
    else:
      self.norm = layers.group_norm(channels, num_groups, dtype=dtype, rngs=rngs)

    def proj(din: int, init: Any = layers.ddpm_init, use_bias: bool = True) -> nnx.Linear:
      return nnx.Linear(din, channels, kernel_init=init, use_bias=use_bias, dtype=dtype, rngs=rngs)

    self.q, self.k, self.v = proj(channels), proj(context_dim), proj(context_dim)
    self.proj_out = proj(channels, layers.zeros_init, use_bias=False)

  def __call__(self, x: Array, context: Array, mask: Array) -> Array:
    """Tokens ``x`` ``[B, N, C]`` attend to ``context`` ``[B, L, Dc]`` (``mask`` ``[B, L]``)."""
    b, n, c = x.shape
    length = context.shape[1]
    # Padding is zeroed before the projections too: even inf or NaN there cannot leak through.
    context = jnp.where(mask[..., None], context, 0)

    def heads(p: nnx.Linear, h: Array, rows: int) -> Array:
      return p(h).reshape(b, rows, self.num_heads, c // self.num_heads)

    q = heads(self.q, self.norm(x), n)  # [B, N, heads, C/heads]
    k, v = heads(self.k, context, length), heads(self.v, context, length)  # [B, L, heads, C/heads]
    return x + self.proj_out(masked_attention(q, k, v, mask).reshape(b, n, c))


class SpatialCrossAttention(CrossAttention):
  """:class:`CrossAttention` for an NHWC feature map: GroupNorm, then every pixel attends.

  The cross-attention half of LDM's spatial transformer, placed after a U-Net self-attention
  layer. GroupNorm's statistics over ``[B, H*W, C]`` equal those over ``[B, H, W, C]``.
  """

  def __init__(
    self,
    channels: int,
    context_dim: int,
    *,
    num_heads: int,
    num_groups: int,
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      channels, context_dim, num_heads=num_heads, num_groups=num_groups, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: Array, context: Array, mask: Array) -> Array:
    """Pixels of ``x`` ``[B, H, W, C]`` attend to ``context`` ``[B, L, Dc]`` (``mask``)."""
    b, h, w, c = x.shape
    return super().__call__(x.reshape(b, h * w, c), context, mask).reshape(b, h, w, c)
