"""The latent-diffusion autoencoder: LDM's "KL-f" model (Rombach et al. 2022, sec. 3 and app. G).

An encoder of ResNet blocks maps an image ``[B, H, W, C]`` to the mean and log-variance of a
diagonal Gaussian posterior over latents ``[B, H/f, W/f, c]`` (f = 2 ** (len(ch_mult) - 1)); a
mirrored decoder maps latents back to pixels. With a small KL weight the posterior is nearly a
point, and the latent space stays close to a standard normal only in scale (hence the scale
factor of ``jaxdiff.latent``).

Images whose side is not a multiple of f are padded (edge-replicated) to ``padded_size`` before
encoding and the decoder's output is cropped back, so a 28x28 image with f = 4 and
``padded_size = 32`` has 8x8 latents: a side the U-Net can halve and DiT can patch by 2.

The patch discriminator (Isola et al. 2017, as LDM uses it) is part of the module so that one
parameter tree, one optimizer and one checkpoint hold everything the autoencoder run trains;
encoding and decoding never touch it. It uses GroupNorm where pix2pix uses BatchNorm, so the
train state stays parameters only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models import layers

Array = jax.Array
DType = layers.DType

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamps the log-variance


def latent_side(padded_size: int, ch_mult: tuple[int, ...]) -> int:
  """The latent side for images padded to ``padded_size``: one halving per extra level."""
  return padded_size // 2 ** (len(ch_mult) - 1)


def pad_to(x: Array, size: int) -> Array:
  """Edge-replicates ``x [B, H, W, C]`` to ``[B, size, size, C]`` (extra rows split evenly,
  the odd one at the bottom/right)."""
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  top, left = (size - h) // 2, (size - w) // 2
  return jnp.pad(x, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)), mode="edge")


def crop_to(x: Array, size: int) -> Array:
  """The inverse of :func:`pad_to`: the central ``size x size`` of ``x [B, S, S, C]``."""
  s = x.shape[1]
  start = (s - size) // 2
  return x[:, start : start + size, start : start + size, :]


def posterior_sample(mean: Array, logvar: Array, key: Array) -> Array:
  """``z = mean + exp(logvar / 2) * eps``: the reparameterised draw from q(z|x)."""
  std = jnp.exp(0.5 * logvar)
  return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def posterior_kl(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over the latent ``[B, h, w, c]``:
  ``1/2 sum(mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014, app. B). Returns
  ``[B]`` in nats."""
  terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
  return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


