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
from jaxdiff import text_files
from jaxdiff.checks import is_int
from jaxdiff.config import is_text
from jaxdiff.data import captions as captions_lib
from jaxdiff.data import sources
from jaxdiff.data import split as split_lib
from jaxdiff.data.sources import make_source
from jaxdiff.io import files
from jaxdiff.models import text_transformer

ENCODERS = ("minilm", "transformer", "file")
BACKBONES = ("unet", "dit")
TEXT_KEYS = ("tokens", "mask", "pooled")  # what a frozen encoder gives the denoiser


@dataclasses.dataclass(frozen=True)
class CaptionTable:
  """The encoded distinct captions of a split and each example's row among them.

  ``arrays`` holds ``tokens`` ``[K, L, D]``, ``mask`` ``[K, L]`` and ``pooled`` ``[K, D]`` for a
  frozen encoder (``minilm``, ``file``), or the byte ``ids`` and ``mask`` ``[K, L]`` for the
  jointly trained ``transformer``.
  """

  captions: list[str]  # [K] distinct captions; captions[0] == "" (the empty prompt)
  arrays: dict[str, np.ndarray]  # each [K, ...]
  index: np.ndarray  # int32 [N]: the row of example i's caption

  def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each array's ``rows``: what the denoiser is conditioned on for those captions."""
    return {k: v[rows] for k, v in self.arrays.items()}

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
  if t.encoder == "transformer":
    lines += _transformer_problems(t.transformer)
  if config.model.name not in BACKBONES:
    lines.append(f"model.name={config.model.name!r}: text conditioning needs one of {BACKBONES}")
  elif config.model.name == "unet" and not config.model.attn_resolutions:
    lines.append(
      "model.attn_resolutions=(): a text U-Net attends to the caption's tokens after each"
      " self-attention block; name at least one resolution"
    )
  name, feature = config.data.name, t.get("feature", "")
  if feature and name == "image_folder":
    lines.append(
      f"text.feature={feature!r}: names a tfds text feature; an image_folder's captions come"
      " from captions.jsonl or a .txt beside each image (leave it empty)"
    )
  elif not feature and name != "image_folder" and name not in captions_lib.supported_datasets():
    lines.append(
      f"data.name={name!r}: no captions; text runs make them for"
      f" {', '.join(captions_lib.supported_datasets())}, read them for image_folder"
      " (captions.jsonl or a .txt beside each image), and read a tfds dataset's text feature"
      " named by text.feature"
    )
  if config.eval.every > 0:
    lines.append(
      f"eval.every={config.eval.every}: evaluation inside training is not supported for a text"
      " run yet; use `jaxdiff evaluate` or `jaxdiff sample --prompt` on its checkpoints"
    )
  if not lines and t.encoder != "transformer":
    try:
      _frozen_width(config)
    except (ImportError, FileNotFoundError, ValueError) as e:
      lines.append(f"text.encoder={t.encoder!r}: {e}")
    else:
      try:
        check_digest(config)
      except ValueError as e:
        lines.append(str(e))
  return lines


def _transformer_problems(tt: ml_collections.ConfigDict) -> list[str]:
  lines = []
  for key in ("width", "depth", "num_heads"):
    v = tt[key]
    if not is_int(v, 1):
      lines.append(f"text.transformer.{key}={v!r}: must be an int >= 1")
  if not lines and tt.width % tt.num_heads:
    lines.append(
      f"text.transformer.width={tt.width}: must be divisible by text.transformer.num_heads="
      f"{tt.num_heads}"
    )
  return lines


def encoder_folder(config: ml_collections.ConfigDict) -> Path:
  """The folder of a ``minilm`` run's encoder (``text.encoder_path``, or the packaged MiniLM's).

  Raises:
    ImportError: the MiniLM package or the readers are not installed.
    FileNotFoundError: the folder lacks ``model.safetensors`` or ``tokenizer.json``.
  """
  path = config.text.encoder_path
  folder = Path(path).expanduser() if path else text_lib.default_model_dir()
  text_lib.check_folder(folder)
  return folder


