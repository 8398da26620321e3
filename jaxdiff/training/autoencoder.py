"""Training LDM's autoencoder with the diffusion model's machinery: its objective and metrics.

``jaxdiff train`` with ``model.name = "autoencoder"`` runs the same sharded step, EMA, orbax
checkpoints, exact resume, NaN stop and metric writers as a diffusion run; only the loss differs
(this module) and what the loop draws at ``training.sample_every`` (reconstructions of fixed
training images beside the originals).

The objective per image, every term divided by the number of pixels P (so ``kl_weight`` means
what LDM's does, whose terms are sums over pixels; the optimum is unchanged):

  rec   = mean |x - x̂| + l2_weight · mean (x - x̂)²          (x̂ decodes a posterior draw)
  loss  = rec + perceptual_weight · ‖φ(x)/|φ(x)| − φ(x̂)/|φ(x̂)|‖²
          + kl_weight · KL(q(z|x) ‖ N(0, I)) / P
          + [step >= disc_start] · (disc_weight · g + d)

with φ the dataset classifier's features (jaxdiff's own feature network: a one-layer stand-in
for LPIPS), ``g = −mean D(x̂)`` the generator's hinge term and
``d = ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))`` the discriminator's (Lim & Ye 2017).
The discriminator's parameters get gradients from ``d`` only and the autoencoder's from the rest:
``g`` sees the discriminator through ``stop_gradient``, ``d`` sees ``x̂`` that way, so one
``value_and_grad`` of the sum gives both. LDM's adaptive weight of ``g`` (a ratio of gradient
norms at the decoder's last layer) is replaced by the fixed ``disc_weight``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxdiff import evaluation
from jaxdiff.io import files
from jaxdiff.models.autoencoder import posterior_kl

# The per-example terms the step logs (as batch means).
TERMS = ("rec", "l1", "kl", "perceptual", "g_loss", "d_loss", "disc_on")


def perceptual_net(config: ml_collections.ConfigDict) -> evaluation.FeatureNet | None:
  """The feature network of the perceptual term (None when ``perceptual_weight`` is 0)."""
  if config.autoencoder.perceptual_weight <= 0:
    return None
  ecfg = config.eval
  return evaluation.feature_net(
    "classifier", ecfg.features_path or None, config.data, ecfg.cache_dir
  )


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """What an autoencoder run needs beyond its model: a classifier for the perceptual term."""
  if config.model.name != "autoencoder":
    return []
  lines = []
  if config.eval.every > 0:
    lines.append(
      f"eval.every={config.eval.every}: an autoencoder run logs its losses; its evaluation is"
      " `jaxdiff evaluate --metric recon` (set eval.every=0)"
    )
  if config.autoencoder.perceptual_weight <= 0:
    return lines
  path = config.eval.features_path
  if path:
    return lines  # eval.features_path is checked by the eval section's own problems
  default = evaluation.default_classifier_path(config.data, config.eval.cache_dir or None)
  if files.as_path(default).is_file():
    return lines
  return lines + [
    f"autoencoder.perceptual_weight={config.autoencoder.perceptual_weight!r}: needs the"
    f" dataset's classifier at {default}; train it first with `jaxdiff train-classifier"
    " --config YOUR_CONFIG.py`, or set eval.features_path, or set perceptual_weight=0"
  ]


def _hinge_d(real: jax.Array, fake: jax.Array) -> jax.Array:
  """Per-example hinge loss of the discriminator, from patch logits ``[B, h, w, 1]``."""
  axes = tuple(range(1, real.ndim))
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real), axes) + jnp.mean(jax.nn.relu(1.0 + fake), axes))


def _unit(f: jax.Array) -> jax.Array:
  return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-10)


def make_loss_fn(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  perceptual: evaluation.FeatureNet | None = None,
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """``loss_fn(params, images, disc_on, key) -> (mean loss, per-example terms)``.

  ``images`` ``[B, H, W, C]`` in [-1, 1]; ``disc_on`` ``[B]`` float, 1 where the adversarial
  terms count (the step has reached ``disc_start``).
  """
  ae = config.autoencoder
  use_disc = ae.disc_weight > 0

  def loss_fn(params, images, disc_on, key):
    model = nnx.merge(graphdef, params)
    recon, mean, logvar = model(images, key=key)
    axes = tuple(range(1, images.ndim))
    pixels = np.prod(images.shape[1:])
    l1 = jnp.mean(jnp.abs(images - recon), axes)
    rec = l1 + ae.l2_weight * jnp.mean(jnp.square(images - recon), axes)
    kl = posterior_kl(mean, logvar)
    loss = rec + ae.kl_weight * kl / pixels
    terms = {"rec": rec, "l1": l1, "kl": kl, "disc_on": disc_on}
    if perceptual is not None:
      both = perceptual.apply(jnp.concatenate([images, recon]))["features"]
      real, fake = jnp.split(_unit(both), 2)
      terms["perceptual"] = jnp.sum(jnp.square(real - fake), axis=-1)
      loss = loss + ae.perceptual_weight * terms["perceptual"]
    if use_disc:
      frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params)).discriminator
      g = -jnp.mean(frozen(recon), axes)
      d = _hinge_d(model.discriminator(images), model.discriminator(jax.lax.stop_gradient(recon)))
      terms["g_loss"], terms["d_loss"] = g, d
      loss = loss + disc_on * (ae.disc_weight * g + d)
    terms["loss"] = loss
    return jnp.mean(loss), terms

  return loss_fn


def disc_on(config: ml_collections.ConfigDict, step: jax.Array, batch: int) -> jax.Array:
  """``[batch]`` ones once ``step`` (completed steps) has reached ``autoencoder.disc_start``."""
  on = (step >= config.autoencoder.disc_start).astype(jnp.float32)
  return jnp.broadcast_to(on, (batch,))
