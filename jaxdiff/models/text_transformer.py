"""A small text transformer trained jointly with the denoiser (GLIDE's choice; Nichol et al. 2022).

No pretrained weights and no tokenizer files: a caption is read as its UTF-8 bytes
(:func:`byte_tokenize`, ByT5's idea), so any prompt, in any script, has an encoding, and the
network learns what the words mean from the captions it is trained on. Its outputs are what a
frozen encoder's are (``tokens`` ``[B, L, D]`` zero at padding, ``pooled`` ``[B, D]`` the mean
of the real tokens), so the U-Net and DiT attend to them unchanged.

:class:`TextConditioned` puts it in front of a denoiser: the model's ``y`` then carries the byte
``ids`` and ``mask`` (what the data pipeline and :func:`jaxdiff.prompts.conditioning` give), the
encoder's parameters live in the same tree as the denoiser's, and the optimizer, EMA, sharding
and checkpoints treat them as one model.

Example::

  ids, mask = byte_tokenize(["a dark pullover", ""], max_length=32)  # int32, bool [2, 32]
  enc = TextTransformer(width=128, depth=2, num_heads=4, max_length=32, rngs=nnx.Rngs(0))
  tokens, pooled = enc(ids, mask)                                     # [2, 32, 128], [2, 128]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.cross_attention import masked_attention

Array = jax.Array

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # byte b is id b + 3
VOCAB_SIZE = 256 + BYTE_OFFSET
MIN_MAX_LENGTH = 2  # BOS and EOS: the empty prompt
_init = nnx.initializers.normal(0.02)


def byte_tokenize(texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts -> ``(ids int32 [B, max_length], mask bool [B, max_length])``.

  Each text is lower-cased (as the uncased MiniLM's tokenizer does, so "A Dark Pullover" reads
  as the captions' "a dark pullover"), encoded as UTF-8, truncated to ``max_length - 2`` bytes,
  and framed by BOS and EOS; the rest is padding. The empty prompt is ``[BOS, EOS]``: it has
  real tokens to attend to, as BERT's ``[CLS] [SEP]`` does.
  """
  if not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH:
    raise ValueError(f"max_length={max_length!r}: must be an int >= {MIN_MAX_LENGTH} (BOS, EOS)")
  ids = np.zeros((len(texts), max_length), np.int32)
  for i, text in enumerate(texts):
    body = np.frombuffer(text.lower().encode("utf-8"), np.uint8)[: max_length - 2]
    row = [BOS, *(body.astype(np.int32) + BYTE_OFFSET), EOS]
    ids[i, : len(row)] = row
  return ids, ids != PAD


class _Block(nnx.Module):
  """Pre-LN transformer layer: masked bidirectional self-attention, then a GELU MLP."""

  def __init__(self, width: int, num_heads: int, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, kernel_init=_init, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, kernel_init=_init, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, kernel_init=_init, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, kernel_init=_init, dtype=dtype, rngs=rngs)

  def __call__(self, h: Array, mask: Array) -> Array:
    b, n, c = h.shape
    qkv = self.qkv(self.norm1(h)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    attn = masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask).reshape(b, n, c)
    h = h + self.out(attn)
    return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class TextTransformer(nnx.Module):
  """Byte ids -> token embeddings and their masked mean, trained from scratch.

  Byte and learned position embeddings, ``depth`` pre-LN layers of masked self-attention (every
  real token sees every other; padding is never attended to), a final LayerNorm.

  Args:
    width: embedding width, the denoiser's context width.
    depth: transformer layers.
    num_heads: attention heads; must divide ``width``.
    max_length: tokens per text (the position table's size).
    dtype: compute dtype (parameters stay float32).
    rngs: parameter initialisation keys.
  """

  def __init__(
    self,
    *,
    width: int,
    depth: int,
    num_heads: int,
    max_length: int,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    if num_heads < 1 or width % num_heads:
      raise ValueError(f"text transformer width {width} is not divisible by {num_heads} heads")
    self.max_length = max_length
    self.embed = nnx.Embed(VOCAB_SIZE, width, embedding_init=_init, dtype=dtype, rngs=rngs)
    self.position = nnx.Param(_init(rngs.params(), (max_length, width), jnp.float32))
    self.blocks = nnx.List([_Block(width, num_heads, dtype, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs)

  def __call__(self, ids: Array, mask: Array) -> tuple[Array, Array]:
    """``ids`` int ``[B, L]``, ``mask`` bool ``[B, L]`` -> ``(tokens [B, L, D], pooled [B, D])``,
    float32, tokens zero at padding and ``pooled`` the mean of the real ones."""
    length = ids.shape[1]
    if length > self.max_length:
      raise ValueError(
        f"text ids of length {length}: this text transformer's positions stop at"
        f" {self.max_length} (text.max_length)"
      )
    h = self.embed(ids) + self.position[:length]
    for block in self.blocks:
      h = block(h, mask)
    real = mask[..., None]
    tokens = jnp.where(real, self.norm(h).astype(jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(real, axis=1), 1).astype(jnp.float32)
    return tokens, jnp.sum(tokens, axis=1) / count


class TextConditioned(nnx.Module):
  """A denoiser behind a jointly trained :class:`TextTransformer`.

  Called as the denoiser is, ``model(x, t, y, *, key=None)``, with ``y`` a mapping holding
  ``"ids"`` and ``"mask"`` (and ``"label"`` for a class-conditional text model); the encoder
  turns them into the ``"tokens"``, ``"mask"``, ``"pooled"`` the denoiser attends to. A ``y``
  without ids (class labels or None) goes to the denoiser untouched.
  """

  def __init__(self, denoiser: nnx.Module, encoder: TextTransformer):
    self.denoiser, self.encoder = denoiser, encoder

  def __call__(self, x: Array, t: Array, y: Any = None, *, key: Array | None = None) -> Array:
    if isinstance(y, Mapping) and "ids" in y:
      if "mask" not in y:
        raise ValueError("y has 'ids' but no 'mask': the text transformer needs both [B, L]")
      ids, mask = jnp.asarray(y["ids"]), jnp.asarray(y["mask"]).astype(bool)
      tokens, pooled = self.encoder(ids, mask)
      rest = {k: v for k, v in y.items() if k not in ("ids", "mask")}
      y = {**rest, "tokens": tokens, "mask": mask, "pooled": pooled}
    return self.denoiser(x, t, y, key=key)


def build(config_text: Any, *, denoiser: nnx.Module, dtype: Any, rngs: nnx.Rngs) -> TextConditioned:
  """``denoiser`` behind the text transformer ``config.text.transformer`` describes."""
  tt = config_text.transformer
  encoder = TextTransformer(
    width=tt.width,
    depth=tt.depth,
    num_heads=tt.num_heads,
    max_length=config_text.max_length,
    dtype=dtype,
    rngs=rngs,
  )
  return TextConditioned(denoiser, encoder)