def _frozen_width(config: ml_collections.ConfigDict) -> int:
  """The token width of a frozen encoder (``minilm`` or ``file``), its files checked.

  Raises:
    ImportError, FileNotFoundError, ValueError: the encoder cannot be read, or a ``file``'s
      token length is not ``text.max_length``.
  """
  if config.text.encoder == "minilm":
    return text_lib.bert_sizes(encoder_folder(config))["hidden_size"]
  if not config.text.encoder_path:
    raise ValueError("text.encoder_path is empty: name the .npz of precomputed embeddings")
  table = _embedding_file(config)
  if table.max_length != config.text.max_length:
    raise ValueError(
      f"text.max_length={config.text.max_length}: the embeddings in {table.path} have"
      f" {table.max_length} tokens per caption; set text.max_length={table.max_length}"
    )
  return table.width


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a text run's ``config`` with ``text.width`` read from its encoder (the
  transformer's width for ``transformer``) and ``text.digest`` (a frozen encoder's files);
  ``config`` itself without text.

  Raises:
    ValueError: ``text.width`` is set to another width, or ``text.digest`` names other files
      (see :func:`check_digest`).
  """
  if not is_text(config):
    return config
  t = config.text
  width = t.transformer.width if t.encoder == "transformer" else _frozen_width(config)
  if t.width is not None and t.width != width:
    raise ValueError(
      f"text.width={t.width}: the {t.encoder} encoder is {width} wide; leave it unset (it is"
      " read from the encoder)"
    )
  check_digest(config)
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.text.width = width
    resolved.text.digest = files_digest(config)
  return resolved


def files_digest(config: ml_collections.ConfigDict) -> str | None:
  """SHA-256 of a frozen encoder's files as they are now (minilm: its weights and tokenizer;
  file: the .npz); None for the ``transformer``, whose weights are the run's own."""
  kind = config.text.encoder
  if kind == "minilm":
    return _folder_digest(str(encoder_folder(config)))
  if kind == "file":
    return _embedding_file(config).digest
  return None


