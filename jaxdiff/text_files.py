"""Precomputed caption embeddings read from a file: for text encoders run elsewhere (T5, CLIP, ...).

A text run with ``text.encoder = "file"`` reads every caption's encoding from the ``.npz`` file
``text.encoder_path`` instead of running a network. The file holds, for K distinct captions:

* ``captions``: str ``[K]``, distinct; ``""`` (the empty prompt) among them, since caption
  dropout and unguided sampling use it;
* ``tokens``: float ``[K, L, D]``, the encoder's token embeddings (padding positions are
  ignored);
* ``mask``: bool ``[K, L]``, True at real tokens, at least one per caption;
* ``pooled`` (optional): float ``[K, D]``, a sentence embedding; without it, the mean of the
  real tokens.

A prompt is looked up by its exact text, so sampling can use only the captions the file covers
(the error names the missing ones). :func:`save_embeddings` writes such a file, checked as
:func:`EmbeddingFile.load` checks it::

  from jaxdiff import text_files
  out = my_t5.encode(captions)               # whatever runs the encoder
  text_files.save_embeddings("t5.npz", ["", *captions], tokens, mask)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiff.io import files

KEYS = ("captions", "tokens", "mask", "pooled")
REQUIRED = KEYS[:3]


def _pooled(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  m = mask[..., None].astype(np.float32)
  return (tokens * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _check(
  where: str, captions: np.ndarray, tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray | None
) -> list[str]:
  """Why these arrays are not an embeddings table, one line each."""
  lines = []
  if captions.ndim != 1 or captions.dtype.kind != "U":
    return [f"{where}: captions must be a [K] array of str, got {captions.dtype} {captions.shape}"]
  k = len(captions)
  if len(set(captions.tolist())) != k:
    lines.append(f"{where}: captions must be distinct")
  if "" not in set(captions.tolist()):
    lines.append(
      f"{where}: has no entry for the empty prompt ''; caption dropout and unguided sampling"
      " need its encoding"
    )
  if tokens.ndim != 3 or tokens.shape[0] != k or tokens.dtype.kind != "f":
    lines.append(f"{where}: tokens must be float [K={k}, L, D], got {tokens.dtype} {tokens.shape}")
  elif mask.shape != tokens.shape[:2] or mask.dtype != np.bool_:
    lines.append(
      f"{where}: mask must be bool {list(tokens.shape[:2])}, got {mask.dtype} {mask.shape}"
    )
  elif not mask.any(axis=1).all():
    empty = captions[~mask.any(axis=1)][:3].tolist()
    lines.append(f"{where}: captions {empty} have no real token (mask all False)")
  elif pooled is not None and (pooled.shape != (k, tokens.shape[2]) or pooled.dtype.kind != "f"):
    lines.append(
      f"{where}: pooled must be float [{k}, {tokens.shape[2]}], got {pooled.dtype} {pooled.shape}"
    )
  if tokens.dtype.kind == "f" and not np.isfinite(tokens).all():
    lines.append(f"{where}: tokens hold NaN or inf")
  return lines


class EmbeddingFile:
  """A table of precomputed caption encodings (see the module docstring)."""

  def __init__(self, path: Path, captions: list[str], arrays: dict[str, np.ndarray], digest: str):
    self.path, self.captions, self.arrays, self.digest = path, captions, arrays, digest
    self._row = {c: i for i, c in enumerate(captions)}

  @property
  def max_length(self) -> int:
    return int(self.arrays["tokens"].shape[1])

  @property
  def width(self) -> int:
    return int(self.arrays["tokens"].shape[2])

  @classmethod
  def load(cls, path: str | os.PathLike) -> EmbeddingFile:
    """Reads and checks ``path``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not an ``.npz`` of the layout above (every problem named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
      raise FileNotFoundError(
        f"text.encoder_path={str(path)!r}: no such file; the 'file' encoder reads precomputed"
        " caption embeddings from an .npz (jaxdiff.text_files.save_embeddings writes one)"
      )
    raw = path.read_bytes()
    try:
      with np.load(path, allow_pickle=False) as z:
        stored = {k: np.asarray(z[k]) for k in KEYS if k in z.files}
    except (OSError, EOFError, ValueError, AttributeError, TypeError) as e:  # not an .npz, ...
      raise ValueError(f"{path}: not a readable .npz of caption embeddings ({e})") from e
    missing = [k for k in REQUIRED if k not in stored]
    if missing:
      raise ValueError(
        f"{path}: lacks {missing}; an embeddings file holds {list(REQUIRED)} (and optionally"
        " 'pooled')"
      )
    captions, tokens, mask = (stored[k] for k in REQUIRED)
    pooled = stored.get("pooled")
    if lines := _check(str(path), captions, tokens, mask, pooled):
      raise ValueError("; ".join(lines))
    tokens = np.where(mask[..., None], tokens, 0).astype(np.float32)
    pooled = _pooled(tokens, mask) if pooled is None else pooled.astype(np.float32)
    arrays = {"tokens": tokens, "mask": mask, "pooled": pooled}
    return cls(path, captions.tolist(), arrays, hashlib.sha256(raw).hexdigest())

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"tokens" [B, L, D], "mask" [B, L], "pooled" [B, D]}`` of ``texts``, looked up.

    Raises:
      ValueError: a text the file has no entry for (up to five named).
    """
    missing = [t for t in dict.fromkeys(texts) if t not in self._row]
    if missing:
      raise ValueError(
        f"{len(missing)} text(s) not in {self.path} ({len(self.captions)} captions), e.g."
        f" {missing[:5]}: precomputed embeddings cover only the captions they were made for;"
        " encode these too and add them (jaxdiff.text_files.save_embeddings)"
      )
    rows = np.array([self._row[t] for t in texts], np.int64)
    return {k: v[rows] for k, v in self.arrays.items()}


def save_embeddings(
  path: str | os.PathLike,
  captions: Sequence[str],
  tokens: np.ndarray,
  mask: np.ndarray,
  pooled: np.ndarray | None = None,
) -> Path:
  """Writes an embeddings file for ``text.encoder = "file"`` atomically and returns its path.

  Raises:
    ValueError: arrays that do not make a valid table (every problem named); nothing is written.
  """
  path = Path(path).expanduser()
  arrays = {
    "captions": np.asarray(list(captions), dtype=str),
    "tokens": np.asarray(tokens),
    "mask": np.asarray(mask),
  }
  if pooled is not None:
    arrays["pooled"] = np.asarray(pooled)
  checked = (arrays[k] for k in REQUIRED)
  if lines := _check(str(path), *checked, arrays.get("pooled")):
    raise ValueError("; ".join(lines))
  files.make_dirs(path.parent)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)
  return path
