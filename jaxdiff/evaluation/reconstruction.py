"""What an autoencoder keeps of images: PSNR, and the Fréchet distance of its reconstructions.

The FD of reconstructions of a split against that split's own statistics is the *data floor* of
any latent diffusion model on the autoencoder: samples decoded from its latents cannot score
better than its reconstructions of real images (at the same N and feature network).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff.evaluation import stats
from jaxdiff.evaluation.featurenet import FeatureNet
from jaxdiff.evaluation.quality import sample_quality
from jaxdiff.io.images import from_uint8, to_uint8


def psnr(images: np.ndarray, recon: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of 8-bit images ``[N, H, W, C]`` (peak 255); identical images give
  +inf."""
  err = np.mean(np.square(images.astype(np.float64) - recon.astype(np.float64)), axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(255.0**2 / err)


def reconstruction_quality(
  reconstruct: Callable[[np.ndarray], Any],
  images: np.ndarray,
  feature_net: FeatureNet,
  reference_stats: stats.FeatureStats,
  *,
  batch_size: int,
  mesh: Mesh | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """PSNR and FD of ``reconstruct``'s output for the uint8 ``images [N, H, W, C]``.

  Args:
    reconstruct: float images ``[b, H, W, C]`` in [-1, 1] -> reconstructions (e.g. the
      posterior mean decoded); called on chunks of ``batch_size`` (the last one padded).
    images: the split's images, uint8.
    feature_net, reference_stats: as for ``sample_quality``.
    batch_size: reconstruction and feature-extraction batch size.

  Returns:
    ``{"metric": "recon", "num_examples", "psnr", "psnr_stderr", "fd", "is_mean", "is_std",
    "features", "seconds", "preview"}``: PSNR of the 8-bit reconstructions (as saved images hold
    them), mean over images ± one standard error; ``preview`` interleaves up to four rows of 8
    originals with rows of their reconstructions.
  """
  n = len(images)
  chunks = []
  for start in range(0, n, batch_size):
    chunk = images[start : start + batch_size]
    pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)
    out = np.asarray(jax.device_get(reconstruct(from_uint8(np.concatenate([chunk, pad])))))
    chunks.append(to_uint8(np.clip(out[: len(chunk)], -1.0, 1.0)))
  recon = np.concatenate(chunks)
  scores = psnr(images, recon)
  record = sample_quality(
    lambda key, k: from_uint8(recon[:k]), feature_net, reference_stats, num_samples=n,
    batch_size=batch_size, mesh=mesh, progress=progress,
  )  # fmt: skip
  shown = min(32, n - n % 8) or n  # whole rows of 8, up to four
  rows = [part for i in range(0, shown, 8) for part in (images[i : i + 8], recon[i : i + 8])]
  return {
    "metric": "recon",
    "num_examples": n,
    "psnr": float(np.mean(scores)),
    "psnr_stderr": float(np.std(scores, ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
    "fd": record["fd"],
    "is_mean": record["is_mean"],
    "is_std": record["is_std"],
    "features": record["features"],
    "seconds": record["seconds"],
    "preview": np.concatenate(rows),
  }
