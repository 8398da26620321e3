"""Sample-quality numerics from feature-network outputs: Fréchet distance and Inception score.

Pure numerics on arrays; extracting features is ``jaxdiff.evaluation.extract``, and the cached
statistics of a dataset split ``jaxdiff.evaluation.reference``. Both metrics are computed from
the outputs of a ``jaxdiff.evaluation.FeatureNet``:

* **Fréchet distance** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", https://arxiv.org/abs/1706.08500) between Gaussians
  fitted to the ``features`` of two image sets; with the standard Inception weights this is FID.
* **Inception-style score** (Salimans et al. 2016, "Improved Techniques for Training GANs",
  https://arxiv.org/abs/1606.03498), ``exp(E_x KL(p(y|x) || p(y)))`` from the ``logits``.

Statistics (``FeatureStats``: mean, unbiased covariance, count) are accumulated in float64 by
``FeatureAccumulator`` over any batching, saved and loaded as ``.npz`` (``save_stats``,
``load_stats``).

The Fréchet distance is computed in JAX in float64 under a local ``jax.enable_x64(True)``
context (the global flag is left alone), on the CPU: float32 loses FID's trace term to
cancellation, and accelerators often lack fast or any float64 linear algebra.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.io import files

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
  """Writes ``stats`` to ``path`` (``.npz``, local or ``gs://``) atomically: readers see the old
  file or the new one.

  Raises:
    OSError: the directory cannot be written.
  """
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, mean=stats.mean, cov=stats.cov, num=np.int64(stats.num))


def load_stats(path: str | os.PathLike) -> FeatureStats:
  """Reads statistics written by ``save_stats`` (``path`` local or ``gs://``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file lacks ``mean``, ``cov`` or ``num``, or their shapes disagree.
  """
  with files.as_path(path).open("rb") as fh, np.load(fh, allow_pickle=False) as f:
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