def check_digest(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when the run's ``text.digest`` (set when it started) is not the digest of
  the encoder files at ``text.encoder_path`` now: its denoiser was trained on other encodings.
  Runs from before the digest was recorded (None) are not checked."""
  stored = config.text.get("digest")
  if stored is None or (now := files_digest(config)) == stored:
    return
  where = config.text.encoder_path or "the packaged MiniLM"
  raise ValueError(
    f"text.encoder_path={where!r}: the {config.text.encoder} encoder's files there are not the"
    f" ones this run was trained with (their digest is {now[:12]}, the run's text.digest"
    f" {stored[:12]}); restore those files or point text.encoder_path at them"
  )


class _ByteTokens:
  """The ``transformer`` encoder's input side: texts -> byte ``ids`` and ``mask``."""

  def __init__(self, max_length: int):
    self.max_length = max_length

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    ids, mask = text_transformer.byte_tokenize(list(texts), self.max_length)
    return {"ids": ids, "mask": mask}


def encoder(config: ml_collections.ConfigDict) -> Any:
  """The run's encoder: an object whose ``encode(texts)`` gives the denoiser's text inputs.
  A frozen encoder's files are checked against the run's ``text.digest`` (:func:`check_digest`).

  ``minilm``: the frozen :class:`jaxdiff.text.TextEncoder` at ``text.max_length`` (loaded once
  per process); ``file``: the :class:`jaxdiff.text_files.EmbeddingFile` of
  ``text.encoder_path``; ``transformer``: byte tokenization (the network is in the model).
  """
  kind = config.text.encoder
  if kind == "transformer":
    return _ByteTokens(int(config.text.max_length))
  check_digest(config)
  if kind == "file":
    return _embedding_file(config)
  return _load(str(encoder_folder(config)), int(config.text.max_length))


@functools.cache
def _load(folder: str, max_length: int) -> text_lib.TextEncoder:
  return text_lib.TextEncoder.load(folder, max_length=max_length)


def _embedding_file(config: ml_collections.ConfigDict) -> text_files.EmbeddingFile:
  """A ``file`` run's embeddings (``text.encoder_path``), read once per process."""
  return _load_file(str(Path(config.text.encoder_path).expanduser()))


@functools.cache
def _load_file(path: str) -> text_files.EmbeddingFile:
  return text_files.EmbeddingFile.load(path)


@functools.cache
def _folder_digest(folder: str) -> str:
  h = hashlib.sha256()
  for name in (text_lib.WEIGHTS_FILE, text_lib.TOKENIZER_FILE):
    h.update(hashlib.sha256(Path(folder, name).read_bytes()).digest())
  return h.hexdigest()


def encoder_digest(config: ml_collections.ConfigDict) -> str:
  """SHA-256 of the MiniLM encoder's weights and tokenizer files and ``text.max_length``."""
  folder_digest = _folder_digest(str(encoder_folder(config)))
  return hashlib.sha256(f"{folder_digest}:{config.text.max_length}".encode()).hexdigest()


# ----------------------------------------------------------------------------- training captions


def split_captions(config: ml_collections.ConfigDict, split: str | None = None) -> list[str]:
  """One caption per example of ``split`` (default ``data.split``), in the source's order.

  A tfds dataset with ``text.feature`` set: that text feature of each example. mnist /
  fashion_mnist otherwise: made from the label and the image's attributes with cut points of the
  training split's images (per class), seeded by ``config.seed`` and the example's index.

  Raises:
    ValueError: an image folder without captions, or with a bad one (named); a tfds dataset
      without the text feature named.
  """
  data, split = config.data, split or config.data.split
  if config.text.get("feature"):
    return sources.text_feature(data, split=split, feature=config.text.feature)
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
  """The encoded captions of ``split`` (default ``data.split``), each distinct caption once.

  MiniLM's encodings are cached on disk (atomically, under a digest of the encoder and the
  captions); a ``file`` encoder's are looked up and the ``transformer``'s byte ids computed,
  both cheap enough to redo at each start.
  """
  check_digest(config)  # a cached table is the encoding of the files now, not the run's
  captions = split_captions(config, split)
  distinct = ["", *sorted(set(captions) - {""})]
  row = {c: i for i, c in enumerate(distinct)}
  index = np.array([row[c] for c in captions], np.int32)
  if config.text.encoder != "minilm":
    return CaptionTable(distinct, encoder(config).encode(distinct), index)
  digest = hashlib.sha256(
    (encoder_digest(config) + "\n" + "\n".join(distinct)).encode()
  ).hexdigest()
  path = cache_dir(config) / f"{digest[:20]}.npz"
  if path.is_file():
    with np.load(path) as z:
      return CaptionTable(distinct, {k: z[k] for k in TEXT_KEYS}, index)
  if progress:
    print(f"encoding {len(distinct)} distinct captions of {len(captions)}", flush=True)
  enc = encoder(config)
  out = enc.encode(distinct)
  enc.clear_cache()  # the table holds them now
  files.make_dirs(path.parent)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **{k: out[k] for k in TEXT_KEYS})
  return CaptionTable(distinct, {k: out[k] for k in TEXT_KEYS}, index)


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
  out = encoder(config).encode([*prompts, negative_prompt or ""])
  rows = np.repeat(np.arange(len(prompts)), per_prompt)
  n = len(rows)
  cond = {k: v[rows] for k, v in out.items()}
  uncond = {k: np.repeat(v[-1:], n, axis=0) for k, v in out.items()}
  if config.model.class_conditional:
    null = config.data.num_classes
    cond["label"] = np.full(n, null if label is None else label, np.int32)
    uncond["label"] = np.full(n, null, np.int32)
  return cond, uncond


def describe(table: CaptionTable, limit: int = 3) -> str:
  """A line for logs: how many captions, how many distinct, a few of them."""
  shown = json.dumps(table.captions[1 : 1 + limit])
  return f"{len(table.index)} captions, {len(table.captions) - 1} distinct, e.g. {shown}"
