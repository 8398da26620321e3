"""Sample quality: the Fréchet distance and Inception-style score of a sampler's images.

Samples N images, quantises them to 8 bits as a saved image would be, and reports the Fréchet
distance of their features to a reference split's statistics (``reference.reference_stats``)
and the Inception-style score of their logits. Scores from different feature networks, sample
counts or reference splits are not comparable; the distance is biased upwards at small N.

Example::

  net = features.feature_net("classifier", None, config.data)
  ref, _ = reference_stats(net, config.data, split="test", cache_dir=features.cache_dir())
  record = sample_quality(run.sample_fn(), net, ref, num_samples=10_000, batch_size=128)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxdiff.evaluation import stats
from jaxdiff.evaluation.extract import compute_features
from jaxdiff.evaluation.featurenet import FeatureNet
from jaxdiff.io.images import to_uint8

PREVIEW = 64  # samples kept in the record for a grid

SampleFn = Callable[[jax.Array, int], np.ndarray]


def sample_quality(
  sample_fn: SampleFn,
  feature_net: FeatureNet,
  reference_stats: stats.FeatureStats,
  *,
  num_samples: int,
  seed: int = 0,
  batch_size: int,
  mesh: Mesh | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """Fréchet distance and Inception-style score of ``num_samples`` draws of ``sample_fn``.

  Args:
    sample_fn: ``sample_fn(key, n) -> float images [n, H, W, C] in [-1, 1]`` (NumPy, the same on
      every process), e.g. ``load_run(workdir).sample_fn(...)``; it does its own chunking.
    feature_net: the feature network.
    reference_stats: the reference split's statistics in ``feature_net``'s features.
    num_samples: N >= 2 (compare runs only at equal N).
    seed: ``sample_fn`` gets ``jax.random.key(seed)``.
    batch_size: global batch size of the feature extraction.
    mesh: defaults to ``parallel.make_mesh()``.
    progress: show a progress bar for the feature extraction.

  Returns:
    The record ``{"metric": "fid", "num_samples", "seed", "features" (the network's name),
    "fd", "is_mean", "is_std", "sample_seconds", "seconds"}`` plus ``preview``: the first 64
    samples as uint8 ``[n, H, W, C]`` (for a grid).

  Raises:
    ValueError: ``num_samples < 2``, or samples of the wrong shape or feature dimension.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: a covariance needs at least 2")
  start_time = time.perf_counter()
  samples = np.asarray(sample_fn(jax.random.key(seed), num_samples))
  if samples.ndim != 4 or len(samples) != num_samples:
    raise ValueError(f"sample_fn returned shape {samples.shape}; expected [{num_samples}, H, W, C]")
  sample_seconds = time.perf_counter() - start_time
  pixels = to_uint8(samples)  # what a saved sample would hold
  feats, logits = compute_features(
    feature_net, pixels, mesh, batch_size=batch_size, progress=progress
  )
  fd = stats.frechet_distance(stats.feature_stats(feats), reference_stats)
  is_mean, is_std = stats.inception_score(logits, num_splits=min(10, num_samples))
  record = {
    "metric": "fid",
    "num_samples": num_samples,
    "seed": seed,
    "features": feature_net.name,
    "fd": float(fd),
    "is_mean": float(is_mean),
    "is_std": float(is_std),
    "sample_seconds": round(sample_seconds, 1),
    "seconds": round(time.perf_counter() - start_time, 1),
  }
  return {**record, "preview": pixels[:PREVIEW]}
