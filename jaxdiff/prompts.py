"""Captions and prompts of a text-conditioned run, as its denoiser sees them.

A text run (``config.text.encoder``) trains on captions: made from each image's label and
measured attributes for mnist / fashion_mnist (:mod:`jaxdiff.data.captions`, seeded per
example), or read from an image folder's ``captions.jsonl`` / ``.txt`` files. The frozen encoder
(:mod:`jaxdiff.text`) runs once over the *distinct* captions of the split; the result is a
:class:`CaptionTable` (row 0 is always the empty prompt, what caption dropout and unguided
sampling use) cached on disk under a digest of the encoder's files and the captions, so a
restart reads it and a changed encoder or caption set never reuses a stale table. The data
pipeline gathers each example's row (:func:`jaxdiff.data.make_dataset`'s ``text``).

At sampling time :func:`conditioning` encodes prompts, and the empty or a negative prompt for
classifier-free guidance's other branch, into the same ``{"tokens", "mask", "pooled"}`` rows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxdiff import text as text_lib
from jaxdiff.config import is_text
from jaxdiff.data import captions as captions_lib
from jaxdiff.data import split as split_lib
from jaxdiff.data.sources import make_source
from jaxdiff.io import files

ENCODERS = ("minilm",)
BACKBONES = ("unet", "dit")
TEXT_KEYS = ("tokens", "mask", "pooled")


@dataclasses.dataclass(frozen=True)
class CaptionTable:
  """The encoded distinct captions of a split and each example's row among them."""

  captions: list[str]  # [K] distinct captions; captions[0] == "" (the empty prompt)
  tokens: np.ndarray  # float32 [K, L, D]
  mask: np.ndarray  # bool [K, L]
  pooled: np.ndarray  # float32 [K, D]
  index: np.ndarray  # int32 [N]: the row of example i's caption

  def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``{"tokens" [n, L, D], "mask" [n, L], "pooled" [n, D]}`` of the given rows."""
    return {"tokens": self.tokens[rows], "mask": self.mask[rows], "pooled": self.pooled[rows]}

  def first(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(cond, uncond)`` of the split's first ``n`` captions (cycled) against the empty prompt:
    what sample grids and sample-quality evaluation draw a text run with."""
    rows = self.index[np.arange(n) % len(self.index)]
    return self.rows(rows), self.rows(np.zeros(n, np.int32))


# ----------------------------------------------------------------------------- the encoder


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Why ``config``'s text settings cannot run, one line each; empty for a run without text."""
  if not is_text(config):
    return []
  t, lines = config.text, []
  if t.encoder not in ENCODERS:
    lines.append(f"text.encoder={t.encoder!r}: must be '' (no text) or one of {ENCODERS}")
  if not isinstance(t.max_length, int) or not 2 <= t.max_length <= text_lib.MAX_MAX_LENGTH:
    lines.append(f"text.max_length={t.max_length!r}: must be an int in 2..512")
  if not 0.0 <= t.caption_dropout < 1.0:
    lines.append(f"text.caption_dropout={t.caption_dropout!r}: must be in [0, 1)")
  if config.model.name not in BACKBONES:
    lines.append(f"model.name={config.model.name!r}: text conditioning needs one of {BACKBONES}")
  elif config.model.name == "unet" and not config.model.attn_resolutions:
    lines.append(
      "model.attn_resolutions=(): a text U-Net attends to the caption's tokens after each"
      " self-attention block; name at least one resolution"
    )
  name = config.data.name
  if name != "image_folder" and name not in captions_lib.supported_datasets():
    lines.append(
      f"data.name={name!r}: no captions; text runs make them for"
      f" {', '.join(captions_lib.supported_datasets())} and read them for image_folder"
      " (captions.jsonl or a .txt beside each image)"
    )
  if config.eval.every > 0:
    lines.append(
      f"eval.every={config.eval.every}: evaluation inside training is not supported for a text"
      " run yet; use `jaxdiff evaluate` or `jaxdiff sample --prompt` on its checkpoints"
    )
  if not lines:
    try:
      encoder_folder(config)
    except (ImportError, FileNotFoundError, ValueError) as e:
      lines.append(f"text.encoder={t.encoder!r}: {e}")
  return lines


def encoder_folder(config: ml_collections.ConfigDict) -> Path:
  """The folder of the run's encoder (``text.encoder_path``, or the packaged MiniLM's).

  Raises:
    ImportError: the MiniLM package or the readers are not installed.
    FileNotFoundError: the folder lacks ``model.safetensors`` or ``tokenizer.json``.
  """
  path = config.text.encoder_path
  folder = Path(path).expanduser() if path else text_lib.default_model_dir()
  text_lib.check_folder(folder)
  return folder


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a text run's ``config`` with ``text.width`` read from its encoder; ``config``
  itself without text."""
  if not is_text(config):
    return config
  width = text_lib.bert_sizes(encoder_folder(config))["hidden_size"]
  if config.text.width is not None and config.text.width != width:
    raise ValueError(
      f"text.width={config.text.width}: the encoder in {encoder_folder(config)} is {width} wide;"
      " leave it unset (it is read from the encoder)"
    )
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.text.width = width
  return resolved


def encoder(config: ml_collections.ConfigDict) -> text_lib.TextEncoder:
  """The run's frozen encoder at ``text.max_length`` (loaded once per process)."""
  return _load(str(encoder_folder(config)), int(config.text.max_length))


@functools.cache
def _load(folder: str, max_length: int) -> text_lib.TextEncoder:
  return text_lib.TextEncoder.load(folder, max_length=max_length)


