"""Captions for text-conditioned training: made from labels and measured attributes, or read.

Fashion-MNIST and MNIST have integer labels only. A caption names the class by one of several
synonyms inside one of several templates, so a text encoder sees varied wording for one meaning,
and names up to two attributes measured on the image itself ("a dark, wide pullover"), so a
prompt can control more than the class. The same measurement (``measure``) and the same cut
points (``thresholds``) later decide whether a *sample* obeys the attribute its prompt names
(``parse_attributes``), which is why measurement works on any uint8 batch and cut points can be
computed once from the training images and passed around.

Attributes are measured on the foreground: the pixels whose luminance (ITU-R BT.601, as PIL's
``"L"``) exceeds ``FOREGROUND_LEVEL``. That assumes a dark background, as in (Fashion-)MNIST.
Words come from tertiles: the lowest third of a class gets the low word ("dark"), the highest
third the high word ("light"), the middle third none. Cut points are per class when labels are
given, because both datasets scale each object to fill the frame's longer side, so shape is
mostly the class: with one cut for all classes almost no pullover is "wide" and every sneaker is;
per class, "a wide pullover" means wide for a pullover, as adjectives do in English.

Image folders carry their own captions (``folder_captions``): a ``captions.jsonl`` in the folder
root or a ``.txt`` beside each image.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence

import numpy as np

from jaxdiff.io import files

FOREGROUND_LEVEL = 0.1  # luminance in [0, 1] above which a pixel is foreground
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights of PIL's "L" conversion
_CHUNK = 4096  # images measured at once: bounds memory on a whole training split

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# dataset -> per class (the tfds label order), its synonyms; the first is the canonical name.
_SYNONYMS: dict[str, tuple[tuple[str, ...], ...]] = {
  "fashion_mnist": (
    ("t-shirt", "tee", "top"),
    ("trousers", "pants"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "open-toed shoe"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "bootie"),
  ),
  "mnist": tuple((word, str(d), f"digit {d}") for d, word in enumerate(_DIGITS)),
}
_PLURALS = {"trousers", "pants"}  # nouns that take no article ("dark trousers") and "are"

# attribute -> (low word, high word). Height is measured but not named: both datasets scale most
# objects to the full frame height, so its tertiles collapse onto 1.0. The order here is the
# order of adjectives in a caption: size, shape, then colour ("a large, wide, dark coat").
ATTRIBUTE_WORDS: dict[str, tuple[str, str]] = {
  "fill": ("small", "large"),
  "width": ("narrow", "wide"),
  "brightness": ("dark", "light"),
}
# word -> the adjectives that say it in a caption (and are read back by parse_attributes).
_ADJECTIVES: dict[str, tuple[str, ...]] = {
  "small": ("small", "little"),
  "large": ("large", "big"),
  "narrow": ("narrow", "slim"),
  "wide": ("wide", "broad"),
  "dark": ("dark", "dim"),
  "light": ("light", "bright", "pale"),
}
# {np}: article, adjectives, name; {bare}: without the article; {np0}: without the adjectives,
# which {pred} then says ("a coat that is dark and wide").
_TEMPLATES = ("{np}", "{bare}", "a photo of {np}", "an image of {np}", "a picture of {np}")
_PREDICATE_TEMPLATES = ("{np0} that {be} {pred}", "a photo of {np0} that {be} {pred}")
_ATTRIBUTE_COUNTS = (0.3, 0.45, 0.25)  # probability of naming 0, 1 or 2 attributes


def supported_datasets() -> tuple[str, ...]:
  """The datasets ``make_captions`` can caption from labels (others need ``folder_captions``)."""
  return tuple(sorted(_SYNONYMS))


def synonyms(dataset: str) -> tuple[tuple[str, ...], ...]:
  """Per class (label order), the names a caption may use for it; the first is canonical."""
  if dataset not in _SYNONYMS:
    raise ValueError(
      f"no class names for dataset {dataset!r}: captions from labels support"
      f" {', '.join(supported_datasets())}; give an image folder a captions.jsonl instead"
    )
  return _SYNONYMS[dataset]


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
  """Per-image attributes of uint8 ``[N, H, W, C]`` images (C = 1 grey or 3 RGB).

  Returns float64 ``[N]`` arrays, each in [0, 1]: ``brightness``, the mean luminance of the
  foreground pixels (luminance > ``FOREGROUND_LEVEL``); ``fill``, the fraction of the frame's
  pixels that are foreground; ``width`` and ``height``, the extent of the foreground's bounding
  box as a fraction of the frame's width and height. An image without foreground measures 0 for
  all four (and ``attribute_words`` gives it no words).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f"images must be uint8 [N, H, W, C] with C 1 or 3, not {images.dtype} {images.shape}"
    )
  n, h, w, _ = images.shape
  out = {k: np.zeros(n) for k in ("brightness", "fill", "width", "height")}
  for start in range(0, n, _CHUNK):
    part = images[start : start + _CHUNK]
    luma = part[..., 0] / 255.0 if part.shape[-1] == 1 else part @ (_LUMA / 255.0)
    fg = luma > FOREGROUND_LEVEL  # [B, H, W]
    count = fg.sum((1, 2))
    rows = slice(start, start + len(part))
    out["brightness"][rows] = np.where(fg, luma, 0.0).sum((1, 2)) / np.maximum(count, 1)
    out["fill"][rows] = count / (h * w)
    out["width"][rows] = _extent(fg.any(1))
    out["height"][rows] = _extent(fg.any(2))
  return out


