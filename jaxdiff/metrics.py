"""Sample-quality metrics from feature-network outputs: Fréchet distance and Inception score.

Both metrics are computed from the outputs of a ``jaxdiff.features.FeatureNet``:

* **Fréchet distance** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", https://arxiv.org/abs/1706.08500) between Gaussians
  fitted to the ``features`` of two image sets; with the standard Inception weights this is FID.
* **Inception-style score** (Salimans et al. 2016, "Improved Techniques for Training GANs",
  https://arxiv.org/abs/1606.03498), ``exp(E_x KL(p(y|x) || p(y)))`` from the ``logits``.

Statistics (``FeatureStats``: mean, unbiased covariance, count) are accumulated in float64 by
``FeatureAccumulator`` over any batching, saved and loaded as ``.npz`` (``save_stats``,
``load_stats``), and for a dataset split computed once and cached (``reference_stats``).

The Fréchet distance is computed in JAX in float64 under a local ``jax.enable_x64(True)``
context (the global flag is left alone), on the CPU: float32 loses FID's trace term to
cancellation, and accelerators often lack fast or any float64 linear algebra.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxdiff import files, parallel
from jaxdiff.features import FeatureNet

_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------ statistics


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: == would be ambiguous
class FeatureStats:
  """Gaussian statistics of a feature set.

  Attributes:
    mean: float64 ``[D]``.
    cov: float64 ``[D, D]``, the unbiased (``ddof=1``) covariance.
    num: number of feature vectors N they were computed from.
  """

  mean: np.ndarray
  cov: np.ndarray
  num: int

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float64)
    cov = np.asarray(self.cov, np.float64)
    if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
      raise ValueError(
        f"FeatureStats needs mean [D] and cov [D, D]; got mean {mean.shape}, cov {cov.shape}"
      )
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "cov", cov)
    object.__setattr__(self, "num", int(self.num))

  @property
  def dim(self) -> int:
    return self.mean.shape[0]


class FeatureAccumulator:
  """Streams feature batches into count, sum and sum of outer products, in float64.

  Every batch is shifted by the first batch's mean before accumulating. Features whose mean is
  large compared with their spread (``E[x x^T] - mu mu^T`` with ``|mu| >> sigma``) would
  otherwise lose the covariance to cancellation; after the shift the accumulated moments are of
  the order of the spread. Any batch sizes, in any order, give the same statistics up to
  float64 rounding.
  """

  def __init__(self):
    self.num = 0
    self._shift: np.ndarray | None = None
    self._sum: np.ndarray | None = None
    self._outer: np.ndarray | None = None

  def update(self, features: Any) -> None:
    """Adds a batch ``[B, D]`` of feature vectors (B may be 0).

    Raises:
      ValueError: not 2-D, a D different from earlier batches, or non-finite values.
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [B, D], got shape {x.shape}")
    if self._shift is not None and x.shape[1] != self._shift.shape[0]:
      raise ValueError(
        f"feature batch has shape {x.shape} but earlier batches had D={self._shift.shape[0]}"
      )
    if x.shape[0] == 0:
      return
    if not np.isfinite(x).all():
      bad = int((~np.isfinite(x)).any(axis=1).sum())
      raise ValueError(f"{bad} of {x.shape[0]} feature vectors contain NaN or inf")
    if self._shift is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    d = x - self._shift
    self._sum += d.sum(axis=0)
    self._outer += d.T @ d
    self.num += x.shape[0]

  def result(self) -> FeatureStats:
    """The mean and unbiased covariance of everything added so far.

    Raises:
      ValueError: fewer than 2 feature vectors (the covariance is undefined).
    """
    if self.num < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.num}")
    n = self.num
    mean_d = self._sum / n
    cov = (self._outer - np.outer(self._sum, mean_d)) / (n - 1)
    return FeatureStats(mean=self._shift + mean_d, cov=(cov + cov.T) / 2, num=n)


def feature_stats(features: Any) -> FeatureStats:
  """``FeatureStats`` of features ``[N, D]`` (N >= 2)."""
  acc = FeatureAccumulator()
  acc.update(features)
  return acc.result()


