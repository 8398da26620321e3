"""Feature networks by name: a registry over the ``FeatureNet`` leaf interface, and where the
default classifier of a dataset lives.

Two kinds:

* ``"inception"``: the FID InceptionV3 (``jaxdiff.evaluation.inception``), weights from a file
  the user provides (the standard FID when the weights are the standard ones).
* ``"classifier"``: a small CNN trained by jaxdiff on the labelled dataset
  (``jaxdiff.evaluation.classifier``); for MNIST-like data, where Inception features are a poor
  fit. Without a path, the dataset's default classifier in the cache is used; nothing trains one
  behind the caller's back: a missing one is an error that says how to make it.

Example::

  net = feature_net("classifier", None, config.data)   # CACHE/classifier-{dataset}-....npz
  net = feature_net("inception", "inception.npz", config.data)
"""

from __future__ import annotations

import os
from collections.abc import Callable

import ml_collections
from etils import epath

from jaxdiff.evaluation import classifier, inception
from jaxdiff.evaluation.featurenet import FeatureNet, file_digest
from jaxdiff.io import files

# kind -> loader(path) -> FeatureNet: a new network is one module and one line here.
LOADERS: dict[str, Callable[[epath.Path], FeatureNet]] = {
  "inception": inception.feature_net,
  "classifier": classifier.feature_net,
}
FEATURE_KINDS = tuple(LOADERS)
DEFAULT_CACHE = "~/.cache/jaxdiff"
TRAIN_CLASSIFIER_COMMAND = "jaxdiff train-classifier"

__all__ = [
  "FEATURE_KINDS",
  "FeatureNet",
  "cache_dir",
  "check_kind",
  "default_classifier_path",
  "feature_net",
  "file_digest",
  "load",
]


def cache_dir(path: str | os.PathLike | None = None) -> epath.Path:
  """Where reference statistics and classifiers live: ``path``, ``$JAXDIFF_CACHE`` or
  ``~/.cache/jaxdiff`` (a local folder or a ``gs://`` URI; see ``files.as_path``)."""
  return files.as_path(path or os.environ.get("JAXDIFF_CACHE") or DEFAULT_CACHE)


def default_classifier_path(
  data_config: ml_collections.ConfigDict, cache: str | os.PathLike | None = None
) -> epath.Path:
  """``CACHE/classifier-{dataset}-{size}x{channels}.npz``: the dataset's default classifier."""
  d = data_config
  return cache_dir(cache) / f"classifier-{d.name}-{d.image_size}x{d.channels}.npz"


def check_kind(kind: str, path: str | os.PathLike | None = None) -> None:
  """Raises early (before any slow work) for an unknown kind, a missing file, or Inception
  without weights."""
  if kind not in LOADERS:
    raise ValueError(f"features={kind!r}; allowed: {', '.join(FEATURE_KINDS)}")
  if path and not (weights := files.as_path(path)).is_file():
    raise FileNotFoundError(f"no {kind} weight file at {weights}")
  if kind == "inception" and not path:
    raise ValueError(
      "features='inception' needs --features_path: the FID InceptionV3 weights cannot be"
      " downloaded by jaxdiff; see jaxdiff/evaluation/inception.py for the file format and"
      " `jaxdiff convert-inception` for the converter"
    )


def load(kind: str, path: str | os.PathLike) -> FeatureNet:
  """Loads the feature network ``kind`` (one of ``FEATURE_KINDS``) from its weight file.

  Raises:
    ValueError: unknown ``kind``.
    FileNotFoundError: no file at ``path``.
  """
  check_kind(kind, path)
  return LOADERS[kind](files.as_path(path))


def feature_net(
  kind: str,
  path: str | os.PathLike | None,
  data_config: ml_collections.ConfigDict,
  cache: str | os.PathLike | None = None,
) -> FeatureNet:
  """The feature network for ``data_config``'s dataset.

  Args:
    kind: "classifier" or "inception".
    path: the weight file; None for the dataset's default classifier
      (``default_classifier_path``).
    data_config: the ``config.data`` section.
    cache: the cache directory (see ``cache_dir``).

  Raises:
    ValueError: unknown kind, or Inception without a path.
    FileNotFoundError: no file at ``path``, or no default classifier yet (the message gives
      the command that trains one).
  """
  check_kind(kind, path)
  if path:
    return load(kind, path)
  default = default_classifier_path(data_config, cache)
  if not default.is_file():
    raise FileNotFoundError(
      f"no classifier for dataset {data_config.name!r} at {default}; train one with"
      f" `{TRAIN_CLASSIFIER_COMMAND} --config YOUR_CONFIG.py --out {default.parent}` (a few"
      " minutes on a CPU), or pass --train_classifier to `jaxdiff evaluate`, or give"
      " --features_path"
    )
  return load("classifier", default)
