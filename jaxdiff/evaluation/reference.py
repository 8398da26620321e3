"""Feature statistics of a whole dataset split, computed once and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from jaxdiff import data, parallel
from jaxdiff.evaluation import stats as stats_lib
from jaxdiff.evaluation.extract import compute_features
from jaxdiff.evaluation.featurenet import FeatureNet
from jaxdiff.io import files

log = logging.getLogger(__name__)


def reference_cache_path(
  feature_net: FeatureNet,
  data_config: ml_collections.ConfigDict,
  *,
  split: str,
  cache_dir: str | os.PathLike,
) -> epath.Path:
  """``cache_dir/{dataset}-{split}-{image_size}-{feature_net.name}.npz`` for ``reference_stats``.

  The split is made file-name safe with ``io.files.slug`` (``"test[:1000]"`` ->
  ``"test_1000"``). An image folder has no name of its own, so ``dataset`` is ``image_folder_``
  plus a digest of the folder's absolute path (or URI); change the folder's contents and the
  cached file must be deleted by hand. ``cache_dir`` may be local or ``gs://``.
  """
  d = data_config
  name = d.name
  if name == "image_folder":
    folder = os.fspath(files.as_path(d.image_folder))
    name = f"image_folder_{hashlib.sha256(folder.encode()).hexdigest()[:8]}"
  file_name = f"{name}-{files.slug(split)}-{d.image_size}-{feature_net.name}.npz"
  return files.as_path(cache_dir) / file_name


def reference_stats(
  feature_net: FeatureNet,
  data_config: ml_collections.ConfigDict,
  *,
  split: str,
  cache_dir: str | os.PathLike,
  batch_size: int = 256,
  mesh: Mesh | None = None,
  progress: bool = False,
) -> tuple[stats_lib.FeatureStats, np.ndarray | None]:
  """Feature statistics of a whole dataset split, cached on disk.

  Every example of the split is used once, in order, without flips (whatever
  ``data_config.random_flip`` says), read by ``jaxdiff.data.split_reader``. The statistics are
  saved to ``reference_cache_path(...)`` (by process 0) and later calls load them from there.

  Args:
    feature_net: the feature network.
    data_config: the ``config.data`` section.
    split: tfds split, e.g. ``"train"`` or ``"test[:1000]"``; ignored for image folders.
    cache_dir: folder of cached statistics (created if needed).
    batch_size: global batch size for feature extraction.
    mesh: defaults to ``parallel.make_mesh()``.
    progress: while computing, a bar labelled ``reference features {dataset}:{split}``
      (process 0; nothing when the statistics come from the cache).

  Returns:
    ``(stats, logits)``: logits ``[N, K]`` when the statistics were just computed; None when
    they came from the cache (only the statistics are cached).

  Raises:
    jaxdiff.data.DatasetNotPreparedError: the tfds dataset is not prepared.
    ValueError: the split has fewer than 2 examples.
  """
  path = reference_cache_path(feature_net, data_config, split=split, cache_dir=cache_dir)
  if path.is_file():
    stats = stats_lib.load_stats(path)
    log.info("reference statistics: loaded %s (N=%d, D=%d)", path, stats.num, stats.dim)
    return stats, None
  mesh = parallel.make_mesh() if mesh is None else mesh
  reader = data.split_reader(data_config, split, batch_size=batch_size, multiple=mesh.size)
  desc = f"reference features {data_config.name}:{split}"
  features, logits = compute_features(feature_net, reader, mesh, progress=progress, desc=desc)
  stats = stats_lib.feature_stats(features)
  if jax.process_index() == 0:
    stats_lib.save_stats(path, stats)
  log.info("reference statistics: computed and saved %s (N=%d, D=%d)", path, stats.num, stats.dim)
  return stats, logits