def save_stats(path: str | os.PathLike, stats: FeatureStats) -> None:
  """Writes ``stats`` to ``path`` (``.npz``) atomically: readers see the old file or the new one.

  Raises:
    OSError: the directory cannot be written.
  """
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, mean=stats.mean, cov=stats.cov, num=np.int64(stats.num))


def load_stats(path: str | os.PathLike) -> FeatureStats:
  """Reads statistics written by ``save_stats``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file lacks ``mean``, ``cov`` or ``num``, or their shapes disagree.
  """
  with np.load(path, allow_pickle=False) as f:
    missing = {"mean", "cov", "num"} - set(f.files)
    if missing:
      raise ValueError(f"{path} is not a statistics file: it lacks {', '.join(sorted(missing))}")
    return FeatureStats(mean=f["mean"], cov=f["cov"], num=int(f["num"]))


# ------------------------------------------------------------------------ Fréchet distance


def _symmetrize(a: jax.Array) -> jax.Array:
  return (a + a.T) / 2


def sqrtm_psd(a: jax.Array) -> jax.Array:
  """The symmetric PSD square root of a symmetric PSD matrix ``a [D, D]``.

  ``a`` is symmetrised first, and eigenvalues that rounding made slightly negative are clipped
  to 0, so singular matrices (covariances of N < D samples) are fine. Computes in ``a``'s dtype
  and can be traced; for float64 call it inside ``jax.enable_x64(True)``.
  """
  a = jnp.asarray(a)
  w, v = jnp.linalg.eigh(_symmetrize(a))
  return jnp.matmul(v * jnp.sqrt(jnp.clip(w, 0)), v.T, precision=_HIGHEST)


def trace_sqrt_product(s1: jax.Array, s2: jax.Array) -> jax.Array:
  """``Tr((s1 s2)^{1/2})`` for symmetric PSD ``s1``, ``s2`` ``[D, D]``.

  ``s1 s2`` is similar to ``s1^{1/2} s2 s1^{1/2}``, which is symmetric PSD, so its eigenvalues
  are real and non-negative and the trace is the sum of their square roots. Compared with
  ``scipy.linalg.sqrtm(s1 @ s2)`` (the usual FID code) this never forms the non-symmetric
  product, whose Schur-based square root can return spurious imaginary parts that must be
  discarded, and it stays well defined when the covariances are singular (N < D samples),
  where ``sqrtm`` warns and can be inaccurate. Computes in the inputs' dtype and can be traced.
  """
  s1h = sqrtm_psd(s1)
  m = jnp.matmul(s1h, _symmetrize(jnp.asarray(s2)), precision=_HIGHEST)
  m = jnp.matmul(m, s1h, precision=_HIGHEST)
  w = jnp.linalg.eigvalsh(_symmetrize(m))
  return jnp.sum(jnp.sqrt(jnp.clip(w, 0)))


@jax.jit
def _frechet_d2(mu1: jax.Array, cov1: jax.Array, mu2: jax.Array, cov2: jax.Array) -> jax.Array:
  diff = mu1 - mu2
  return (
    jnp.dot(diff, diff, precision=_HIGHEST)
    + jnp.trace(cov1)
    + jnp.trace(cov2)
    - 2 * trace_sqrt_product(cov1, cov2)
  )