def _extent(occupied: np.ndarray) -> np.ndarray:
  """[B, L] bool -> [B]: the span from the first to the last True as a fraction of L; 0 if none."""
  length = occupied.shape[1]
  first = occupied.argmax(1)
  last = length - 1 - occupied[:, ::-1].argmax(1)
  return np.where(occupied.any(1), (last - first + 1) / length, 0.0)


def thresholds(
  images: np.ndarray, labels: Sequence[int] | None = None, num_classes: int | None = None
) -> dict[str, np.ndarray]:
  """Tertile cut points of each named attribute, from (training) images: attribute -> float64
  ``[K, 2]`` rows of (low cut, high cut), one row per class, or one row (K = 1) for all images
  when ``labels`` is None.

  Compute them once from the training split and pass them to ``make_captions`` and to the check
  of samples, so captions and evaluation use the same cut points. ``num_classes`` (default: the
  largest label + 1) sets K with labels. Images without foreground are left out; a class with no
  (non-blank) image gets the cut points of all images.
  """
  values = measure(images)
  keep = values["fill"] > 0
  if not keep.any():
    raise ValueError("thresholds need at least one image with foreground; every image is blank")
  if labels is None:
    groups = [keep]
  else:
    k = num_classes if num_classes is not None else int(np.max(labels, initial=-1)) + 1
    labels = _labels(labels, len(keep), k)
    groups = [keep & (labels == c) for c in range(k)]
  cuts = {}
  for name in ATTRIBUTE_WORDS:
    everyone = np.quantile(values[name][keep], (1 / 3, 2 / 3))
    rows = [np.quantile(values[name][g], (1 / 3, 2 / 3)) if g.any() else everyone for g in groups]
    cuts[name] = np.array(rows, dtype=np.float64)
  return cuts


_thresholds = thresholds  # make_captions' argument of the same name hides the function


def _labels(labels: Sequence[int], n: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels) if len(labels) else np.zeros(0, dtype=int)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f"labels must be {n} integers (one per image), not {labels.dtype} {labels.shape}"
    )
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, {num_classes}), not [{labels.min()}, {labels.max()}]")
  return labels


def attribute_words(
  values: Mapping[str, np.ndarray],
  thresholds: Mapping[str, np.ndarray],
  labels: Sequence[int] | None = None,
) -> list[dict[str, str]]:
  """Per image, attribute -> word for the attributes outside their middle tertile.

  ``values`` come from ``measure()``, ``thresholds`` from ``thresholds()``; ``labels`` pick the
  rows of per-class cut points. A value below the low cut gets the low word, above the high cut
  the high word; a value equal to a cut gets none, so an attribute that barely varies within a
  class (the width of sneakers, nearly all full-frame) is rarely named. Blank images get none.
  """
  n = len(values["fill"])
  k = _num_rows(thresholds)
  if k > 1 and labels is None:
    raise ValueError(f"per-class cut points ({k} classes) need the images' labels")
  rows = np.zeros(n, dtype=int) if k == 1 else _labels(labels, n, k)
  words: list[dict[str, str]] = [{} for _ in range(n)]
  for name, (low, high) in ATTRIBUTE_WORDS.items():
    c = np.asarray(thresholds[name], dtype=np.float64)
    v = np.asarray(values[name], dtype=np.float64)
    lo, hi = c[rows, 0], c[rows, 1]
    for i in np.flatnonzero((v < lo) | (v > hi)):
      if values["fill"][i] > 0:
        words[i][name] = low if v[i] < lo[i] else high
  return words