class _Block(nnx.Module):
  """A ResNet block without a time input: ``x + conv(silu(norm(conv(silu(norm(x))))))``."""

  def __init__(self, cin: int, cout: int, *, num_groups: int, dropout: float, dtype, rngs):
    self.norm1 = layers.group_norm(cin, num_groups, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = layers.group_norm(cout, num_groups, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.conv2 = layers.conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.skip = layers.conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x: Array, key: Array | None) -> Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.dropout(nnx.silu(self.norm2(h)), deterministic=key is None, rngs=key)
    h = self.conv2(h)
    return (x if self.skip is None else self.skip(x)) + h


class _Level(nnx.Module):
  """The blocks (and attention layers) of one resolution, then an optional resampling conv."""

  def __init__(self, widths, *, attention, resample, num_groups, dropout, num_heads, dtype, rngs):
    kw = dict(num_groups=num_groups, dropout=dropout, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List(
      [_Block(a, b, **kw) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    )
    attn = dict(num_heads=num_heads, num_groups=num_groups, dtype=dtype, rngs=rngs)
    self.attns = nnx.List(
      [layers.SpatialAttention(w, **attn) for w in widths[1:]] if attention else []
    )
    c = widths[-1]
    stride = 2 if resample == "down" else 1
    self.resample = resample
    self.conv = layers.conv(c, c, 3, stride=stride, dtype=dtype, rngs=rngs) if resample else None

  def __call__(self, x: Array, key: Array | None) -> Array:
    for i, block in enumerate(self.blocks):
      x = block(x, layers.fold_key(key, i))
      if len(self.attns):
        x = self.attns[i](x)
    if self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x if self.conv is None else self.conv(x)


class _Middle(nnx.Module):
  """Block, self-attention, block at the lowest resolution (LDM's ``mid``)."""

  def __init__(self, c: int, *, num_groups, dropout, num_heads, dtype, rngs):
    kw = dict(num_groups=num_groups, dropout=dropout, dtype=dtype, rngs=rngs)
    self.block1, self.block2 = _Block(c, c, **kw), _Block(c, c, **kw)
    self.attn = layers.SpatialAttention(
      c, num_heads=num_heads, num_groups=num_groups, dtype=dtype, rngs=rngs
    )

  def __call__(self, x: Array, key: Array | None) -> Array:
    x = self.block1(x, layers.fold_key(key, 0))
    return self.block2(self.attn(x), layers.fold_key(key, 1))


class Discriminator(nnx.Module):
  """A PatchGAN: stride-2 4x4 convs with LeakyReLU(0.2) and growing width, then one logit per
  overlapping patch ``[B, h, w, 1]``."""

  def __init__(self, in_channels: int, ch: int, num_layers: int, *, num_groups: int, rngs):
    init = nnx.initializers.normal(0.02)  # pix2pix's N(0, 0.02) weights
    widths = [in_channels] + [ch * min(2**i, 8) for i in range(num_layers + 1)]
    self.convs = nnx.List(
      [
        nnx.Conv(
          a,
          b,
          (4, 4),
          strides=(2, 2) if i < num_layers else (1, 1),
          padding="SAME",
          kernel_init=init,
          rngs=rngs,
        )  # fmt: skip
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
      ]
    )
    self.norms = nnx.List(
      [nnx.GroupNorm(w, num_groups=math.gcd(num_groups, w), rngs=rngs) for w in widths[2:]]
    )
    self.out = nnx.Conv(widths[-1], 1, (4, 4), padding="SAME", kernel_init=init, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    for i, conv in enumerate(self.convs):
      x = conv(x)
      if i > 0:
        x = self.norms[i - 1](x)
      x = nnx.leaky_relu(x, 0.2)
    return self.out(x)


class Autoencoder(nnx.Module):
  """LDM's AutoencoderKL: ``encode`` to a Gaussian posterior, ``decode`` back to pixels.

  Args:
    in_channels: image channels C.
    latent_channels: latent channels c.
    image_size: the image side H = W.
    padded_size: the side images are padded to before encoding (a multiple of f, >= H).
    ch: base width; level i has ``ch * ch_mult[i]`` channels.
    ch_mult: width multipliers per level; f = 2 ** (len(ch_mult) - 1).
    num_res_blocks: ResNet blocks per level (the decoder has one more, as in LDM).
    attn_resolutions: padded-image sides at which the levels also self-attend (the middle
      always does).
    num_groups, num_heads, dropout: as in the U-Net.
    disc_ch, disc_layers: the patch discriminator (``disc_layers = 0``: none).
  """

  # Long: the constructor lays out the encoder and decoder levels, one line each.
  def __init__(
    self,
    *,
    in_channels: int,
    latent_channels: int,
    image_size: int,
    padded_size: int,
    ch: int,
    ch_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...] = (),
    num_groups: int = 32,
    num_heads: int = 1,
    dropout: float = 0.0,
    disc_ch: int = 0,
    disc_layers: int = 0,
    dtype: DType = jnp.float32,
    rngs: nnx.Rngs,
  ):
    factor = 2 ** (len(ch_mult) - 1)
    if padded_size < image_size or padded_size % factor:
      raise ValueError(
        f"autoencoder.padded_size={padded_size} must be >= data.image_size={image_size} and a"
        f" multiple of the downsampling factor {factor} (2 ** (len(model.ch_mult) - 1))"
      )
    self.image_size, self.padded_size = image_size, padded_size
    self.latent_channels, self.factor = latent_channels, factor
    kw = dict(num_groups=num_groups, dropout=dropout, num_heads=num_heads, dtype=dtype, rngs=rngs)
    widths = [ch * m for m in ch_mult]
    sides = [padded_size // 2**i for i in range(len(ch_mult))]
    last = len(ch_mult) - 1
    # Encoder: conv_in, levels (down after all but the last), middle, norm-silu-conv to 2c.
    self.enc_in = layers.conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
    prev, down = ch, []
    for i, w in enumerate(widths):
      down.append(
        _Level(
          [prev] + [w] * num_res_blocks,
          attention=sides[i] in attn_resolutions,
          resample="down" if i < last else None,
          **kw,
        )  # fmt: skip
      )
      prev = w
    self.down = nnx.List(down)
    self.enc_mid = _Middle(prev, **kw)
    self.enc_norm = layers.group_norm(prev, num_groups, dtype=dtype, rngs=rngs)
    self.enc_out = layers.conv(prev, 2 * latent_channels, 3, dtype=dtype, rngs=rngs)
    self.quant = layers.conv(2 * latent_channels, 2 * latent_channels, 1, dtype=dtype, rngs=rngs)
    # Decoder: 1x1, conv_in, middle, levels from the lowest (up after all but the top).
    self.post_quant = layers.conv(latent_channels, latent_channels, 1, dtype=dtype, rngs=rngs)
    self.dec_in = layers.conv(latent_channels, prev, 3, dtype=dtype, rngs=rngs)
    self.dec_mid = _Middle(prev, **kw)
    up = []
    for i in reversed(range(len(widths))):
      up.append(
        _Level(
          [prev] + [widths[i]] * (num_res_blocks + 1),
          attention=sides[i] in attn_resolutions,
          resample="up" if i > 0 else None,
          **kw,
        )  # fmt: skip
      )
      prev = widths[i]
    self.up = nnx.List(up)
    self.dec_norm = layers.group_norm(prev, num_groups, dtype=dtype, rngs=rngs)
    self.dec_out = layers.conv(prev, in_channels, 3, dtype=dtype, rngs=rngs)
    self.discriminator = (
      Discriminator(in_channels, disc_ch, disc_layers, num_groups=num_groups, rngs=rngs)
      if disc_layers > 0
      else None
    )

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    side = self.padded_size // self.factor
    return (side, side, self.latent_channels)

  def encode(self, x: Array, key: Array | None = None) -> tuple[Array, Array]:
    """Images ``[B, H, W, C]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[B, h, w, c]``.
    ``key`` turns on dropout."""
    h = self.enc_in(pad_to(x, self.padded_size))
    for i, level in enumerate(self.down):
      h = level(h, layers.fold_key(key, i))
    h = self.enc_mid(h, layers.fold_key(key, 100))
    moments = self.quant(self.enc_out(nnx.silu(self.enc_norm(h)))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: Array, key: Array | None = None) -> Array:
    """Latents ``[B, h, w, c]`` -> images ``[B, H, W, C]`` (unbounded; ~[-1, 1])."""
    h = self.dec_in(self.post_quant(z))
    h = self.dec_mid(h, layers.fold_key(key, 200))
    for i, level in enumerate(self.up):
      h = level(h, layers.fold_key(key, 300 + i))
    out = self.dec_out(nnx.silu(self.dec_norm(h)))
    return crop_to(out, self.image_size).astype(jnp.float32)

  def __call__(
    self, x: Array, *, key: Array | None = None, sample: bool = True
  ) -> tuple[Array, Array, Array]:
    """``(reconstruction, mean, logvar)``: decode a posterior draw (``key`` given and
    ``sample``) or the posterior mean."""
    k_enc, k_z, k_dec = (None,) * 3 if key is None else jax.random.split(key, 3)
    mean, logvar = self.encode(x, k_enc)
    z = posterior_sample(mean, logvar, k_z) if (key is not None and sample) else mean
    return self.decode(z, k_dec), mean, logvar


@dataclasses.dataclass(frozen=True)
class Coder:
  """``encode(params, images, key=None)`` and ``decode(params, latents)`` of the autoencoder of
  ``graphdef``, unscaled; hashable by its graphdef, so jitted versions share compiled code and
  the parameters stay arguments."""

  graphdef: nnx.GraphDef

  def moments(self, params: Any, images: Array) -> tuple[Array, Array]:
    """The posterior's ``(mean, logvar)``, each ``[B, h, w, c]``."""
    return nnx.merge(self.graphdef, params).encode(images)

  def encode(self, params: Any, images: Array, key: Array | None = None) -> Array:
    """Posterior mean ``[B, h, w, c]``, or with ``key`` a posterior draw."""
    mean, logvar = self.moments(params, images)
    return mean if key is None else posterior_sample(mean, logvar, key)

  def decode(self, params: Any, latents: Array) -> Array:
    return nnx.merge(self.graphdef, params).decode(latents)