def _check_moments(mu: np.ndarray, cov: np.ndarray, which: str) -> None:
  if mu.ndim != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{which}: need mean [D] and cov [D, D], got {mu.shape} and {cov.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
    raise ValueError(f"{which}: mean or cov contains NaN or inf")


def frechet_distance_from_moments(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
  """Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017).

  ``d^2 = |mu1 - mu2|^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^{1/2})``, computed in float64
  on the CPU (see ``trace_sqrt_product`` for the trace term). Rounding can make ``d^2`` of
  near-identical inputs slightly negative; it is clipped to 0.

  Args:
    mu1, mu2: means ``[D]``.
    cov1, cov2: symmetric PSD covariances ``[D, D]``.

  Returns:
    ``d^2`` as a Python float (what is reported as FID).

  Raises:
    ValueError: malformed or non-finite inputs, or the two sides have different D.
  """
  mu1, cov1, mu2, cov2 = (np.asarray(a, np.float64) for a in (mu1, cov1, mu2, cov2))
  _check_moments(mu1, cov1, "first")
  _check_moments(mu2, cov2, "second")
  if mu1.shape != mu2.shape:
    raise ValueError(
      f"feature dimensions differ: mean {mu1.shape} / cov {cov1.shape} vs mean {mu2.shape} /"
      f" cov {cov2.shape}"
    )
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True):
    args = [jax.device_put(a, cpu) for a in (mu1, cov1, mu2, cov2)]
    d2 = float(_frechet_d2(*args))
  return max(d2, 0.0)


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
  """Fréchet distance (FID with Inception features) between two ``FeatureStats``.

  Raises:
    ValueError: different feature dimensions, or statistics of fewer than 2 samples.
  """
  for which, s in (("first", stats1), ("second", stats2)):
    if s.num < 2:
      raise ValueError(f"{which} statistics come from {s.num} sample(s); need at least 2")
  if stats1.mean.shape != stats2.mean.shape:
    raise ValueError(
      f"feature dimensions differ: mean {stats1.mean.shape} / cov {stats1.cov.shape} vs"
      f" mean {stats2.mean.shape} / cov {stats2.cov.shape}"
    )
  return frechet_distance_from_moments(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


# ------------------------------------------------------------------------ Inception score


@functools.partial(jax.jit, static_argnames="num_splits")
def _split_kl(logits: jax.Array, split_ids: jax.Array, num_splits: int) -> jax.Array:
  """Mean over each split of KL(p(y|x) || p(y)), p(y) the split's marginal; ``[num_splits]``."""
  logp = jax.nn.log_softmax(logits, axis=-1)  # [N, K]
  counts = jax.ops.segment_sum(jnp.ones(logits.shape[0], logp.dtype), split_ids, num_splits)
  # log p(y) = logsumexp over the split of log p(y|x), minus log(count): stable for tiny p.
  peak = jax.ops.segment_max(logp, split_ids, num_splits)  # [S, K]
  summed = jax.ops.segment_sum(jnp.exp(logp - peak[split_ids]), split_ids, num_splits)
  log_py = jnp.log(summed) + peak - jnp.log(counts)[:, None]  # [S, K]
  p = jnp.exp(logp)
  # 0 * log 0 = 0: a class with probability exactly 0 contributes nothing.
  kl = jnp.sum(jnp.where(p > 0, p * (logp - log_py[split_ids]), 0), axis=-1)  # [N]
  return jax.ops.segment_sum(kl, split_ids, num_splits) / counts


def inception_score(logits: Any, num_splits: int = 10) -> tuple[float, float]:
  """Inception score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016).

  As in the reference implementation, the samples are cut into ``num_splits`` consecutive
  parts of (nearly) equal size, the score is computed on each with that part's own marginal
  ``p(y)``, and the mean and (population) standard deviation over parts are returned. Computed
  from logits with ``log_softmax`` in float64, so confident predictions do not underflow.

  Args:
    logits: ``[N, K]`` classifier logits.
    num_splits: number of parts, 1 <= num_splits <= N.

  Returns:
    ``(mean, std)`` of the per-part scores; 1 is the minimum, K the maximum.

  Raises:
    ValueError: logits not 2-D or non-finite, or ``num_splits`` not in ``[1, N]``.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, K], got shape {logits.shape}")
  n = logits.shape[0]
  if not 1 <= num_splits <= n:
    raise ValueError(f"num_splits={num_splits} must be between 1 and the {n} samples")
  if not np.isfinite(logits).all():
    raise ValueError("logits contain NaN or inf")
  # Split k holds samples [k N // S, (k + 1) N // S), the reference implementation's cut.
  split_ids = np.repeat(np.arange(num_splits), np.diff(np.arange(num_splits + 1) * n // num_splits))
  cpu = jax.devices("cpu")[0]
  with jax.enable_x64(True):
    kl = _split_kl(jax.device_put(logits, cpu), jax.device_put(split_ids, cpu), num_splits)
    scores = np.exp(np.asarray(kl, np.float64))
  return float(scores.mean()), float(scores.std())


# ---------------------------------------------------------------------- feature extraction


@jax.jit
def _apply(apply: jax.tree_util.Partial, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  out = apply(images)
  return out["features"], out["logits"]


def _as_images(batch: Any) -> np.ndarray:
  images = batch["image"] if isinstance(batch, Mapping) else batch
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image batches must be NHWC [B, H, W, C], got shape {images.shape}")
  return images


def compute_features(
  feature_net: FeatureNet,
  batches: np.ndarray | Iterable[Any],
  mesh: Mesh | None = None,
  *,
  batch_size: int = 256,
  progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Applies ``feature_net`` to images, batch by batch, under one ``jax.jit``.

  Each batch is split over the mesh's ``data`` axis. A batch whose size is not a multiple of
  this process's devices is padded (by repeating its last image) and the padding dropped; a
  short last batch is padded to the size of the batches before it, so it reuses their compiled
  program instead of compiling another.

  Args:
    feature_net: the network; its ``apply`` (a ``jax.tree_util.Partial``) is passed to the
      jitted function as an argument, so its weights are not baked into the program.
    batches: all the images, float32 ``[N, H, W, C]`` in ``[-1, 1]``, the same on every
      process (cut into global batches of ``batch_size``, each split over the processes); or
      an iterable of this process's own batches: arrays ``[b, H, W, C]`` or dicts with an
      ``"image"`` entry, such as ``jaxdiff.data.make_iterator`` yields. With several processes,
      every process must then pass batches of the same sizes.
    mesh: defaults to ``parallel.make_mesh()``.
    batch_size: batch size when ``batches`` is one array.
    progress: show a tqdm bar (on process 0).

  Returns:
    NumPy ``features [N, D]`` and ``logits [N, K]`` on every process: for an array in its
    order; for per-process batches, step by step, process 0's batch first within each step.

  Raises:
    ValueError: no images, or a batch that is not NHWC.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  num_processes = jax.process_count()
  total = None
  if isinstance(batches, np.ndarray | jax.Array):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    every = _as_images(batches)
    total = math.ceil(every.shape[0] / batch_size)
    items = _array_batches(every, batch_size, jax.process_index(), num_processes)
  else:
    items = ((images, None) for images in map(_as_images, batches))
  if progress:
    from tqdm import tqdm

    items = tqdm(
      items,
      total=total,
      desc=f"features ({feature_net.name})",
      unit="batch",
      disable=jax.process_index() != 0,
    )
  local_devices = len(mesh.local_devices)
  padded_size = 0
  features, logits = [], []
  for images, keep in items:
    n = images.shape[0]
    if n == 0:
      continue
    padded_size = max(padded_size, -(-n // local_devices) * local_devices)
    if padded_size > n:
      images = np.concatenate([images, np.repeat(images[-1:], padded_size - n, axis=0)])
    x = parallel.global_batch(mesh, {"image": images})["image"]
    out = parallel.to_host(_apply(feature_net.apply, x))
    for result, collected in zip(out, (features, logits), strict=True):
      # Global rows are process 0's padded slice, then process 1's, ...: drop each one's padding.
      rows = result.reshape(num_processes, padded_size, -1)[:, :n].reshape(-1, result.shape[-1])
      collected.append(rows[:keep])
  if not features:
    raise ValueError("compute_features got no images")
  return np.concatenate(features), np.concatenate(logits)


def _array_batches(
  every: np.ndarray, batch_size: int, process_index: int, process_count: int
) -> Iterator[tuple[np.ndarray, int]]:
  """Cuts images held whole by every process into (this process's part, rows to keep).

  Each global batch is split into equal contiguous parts, one per process, the last ones padded
  by repeating the batch's last image; gathered in process order, the batch's real rows come
  first, so keeping the first ``len(batch)`` rows drops exactly the padding.
  """
  for lo in range(0, every.shape[0], batch_size):
    chunk = every[lo : lo + batch_size]
    part = -(-chunk.shape[0] // process_count)
    local = chunk[process_index * part : (process_index + 1) * part]
    if local.shape[0] < part:
      local = np.concatenate([local, np.repeat(chunk[-1:], part - local.shape[0], axis=0)])
    yield local, chunk.shape[0]


def reference_cache_path(
  feature_net: FeatureNet,
  config: ml_collections.ConfigDict,
  *,
  split: str,
  cache_dir: str | os.PathLike,
) -> Path:
  """``cache_dir/{dataset}-{split}-{image_size}-{feature_net.name}.npz`` for ``reference_stats``.

  The split is made file-name safe (``"test[:1000]"`` -> ``"test__1000_"``). An image folder
  has no name of its own, so ``dataset`` is ``image_folder_`` plus a digest of the folder's
  absolute path; change the folder's contents and the cached file must be deleted by hand.
  """
  data = config.data
  name = data.name
  if name == "image_folder":
    folder = os.path.abspath(os.path.expanduser(data.image_folder))
    name = f"image_folder_{hashlib.sha256(folder.encode()).hexdigest()[:8]}"
  safe_split = re.sub(r"[^A-Za-z0-9._-]", "_", split)
  return Path(cache_dir) / f"{name}-{safe_split}-{data.image_size}-{feature_net.name}.npz"


class _GlobalIndex:
  """Element j of process p's stream -> (record index, no flip), in contiguous global batches.

  Global batch s is records ``[s B, (s + 1) B)``; process p reads its ``[p b, (p + 1) b)`` part
  of it, so gathering the processes' outputs in process order restores record order. Positions
  past the last record read the last record again (padding, dropped afterwards).
  """

  def __init__(self, num_records: int, local_batch: int, process_index: int, process_count: int):
    self.num_records, self.local_batch = num_records, local_batch
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, j: int) -> tuple[int, bool]:
    s, r = divmod(j, self.local_batch)
    index = (s * self.process_count + self.process_index) * self.local_batch + r
    return min(index, self.num_records - 1), False


def _split_batches(config: ml_collections.ConfigDict, split: str, batch_size: int):
  """This process's unshuffled, unflipped batches covering all of ``split``, and its size."""
  import grain

  from jaxdiff import data

  source = data.make_source(config.data, split=split)
  p, num_p = jax.process_index(), jax.process_count()
  local_batch = -(-batch_size // num_p)
  steps = -(-len(source) // (local_batch * num_p))
  ds = grain.MapDataset.range(steps * local_batch).map(
    _GlobalIndex(len(source), local_batch, p, num_p)
  )
  # data._ReadBatch is the training pipeline's reader: the same decoding and [-1, 1] scaling.
  ds = ds.batch(local_batch).map(data._ReadBatch(source))
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2, prefetch_buffer_size=config.data.get("prefetch", 2))
  )
  return ds, len(source)


def reference_stats(
  feature_net: FeatureNet,
  config: ml_collections.ConfigDict,
  *,
  split: str,
  cache_dir: str | os.PathLike,
  batch_size: int = 256,
  mesh: Mesh | None = None,
  progress: bool = True,
) -> tuple[FeatureStats, np.ndarray | None]:
  """Feature statistics of a whole dataset split, cached on disk.

  Every example of the split is used once, in order, without flips (whatever
  ``config.data.random_flip`` says). The statistics are saved to
  ``reference_cache_path(...)`` (by process 0) and later calls load them from there instead.

  Args:
    feature_net: the feature network.
    config: full config; reads ``config.data``.
    split: tfds split, e.g. ``"train"`` or ``"test[:1000]"``; ignored for image folders.
    cache_dir: folder of cached statistics (created if needed).
    batch_size: global batch size for feature extraction.
    mesh: defaults to ``parallel.make_mesh()``.
    progress: show a progress bar while computing.

  Returns:
    ``(stats, logits)``: logits ``[N, K]`` when the statistics were just computed; None when
    they came from the cache (only the statistics are cached).

  Raises:
    jaxdiff.data.DatasetNotPreparedError: the tfds dataset is not prepared.
    ValueError: the split has fewer than 2 examples.
  """
  path = reference_cache_path(feature_net, config, split=split, cache_dir=cache_dir)
  if path.is_file():
    stats = load_stats(path)
    if jax.process_index() == 0:
      print(f"reference statistics: loaded {path} (N={stats.num}, D={stats.dim})")
    return stats, None
  batches, num = _split_batches(config, split, batch_size)
  features, logits = compute_features(feature_net, batches, mesh, progress=progress)
  features, logits = features[:num], logits[:num]  # the last global batch's padding
  stats = feature_stats(features)
  if jax.process_index() == 0:
    save_stats(path, stats)
    print(f"reference statistics: computed and saved {path} (N={stats.num}, D={stats.dim})")
  return stats, logits
