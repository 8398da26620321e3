"""Classifier-free guidance: one model call on the doubled batch, and its argument checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff.sampling.base import ModelFn


def guided_model_output(
  model_fn: ModelFn,
  x: jax.Array,
  t: jax.Array,
  labels: Any = None,
  *,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  uncond: Any = None,
) -> jax.Array:
  """The model output, with classifier-free guidance (Ho & Salimans 2022, eq. 6).

  With ``g = guidance_scale`` the guided output is ``uncond + g (cond - uncond)``
  (the paper's ``(1 + w) eps(z, c) - w eps(z)`` with ``g = 1 + w``). Both halves
  come from ONE model call on the doubled batch ``[x, x]`` with conditioning
  ``[y, uncond]``. The guidance is affine in the output, so it applies to eps, x0
  and v predictions alike; for learned variances only the first C channels
  (the mean part) are guided and the conditional variance channels are kept.
  ``g = 1`` calls the conditional model on the batch as it is.

  Args:
    model_fn: ``model_fn(x, t)``, or ``model_fn(x, t, y)`` when labels are given.
    x: ``[B, H, W, C]`` noisy images.
    t: ``[B]`` original-schedule steps.
    labels: the conditioning ``y``: ``[B]`` int class labels, a pytree of ``[B, ...]`` arrays
      (a text-conditioned model's ``{"tokens", "mask", "pooled"[, "label"]}``), or None for an
      unconditional model.
    guidance_scale: g; 1 is the conditional model.
    null_label: the label the model was trained with for "no class" (label dropout).
    uncond: the unconditional branch's conditioning, the structure and shapes of ``labels``
      (the empty prompt's encoding, or a negative prompt's, which takes its place); default:
      ``labels`` with every entry ``null_label``.

  Returns:
    ``[B, H, W, C']``, the model output with the mean part guided.
  """
  if guidance_scale == 1.0:
    return model_fn(x, t) if labels is None else model_fn(x, t, labels)
  check_guidance(guidance_scale, labels, null_label, uncond)
  if uncond is None:
    uncond = jnp.full_like(labels, null_label)
  y = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), labels, uncond)
  out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y)  # [2B, H, W, C']
  cond, unconditional = jnp.split(out, 2)
  c = x.shape[-1]
  guided = unconditional[..., :c] + guidance_scale * (cond[..., :c] - unconditional[..., :c])
  return jnp.concatenate([guided, cond[..., c:]], axis=-1)


def check_guidance(
  guidance_scale: float, labels: Any, null_label: int | None, uncond: Any = None
) -> None:
  """Raises unless guidance is off (g = 1) or has labels and a null label (or an ``uncond``)."""
  if guidance_scale != 1.0 and (labels is None or (null_label is None and uncond is None)):
    missing = " and ".join(
      n for n, v in (("labels", labels), ("null_label", null_label)) if v is None
    )
    raise ValueError(
      f"guidance_scale={guidance_scale} needs class labels and the model's null label"
      f" (classifier-free guidance); {missing} not given. Pass labels=[B] ints and"
      " null_label=<the 'no class' id, usually num_classes> (or, for a text-conditioned model,"
      " the prompt's and the empty or negative prompt's encodings as labels and uncond),"
      " or guidance_scale=1.0"
    )
