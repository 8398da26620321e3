"""Sample quality: the Fréchet distance and Inception-style score of a sampler's images.

Samples N images, quantises them to 8 bits as a saved image would be, and reports the Fréchet
distance of their features to a reference split's statistics (``reference.reference_stats``)
and the Inception-style score of their logits. Scores from different feature networks, sample
counts or reference splits are not comparable; the distance is biased upwards at small N.

Example::

  net = features.feature_net("classifier", None, config.data)
  ref, _ = reference_stats(net, config.data, split="test", cache_dir=features.cache_dir())
  def sample_fn(key, n):  # float images in [-1, 1], as the run's config.sampling says
    return sample_from_config(run.config, run.diffusion, run.model_fn("ema"), key, n)

  record = sample_quality(sample_fn, net, ref, num_samples=10_000, batch_size=128)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxdiff.evaluation import stats
from jaxdiff.evaluation.extract import compute_features
from jaxdiff.evaluation.featurenet import FeatureNet
from jaxdiff.io.images import to_uint8

PREVIEW = 64  # samples kept in the record for a grid

SampleFn = Callable[[jax.Array, int], np.ndarray]
PHASES = ("sampling", "sample features", "frechet distance")


@contextlib.contextmanager
def _phases(progress: bool) -> Iterator[Callable[[str], None]]:
  """A bar over :data:`PHASES` (process 0): ``enter(name)`` marks the previous phase done and
  names the current one; the phases' own bars (sampling steps, feature batches) nest below."""
  quiet = not progress or jax.process_index() != 0
  # No rate or ETA: the phases take very different times.
  form = "{desc} ({n_fmt}/{total_fmt} phases done) [{elapsed}]"
  bar = tqdm(total=len(PHASES), desc="sample quality", bar_format=form, disable=quiet)
  started = []

  def enter(name: str) -> None:
    if started:
      bar.update(1)
    started.append(name)
    bar.set_description_str(f"sample quality: {name}")

  try:
    yield enter
    bar.update(len(PHASES) - bar.n)
  finally:
    bar.close()


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
      every process), e.g. :func:`jaxdiff.sampling.sample_from_config` with a run's model
      function (``jaxdiff evaluate`` builds one so); it does its own chunking.
    feature_net: the feature network.
    reference_stats: the reference split's statistics in ``feature_net``'s features.
    num_samples: N >= 2 (compare runs only at equal N).
    seed: ``sample_fn`` gets ``jax.random.key(seed)``.
    batch_size: global batch size of the feature extraction.
    mesh: defaults to ``parallel.make_mesh()``.
    progress: show the phases (:data:`PHASES`) on a bar, and the sample features' bar
      (process 0). ``sample_fn`` draws its own bar, if any (``sample_from_config(...,
      progress=True)`` shows one over all its sampler steps).

  Returns:
    The record ``{"metric", "num_samples", "seed", "features" (the network's name),
    "fd", "is_mean", "is_std", "sample_seconds", "seconds"}`` (``metric``: "fid" with Inception
    features, the published metric; "fd" with any other network) plus ``preview``: the first 64
    samples as uint8 ``[n, H, W, C]`` (for a grid).

  Raises:
    ValueError: ``num_samples < 2``, or samples of the wrong shape or feature dimension.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: a covariance needs at least 2")
  start_time = time.perf_counter()
  with _phases(progress) as enter:
    enter("sampling")
    samples = np.asarray(sample_fn(jax.random.key(seed), num_samples))
    if samples.ndim != 4 or len(samples) != num_samples:
      raise ValueError(
        f"sample_fn returned shape {samples.shape}; expected [{num_samples}, H, W, C]"
      )
    sample_seconds = time.perf_counter() - start_time
    pixels = to_uint8(samples)  # what a saved sample would hold
    enter("sample features")
    feats, logits = compute_features(
      feature_net, pixels, mesh, batch_size=batch_size, progress=progress, desc="sample features"
    )
    enter("frechet distance")
    fd = stats.frechet_distance(stats.feature_stats(feats), reference_stats)
    is_mean, is_std = stats.inception_score(logits, num_splits=min(10, num_samples))
  record = {
    "metric": "fid" if feature_net.name.startswith("inception") else "fd",
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