def _num_rows(cuts: Mapping[str, np.ndarray]) -> int:
  """The number K of rows every attribute's ``[K, 2]`` cut points share (1: for all classes)."""
  shapes = {name: np.shape(cuts[name]) if name in cuts else None for name in ATTRIBUTE_WORDS}
  ks = {s[0] if s and len(s) == 2 and s[0] and s[1] == 2 else 0 for s in shapes.values()}
  bad = 0 in ks or any(np.any(np.diff(cuts[name]) < 0) for name in ATTRIBUTE_WORDS)
  if bad or len(ks) != 1:
    raise ValueError(
      f"cut points must map each of {', '.join(ATTRIBUTE_WORDS)} to [K, 2] rows of (low <= high)"
      f" with one K, as thresholds() returns; got shapes {shapes}"
    )
  return ks.pop()


def article(phrase: str) -> str:
  """The indefinite article for a noun phrase, by the sound of its first word ("an ankle boot",
  "an 8", "a one", "a large coat"); "" when its noun (the last word) is plural ("dark trousers")."""
  words = phrase.lower().replace(",", " ").split()
  if words[-1] in _PLURALS:
    return ""
  if words[0].startswith(("one", "uni", "use", "eu")):
    return "a"
  if words[0][0] in "aeiou" or words[0].startswith("8") or words[0] in ("11", "18"):
    return "an"
  return "a"


def caption(dataset: str, label: int, words: Mapping[str, str], seed: int, index: int) -> str:
  """One caption of example ``index`` (of class ``label``, with ``attribute_words`` ``words``).

  Every choice comes from ``np.random.default_rng([seed, index])``, so an example's caption
  depends only on (seed, index), never on the batch it comes in: a synonym of its class, zero to
  two of its attribute words (each by one of its adjectives), and a template.
  """
  names = synonyms(dataset)
  if not 0 <= label < len(names):
    raise ValueError(f"label {label} is not a {dataset} class: labels lie in [0, {len(names)})")
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, not seed={seed}, index={index}")
  rng = np.random.default_rng([seed, index])
  name = names[label][rng.integers(len(names[label]))]
  named = [a for a in ATTRIBUTE_WORDS if a in words]
  k = min(len(named), int(rng.choice(len(_ATTRIBUTE_COUNTS), p=_ATTRIBUTE_COUNTS)))
  picked = sorted(rng.choice(len(named), size=k, replace=False)) if k else []
  adjectives = []
  for i in picked:
    options = _ADJECTIVES[words[named[i]]]
    adjectives.append(options[rng.integers(len(options))])
  templates = _TEMPLATES + (_PREDICATE_TEMPLATES if adjectives else ())
  template = templates[rng.integers(len(templates))]
  bare = " ".join([", ".join(adjectives), name]).strip()
  return template.format(
    np=f"{article(bare)} {bare}".strip(),
    bare=bare,
    np0=f"{article(name)} {name}".strip(),
    be="are" if name in _PLURALS else "is",
    pred=" and ".join(adjectives),
  )


def make_captions(
  dataset: str,
  labels: Sequence[int],
  images: np.ndarray | None,
  seed: int,
  thresholds: Mapping[str, np.ndarray] | None = None,
  *,
  indices: Sequence[int] | None = None,
) -> list[str]:
  """One caption per example (see ``caption``); ``indices`` are the examples' positions in the
  dataset (default ``0..N-1``), which with ``seed`` fix each caption.

  ``images`` (uint8 ``[N, H, W, C]``) supply attribute words, ``None`` captions by class alone.
  ``thresholds`` (``thresholds()``'s cut points) should come from the training split: without
  them they are computed per class from these images, so the words then depend on the batch.
  """
  names = synonyms(dataset)
  labels = _labels(labels, len(labels), len(names))
  indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
  if indices.shape != labels.shape:
    raise ValueError(f"indices must be one per label ({labels.shape}), not {indices.shape}")
  if images is None:
    words: list[dict[str, str]] = [{} for _ in labels]
  else:
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels: give one label per image")
    if thresholds is None:
      thresholds = _thresholds(images, labels, len(names))
    words = attribute_words(measure(images), thresholds, labels)
  return [
    caption(dataset, int(y), w, seed, int(i))
    for y, w, i in zip(labels, words, indices, strict=True)
  ]


