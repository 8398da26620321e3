"""The one interface every feature network implements (a leaf: it imports no network).

A ``FeatureNet`` maps a batch of images (NHWC float32 in ``[-1, 1]``, the library's
convention, at the dataset's own size and channel count) to ``{"features": [B, D],
"logits": [B, K]}``. The Fréchet distance uses ``features``; the Inception-style score uses
``logits``. Each network brings its images to its own input size and channel count itself.

``name`` identifies the network *and its weights* (it includes a digest of the weight file), so
cached reference statistics are never reused across different weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

import jax

from jaxdiff.io import files


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network ready to apply.

  Attributes:
    name: identifies the network and its weights, e.g. ``"classifier-fashion_mnist-1a2b3c4d"``;
      safe to use in a file name.
    apply: ``apply(images) -> {"features": [B, D], "logits": [B, K]}`` for ``images`` float32
      ``[B, H, W, C]`` in ``[-1, 1]``. A ``jax.tree_util.Partial`` holding the weights, so it can
      be passed to a jitted function as an argument.
    feature_dim: D.
    num_classes: K.
  """

  name: str
  apply: Callable[[jax.Array], dict[str, jax.Array]]
  feature_dim: int
  num_classes: int


def file_digest(path: str | os.PathLike, length: int = 8) -> str:
  """The first ``length`` hex digits of the file's SHA-256 (names weights in cache keys); the file
  may be local or ``gs://``."""
  h = hashlib.sha256()
  with files.as_path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:length]