@functools.cache
def _folder_digest(folder: str) -> str:
  h = hashlib.sha256()
  for name in (text_lib.WEIGHTS_FILE, text_lib.TOKENIZER_FILE):
    h.update(hashlib.sha256(Path(folder, name).read_bytes()).digest())
  return h.hexdigest()


def encoder_digest(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of the encoder's weights and tokenizer files and ``text.max_length``."""
  folder_digest = _folder_digest(str(encoder_folder(config)))
  return hashlib.sha256(f"{folder_digest}:{config.text.max_length}".encode()).hexdigest()


# ----------------------------------------------------------------------------- training captions


def split_captions(config: ml_collections.ConfigDict, split: str | None = None) -> list[str]:
  """One caption per example of ``split`` (default ``data.split``), in the source's order.

  mnist / fashion_mnist: made from the label and the image's attributes with cut points of the
  training split's images (per class), seeded by ``config.seed`` and the example's index.

  Raises:
    ValueError: an image folder without captions, or with a bad one (named).
  """
  data, split = config.data, split or config.data.split
  if data.name == "image_folder":
    source = make_source(data, split=split)
    root = files.as_path(data.image_folder)
    relative = [str(p.relative_to(root)) for p in source.paths]
    found = captions_lib.folder_captions(root, relative)
    if found is None:
      raise ValueError(
        f"data.image_folder={data.image_folder!r} has no captions: a text run needs"
        f" {captions_lib.CAPTIONS_FILE} in it or a .txt beside each image"
      )
    return found
  images, labels = images_and_labels(data, split)
  if split == data.split:
    cuts = captions_lib.thresholds(images, labels, data.num_classes)
  else:
    train_images, train_labels = images_and_labels(data, data.split)
    cuts = captions_lib.thresholds(train_images, train_labels, data.num_classes)
  return captions_lib.make_captions(data.name, labels, images, config.seed, cuts)


def images_and_labels(data: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, ...]:
  """All of ``split``'s uint8 images ``[N, H, W, C]`` and labels ``[N]``, in the source's order."""
  reader = split_lib.split_reader(
    data, split, batch_size=1024, process_index=0, process_count=1, pixels=True
  )
  batches = [(b["image"][b["mask"]], b["label"][b["mask"]]) for b in reader]
  return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))


def caption_table(
  config: ml_collections.ConfigDict, split: str | None = None, progress: bool = False
) -> CaptionTable:
  """The encoded captions of ``split`` (default ``data.split``), from the cache or encoded now
  (each distinct caption once) and cached atomically."""
  captions = split_captions(config, split)
  distinct = ["", *sorted(set(captions) - {""})]
  digest = hashlib.sha256(
    (encoder_digest(config) + "\n" + "\n".join(distinct)).encode()
  ).hexdigest()
  path = cache_dir(config) / f"{digest[:20]}.npz"
  row = {c: i for i, c in enumerate(distinct)}
  index = np.array([row[c] for c in captions], np.int32)
  if path.is_file():
    with np.load(path) as z:
      return CaptionTable(distinct, z["tokens"], z["mask"], z["pooled"], index)
  if progress:
    print(f"encoding {len(distinct)} distinct captions of {len(captions)}", flush=True)
  enc = encoder(config)
  out = enc.encode(distinct)
  enc.clear_cache()  # the table holds them now
  files.make_dirs(path.parent)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, tokens=out["tokens"], mask=out["mask"], pooled=out["pooled"])
  return CaptionTable(distinct, out["tokens"], out["mask"], out["pooled"], index)


def cache_dir(config: ml_collections.ConfigDict) -> Path:
  """Where caption tables are kept (``text.cache_dir`` or the text encoder's cache folder)."""
  return Path(config.text.cache_dir).expanduser() if config.text.cache_dir else text_lib.cache_dir()


# ----------------------------------------------------------------------------- prompts


def check_prompts(prompts: Any, what: str = "prompt") -> list[str]:
  """``prompts`` (a string or a list of strings) as a non-empty list of strings."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if (
    not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts)
  ):
    raise ValueError(f"{what}={prompts!r}: must be a string or a non-empty list of strings")
  return list(prompts)


def conditioning(
  config: ml_collections.ConfigDict,
  prompts: Sequence[str],
  negative_prompt: str | None = None,
  *,
  per_prompt: int = 1,
  label: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``(cond, uncond)`` for sampling ``per_prompt`` images of each prompt, prompt-major.

  ``cond`` holds each prompt's encoding, ``uncond`` the negative prompt's (default: the empty
  prompt, what caption dropout trained) in every row: classifier-free guidance's two branches.
  A class-conditional text model also gets ``label`` (its null class when None) in both.
  """
  prompts = check_prompts(prompts)
  if negative_prompt is not None and not isinstance(negative_prompt, str):
    raise ValueError(f"negative_prompt={negative_prompt!r}: must be a string")
  enc = encoder(config)
  out = enc.encode([*prompts, negative_prompt or ""])
  rows = np.repeat(np.arange(len(prompts)), per_prompt)
  n = len(rows)
  cond = {k: out[k][rows] for k in TEXT_KEYS}
  uncond = {k: np.repeat(out[k][-1:], n, axis=0) for k in TEXT_KEYS}
  if config.model.class_conditional:
    null = config.data.num_classes
    cond["label"] = np.full(n, null if label is None else label, np.int32)
    uncond["label"] = np.full(n, null, np.int32)
  return cond, uncond


def describe(table: CaptionTable, limit: int = 3) -> str:
  """A line for logs: how many captions, how many distinct, a few of them."""
  shown = json.dumps(table.captions[1 : 1 + limit])
  return f"{len(table.index)} captions, {len(table.captions) - 1} distinct, e.g. {shown}"