def _matcher(phrases: Sequence[str]) -> re.Pattern[str]:
  # Longest first; hyphens count as part of a word, so "shirt" does not match inside "t-shirt".
  alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
  return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def parse_attributes(prompt: str) -> dict[str, str]:
  """The attribute words a prompt names, attribute -> word (``{"brightness": "dark"}``), read
  through the same adjectives captions use ("a bright, broad coat" -> light, wide): what a
  sample's ``attribute_words`` must contain for it to obey the prompt."""
  word_of = {adj: word for word, adjs in _ADJECTIVES.items() for adj in adjs}
  attribute_of = {word: a for a, pair in ATTRIBUTE_WORDS.items() for word in pair}
  found: dict[str, str] = {}
  for match in _matcher(list(word_of)).finditer(prompt):
    word = word_of[match.group(0).lower()]
    attribute = attribute_of[word]
    if found.get(attribute, word) != word:
      raise ValueError(
        f"prompt {prompt!r} names both {found[attribute]!r} and {word!r} for {attribute}"
      )
    found[attribute] = word
  return found


def parse_label(dataset: str, prompt: str) -> int | None:
  """The class a prompt names by any of its synonyms, or None if it names none."""
  label_of = {name: y for y, names in enumerate(synonyms(dataset)) for name in names}
  labels = {label_of[m.group(0).lower()] for m in _matcher(list(label_of)).finditer(prompt)}
  if len(labels) > 1:
    raise ValueError(f"prompt {prompt!r} names several {dataset} classes: {sorted(labels)}")
  return labels.pop() if labels else None


CAPTIONS_FILE = "captions.jsonl"
_FOLDER_HINT = (
  f'give every image a non-empty caption: a line {{"file": "<path in the folder>", "caption":'
  f' "<text>"}} in {CAPTIONS_FILE} at the folder root, or a .txt of the same stem beside it'
)


def folder_captions(folder: str | os.PathLike, relative_paths: Sequence[str]) -> list[str] | None:
  """The caption of each image of an image folder (``relative_paths``: "/"-separated, relative to
  ``folder``, local or ``gs://``), in that order; None if the folder has no captions at all.

  Captions come from ``captions.jsonl`` in the folder root when it exists (one JSON object a
  line, ``{"file": "cats/001.png", "caption": "a cat"}``; blank lines skipped; entries for other
  files ignored), else from a ``.txt`` beside each image (``cats/001.txt``). Whitespace, newlines
  included, is collapsed to single spaces. An image without a caption, an empty caption or a
  malformed or repeated jsonl line raises a ``ValueError`` naming the file.
  """
  root = files.as_path(folder)
  keys = [posixpath.normpath(p) for p in relative_paths]
  jsonl = root / CAPTIONS_FILE
  if jsonl.exists():
    found = _read_jsonl(jsonl)
    where = str(jsonl)
  else:
    texts = {posixpath.splitext(k)[0] + ".txt" for k in keys}
    # One listing, not one existence check per image (each a request on GCS).
    present = {
      (d / n).relative_to(root).as_posix()
      for d, _, names in root.walk()
      for n in names
      if n.endswith(".txt")
    }
    if not texts & present:
      return None
    found = {}
    for k in keys:
      text = posixpath.splitext(k)[0] + ".txt"
      if text in present:
        found[k] = _one_line((root / text).read_text(encoding="utf-8"), root / text)
    where = "the .txt files beside the images"
  missing = [k for k in keys if k not in found]
  if missing:
    raise ValueError(
      f"{root / missing[0]}: no caption in {where} ({len(missing)} of {len(keys)} images have"
      f" none); {_FOLDER_HINT}"
    )
  return [found[k] for k in keys]


def _read_jsonl(path: os.PathLike) -> dict[str, str]:
  """captions.jsonl -> {normalised relative path: caption}, checking every line."""
  found: dict[str, str] = {}
  lines = files.as_path(path).read_text(encoding="utf-8").splitlines()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
      ok = isinstance(entry, dict) and all(
        isinstance(entry.get(k), str) for k in ("file", "caption")
      )
    except json.JSONDecodeError:
      ok = False
    if not ok:
      raise ValueError(
        f"{path}:{number}: {line[:80]!r} is not a JSON object with string 'file' and 'caption';"
        f" {_FOLDER_HINT}"
      )
    key = posixpath.normpath(entry["file"])
    if key in found:
      raise ValueError(f"{path}:{number}: a second caption for {key!r}; give each file one line")
    found[key] = _one_line(entry["caption"], f"{path}:{number}")
  return found


def _one_line(text: str, where: object) -> str:
  text = " ".join(text.split())
  if not text:
    raise ValueError(f"{where}: empty caption; {_FOLDER_HINT}")
  return text
