"""The two alternatives to MiniLM (issue 12): a byte-level text transformer trained jointly with
the denoiser, and precomputed embeddings read from a file; and captions from a tfds text
feature. MiniLM itself is tests/test_text_encoder.py; the shared text plumbing
tests/test_text_conditioning.py, whose tiny captioned folder and random BERT these reuse."""

import copy
import hashlib

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from jaxdiff import data, parallel, prompts, text_files, training
from jaxdiff.data import sources
from jaxdiff.models import build_model
from jaxdiff.models import text_transformer as tt
from jaxdiff.run import load_run
from tests.conftest import jaxdiff_cli
from tests.test_text_conditioning import captioned_dir, encoder_dir, text_config

__all__ = ["captioned_dir", "encoder_dir"]  # fixtures shared with test_text_conditioning


def transformer_config(image_dir, cache_dir, **overrides):
  config = text_config(image_dir, "", cache_dir, **overrides)
  config.text.encoder = "transformer"
  config.text.max_length = 24
  config.text.transformer.update(width=16, depth=1, num_heads=2)
  for dotted, value in overrides.items():  # again: text_config's defaults came after them
    section, key = dotted.split("__")
    config[section][key] = value
  return config


# ----------------------------------------------------------------------------- byte tokens


def _reference_bytes(text, max_length):
  """The framing written out: BOS, each UTF-8 byte + 3, EOS, zeros."""
  body = [b + 3 for b in text.lower().encode("utf-8")][: max_length - 2]
  row = [1, *body, 2]
  return row + [0] * (max_length - len(row))


def test_byte_tokens_frame_lower_cased_utf8_and_truncate():
  texts = ["a Dark coat", "", "naïve 靴", "x" * 40]
  ids, mask = tt.byte_tokenize(texts, 12)
  assert ids.dtype == np.int32 and ids.shape == (4, 12) and mask.dtype == np.bool_
  for row, text in zip(ids, texts, strict=True):
    assert row.tolist() == _reference_bytes(text, 12)
  np.testing.assert_array_equal(mask, ids != 0)
  assert mask[1].sum() == 2  # the empty prompt is [BOS, EOS]: something to attend to
  assert ids[3, -1] == tt.EOS  # truncated texts still end with EOS
  assert ids.max() < tt.VOCAB_SIZE
  with pytest.raises(ValueError, match=r"max_length=1: must be an int >= 2"):
    tt.byte_tokenize(["a"], 1)


# ----------------------------------------------------------------------------- the transformer


@pytest.fixture(scope="module")
def encoder():
  """A random TextTransformer, called jitted (eager dispatch of its ops costs seconds)."""
  module = tt.TextTransformer(width=16, depth=2, num_heads=2, max_length=20, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(module)
  apply = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask))

  def encode(ids, mask):
    if ids.shape[1] > module.max_length:  # what the module raises, at trace time
      return module(ids, mask)
    return apply(params, ids, mask)

  return encode


def test_transformer_outputs_zero_at_padding_and_the_mean_of_the_rest(encoder):
  ids, mask = tt.byte_tokenize(["a coat", "an ankle boot", ""], 20)
  tokens, pooled = encoder(ids, mask)
  assert tokens.shape == (3, 20, 16) and pooled.shape == (3, 16)
  assert np.all(np.asarray(tokens)[~mask] == 0)
  t, m = np.asarray(tokens, np.float64), mask.astype(np.float64)[..., None]
  np.testing.assert_allclose(pooled, (t * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)


def test_padding_ids_and_length_change_nothing(encoder):
  ids, mask = tt.byte_tokenize(["a dark pullover"], 20)
  tokens, pooled = encoder(ids, mask)
  garbage = np.where(mask, ids, 77)  # other ids at the padding positions
  tokens2, pooled2 = encoder(garbage, mask)
  np.testing.assert_array_equal(pooled, pooled2)
  np.testing.assert_array_equal(tokens, tokens2)
  short_ids, short_mask = tt.byte_tokenize(["a dark pullover"], 18)  # less padding
  tokens3, pooled3 = encoder(short_ids, short_mask)
  np.testing.assert_allclose(pooled3, pooled, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(tokens3, np.asarray(tokens)[:, :18], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="positions stop at 20"):
    encoder(*tt.byte_tokenize(["a"], 21))


def test_text_conditioned_model_feeds_the_denoiser_and_keeps_labels(encoder, image_dir, tmp_path):
  seen = []

  def denoiser(x, t, y, *, key=None):
    seen.append(y)
    return x

  model = tt.TextConditioned(denoiser, encoder)
  ids, mask = tt.byte_tokenize(["class0", "class1"], 20)
  x, t, labels = np.zeros((2, 8, 8, 1), np.float32), np.array([3, 7]), np.array([0, 1], np.int32)
  model(x, t, {"ids": ids, "mask": mask, "label": labels})
  tokens, pooled = encoder(ids, mask)
  assert sorted(seen[0]) == ["label", "mask", "pooled", "tokens"]
  np.testing.assert_array_equal(seen[0]["tokens"], tokens)
  np.testing.assert_array_equal(seen[0]["pooled"], pooled)
  np.testing.assert_array_equal(seen[0]["mask"], mask)
  np.testing.assert_array_equal(seen[0]["label"], labels)
  model(x, t, labels)  # no text: untouched
  assert seen[1] is labels
  with pytest.raises(ValueError, match="'ids' but no 'mask'"):
    model(x, t, {"ids": ids})
  config = prompts.resolve(transformer_config(image_dir, tmp_path))
  built = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  assert isinstance(built, tt.TextConditioned) and built.encoder.max_length == 24


def test_transformer_step_trains_the_encoder_and_compiles_once(image_dir, tmp_path):
  # No warmup. The zero-initialised layers between the loss and the text (the DiT's output
  # layer, its adaLN gates, the cross-attention's output) move first, so the text encoder
  # gets a gradient from step 3 on.
  config = transformer_config(
    image_dir, tmp_path, training__warmup_steps=0, model__name="dit", model__patch_size=4
  )
  config.model.update(hidden_size=16, depth=1)
  config = prompts.resolve(config)
  assert config.text.width == 16
  graphdef, _, optimizer, diffusion = training.build(config)
  mesh = parallel.make_mesh(1)
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  step_fn = chex.assert_max_traces(
    training.make_train_step(config, graphdef, optimizer, diffusion), n=1
  )
  step = training.jit_train_step(step_fn, mesh, shardings)
  rng = np.random.default_rng(0)
  ids, mask = tt.byte_tokenize(["a dark coat", "", "a small bag", "an ankle boot"] * 2, 24)
  batch = {
    "image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
    "label": np.zeros(8, np.int32),
    "ids": ids,
    "mask": mask,
  }
  before = jax.tree.map(np.array, jax.device_get(state.params))  # copies: the step donates
  for i in range(4):
    changed = {**batch, "ids": np.roll(batch["ids"], i, axis=0), "mask": np.roll(mask, i, axis=0)}
    state, metrics = step(state, parallel.global_batch(mesh, changed), jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
  chex.clear_trace_counter()
  after = jax.device_get(state.params)
  moved = {
    jax.tree_util.keystr(p): not np.array_equal(a, b)
    for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True
    )
  }
  encoder_moved = [v for k, v in moved.items() if "'encoder'" in k]
  assert encoder_moved and all(encoder_moved)  # every encoder weight got a gradient


def test_transformer_settings_are_checked(image_dir, tmp_path):
  def problems(**overrides):
    config = transformer_config(image_dir, tmp_path, **overrides)
    return training.validation.problems(config, 8)

  assert problems() == []
  config = transformer_config(image_dir, tmp_path)
  config.text.transformer.num_heads = 3
  assert any(
    "text.transformer.width=16: must be divisible by text.transformer.num_heads=3" in p
    for p in training.validation.problems(config, 8)
  )
  config.text.transformer.depth = 0
  assert any(
    "text.transformer.depth=0: must be an int >= 1" in p
    for p in training.validation.problems(config, 8)
  )


@pytest.mark.slow  # a whole run and a CLI process
def test_transformer_run_trains_and_samples_any_prompt(captioned_dir, tmp_path):
  workdir = tmp_path / "run"
  cache = tmp_path / "cache"
  training.train(transformer_config(captioned_dir, cache, training__num_steps=2), workdir)
  run = load_run(workdir)
  assert isinstance(nnx.merge(run.graphdef, run.params), tt.TextConditioned)
  kw = dict(sampler="ddim", steps=3, guidance_scale=3.0)
  out = run.sample(
    2, prompt=["a dark coat", "ein Mantel, noch nie gesehen"], negative_prompt="bag", **kw
  )
  assert out.shape == (4, 8, 8, 1)
  assert not list(cache.glob("*.npz"))  # byte ids are not worth caching
  result = jaxdiff_cli(
    "sample", f"--workdir={workdir}", f"--out={tmp_path / 'o'}", "--num_samples=2",
    "--prompt=a small bag", "--prompt=A Dark Coat!", "--steps=2",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  with np.load(tmp_path / "o" / "samples.npz") as z:
    assert z["images"].shape == (4, 8, 8, 1)
    assert list(z["prompts"]) == ["a small bag"] * 2 + ["A Dark Coat!"] * 2


# ----------------------------------------------------------------------------- embeddings file


def _table(k=3, length=4, width=5, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(length)[None] < rng.integers(1, length + 1, (k, 1))
  return rng.normal(size=(k, length, width)).astype(np.float32), mask


def test_embedding_file_round_trip_and_lookup(tmp_path):
  tokens, mask = _table()
  path = text_files.save_embeddings(tmp_path / "e.npz", ["", "a coat", "a bag"], tokens, mask)
  table = text_files.EmbeddingFile.load(path)
  assert (table.max_length, table.width) == (4, 5)
  out = table.encode(["a bag", "", "a bag"])
  want = np.where(mask[..., None], tokens, 0)[[2, 0, 2]]
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["mask"], mask[[2, 0, 2]])
  m = mask[[2, 0, 2]].astype(np.float64)[..., None]  # no pooled stored: the mean of real tokens
  np.testing.assert_allclose(out["pooled"], (want * m).sum(1) / m.sum(1), rtol=1e-6)
  pooled = np.ones((3, 5), np.float32)
  again = text_files.EmbeddingFile.load(
    text_files.save_embeddings(tmp_path / "p.npz", ["", "a coat", "a bag"], tokens, mask, pooled)
  )
  np.testing.assert_array_equal(again.encode(["a coat"])["pooled"], pooled[:1])
  with pytest.raises(ValueError, match=r"1 text\(s\) not in .*\['a hat'\]"):
    table.encode(["a coat", "a hat"])


def test_bad_embedding_files_are_named_and_never_written(tmp_path):
  tokens, mask = _table()
  bad = [
    (dict(captions=["x", "a", "b"]), "no entry for the empty prompt"),
    (dict(captions=["", "a", "a"]), "captions must be distinct"),
    (dict(tokens=tokens[:, :, :, None]), r"tokens must be float \[K=3, L, D\]"),
    (dict(mask=mask[:, :3]), r"mask must be bool \[3, 4\]"),
    (dict(mask=np.zeros_like(mask)), "have no real token"),
    (dict(pooled=np.ones((3, 2), np.float32)), r"pooled must be float \[3, 5\]"),
  ]
  for change, message in bad:
    args = {"captions": ["", "a", "b"], "tokens": tokens, "mask": mask, **change}
    with pytest.raises(ValueError, match=message):
      text_files.save_embeddings(tmp_path / "bad.npz", **args)
    assert not list(tmp_path.iterdir())
  with pytest.raises(FileNotFoundError, match="no such file"):
    text_files.EmbeddingFile.load(tmp_path / "none.npz")
  np.savez(tmp_path / "partial.npz", captions=np.array(["", "a"]), tokens=tokens[:2])
  with pytest.raises(ValueError, match=r"lacks \['mask'\]"):
    text_files.EmbeddingFile.load(tmp_path / "partial.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a readable .npz"):
    text_files.EmbeddingFile.load(tmp_path / "junk.npz")


def test_file_encoder_gives_the_table_the_encoder_it_came_from_gives(
  captioned_dir, encoder_dir, tmp_path
):
  """Embeddings written from the tiny BERT and read back by a "file" run: the same caption
  rows, so the same batches, as the run that runs that BERT itself."""
  bert_config = prompts.resolve(text_config(captioned_dir, encoder_dir, tmp_path / "cache"))
  bert_table = prompts.caption_table(bert_config)
  captions = [*bert_table.captions, "a prompt for sampling"]
  out = prompts.encoder(bert_config).encode(captions)
  path = text_files.save_embeddings(
    tmp_path / "e.npz", captions, out["tokens"], out["mask"], out["pooled"]
  )
  config = text_config(captioned_dir, encoder_dir, tmp_path / "cache")
  config.text.encoder, config.text.encoder_path = "file", str(path)
  assert training.validation.problems(config, 8) == []
  config = prompts.resolve(config)
  assert config.text.width == bert_config.text.width
  table = prompts.caption_table(config)
  assert table.captions == bert_table.captions
  np.testing.assert_array_equal(table.index, bert_table.index)
  for k in prompts.TEXT_KEYS:
    np.testing.assert_allclose(table.arrays[k], bert_table.arrays[k], atol=1e-6)
  cond, uncond = prompts.conditioning(config, ["a prompt for sampling"], per_prompt=2)
  np.testing.assert_allclose(cond["pooled"], out["pooled"][[-1, -1]], atol=1e-6)
  np.testing.assert_allclose(uncond["tokens"], out["tokens"][[0, 0]], atol=1e-6)
  with pytest.raises(ValueError, match=r"not in .*\['never encoded'\]"):
    prompts.conditioning(config, ["never encoded"])
  config.text.max_length = 5
  config.text.width = None
  lines = training.validation.problems(config, 8)
  assert any("text.max_length=5: the embeddings in" in p and "have 8 tokens" in p for p in lines)
  config.text.encoder_path = ""
  lines = training.validation.problems(config, 8)
  assert any("text.encoder_path is empty" in p for p in lines)


def test_a_frozen_encoders_files_are_pinned_by_digest(captioned_dir, encoder_dir, tmp_path):
  """text.digest: the SHA-256 of the frozen encoder's files when the run starts. Reading the run
  later (the encoder, its caption table, validation) refuses other files at that path, and a
  resume refuses a changed digest; a run from before the digest was recorded is not checked."""
  config = text_config(captioned_dir, encoder_dir, tmp_path / "cache")
  out = prompts.encoder(prompts.resolve(config)).encode(["", "a dark coat"])
  path = text_files.save_embeddings(tmp_path / "e.npz", ["", "a dark coat"], out["tokens"],
                                    out["mask"])  # fmt: skip
  config.text.encoder, config.text.encoder_path = "file", str(path)
  resolved = prompts.resolve(config)
  assert resolved.text.digest == hashlib.sha256(path.read_bytes()).hexdigest()
  assert prompts.resolve(resolved).text.digest == resolved.text.digest  # resolving twice is fine
  minilm = prompts.resolve(text_config(captioned_dir, encoder_dir, tmp_path / "cache"))
  assert len(minilm.text.digest) == 64 and minilm.text.digest != resolved.text.digest
  assert prompts.resolve(transformer_config(captioned_dir, tmp_path)).text.digest is None

  # The file is rewritten with other encodings (a new process reads it afresh).
  text_files.save_embeddings(path, ["", "a dark coat"], out["tokens"] + 1, out["mask"])
  prompts._load_file.cache_clear()
  message = (
    rf"text.encoder_path='{path}': the file encoder's files there are not the ones this run was"
    rf" trained with \(their digest is [0-9a-f]{{12}}, the run's text.digest"
    rf" {resolved.text.digest[:12]}\)"
  )
  with pytest.raises(ValueError, match=message):
    prompts.encoder(resolved)
  with pytest.raises(ValueError, match=message):
    prompts.caption_table(resolved)
  with pytest.raises(ValueError, match=message):
    prompts.resolve(resolved)
  lines = training.validation.problems(resolved, 8)
  assert [line for line in lines if "text.encoder_path" in line] == [
    next(line for line in lines if "not the ones this run was trained with" in line)
  ]
  older = copy.deepcopy(resolved)
  older.text.digest = None  # config.json of a run from before text.digest
  prompts.encoder(older)  # not checked

  stored = training.resume.as_json(resolved)
  with pytest.raises(training.ResumeRefusedError, match=r"text\.digest: '[0-9a-f]{64}' -> '"):
    training.resume.check(stored, prompts.resolve(config), "w")
  del stored["text"]["digest"]
  assert "text.digest" in training.resume.check(stored, prompts.resolve(config), "w")


# ----------------------------------------------------------------------------- tfds text feature


def test_text_values_decode_and_feature_is_checked(image_dir, tmp_path):
  assert sources.as_text(b"caf\xc3\xa9") == "café"
  assert sources.as_text(np.array(b"a coat", dtype=object)) == "a coat"
  assert sources.as_text("a bag") == "a bag"
  config = transformer_config(image_dir, tmp_path)
  config.text.feature = "caption"
  lines = training.validation.problems(config, 8)
  assert any("text.feature='caption': names a tfds text feature" in p for p in lines)
  config = transformer_config(image_dir, tmp_path)
  config.data.name = "cifar10"
  lines = training.validation.problems(config, 8)
  assert any("data.name='cifar10': no captions" in p and "text.feature" in p for p in lines)


@pytest.mark.slow  # TensorFlow writes the tfds dataset (jaxdiff[prepare])
def test_captions_come_from_a_tfds_text_feature(tmp_path):
  pytest.importorskip("tensorflow")
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(0)
  captions = [f"item {i}: a {'dark' if i % 2 else 'light'} coat" for i in range(6)]
  images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)

  class CaptionedToy(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1)),
          "caption": tfds.features.Text(),
          "label": tfds.features.ClassLabel(num_classes=2),
        }
      )
      return self.dataset_info_from_configs(features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"image": images[i], "caption": captions[i], "label": i % 2}

  data_dir = tmp_path / "tfds"
  builder = CaptionedToy(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  config = transformer_config(tmp_path, tmp_path / "cache")
  config.data.update(name="captioned_toy", data_dir=str(data_dir), image_folder="")
  config.text.feature = "caption"
  got = prompts.split_captions(config)
  source = data.make_source(config.data, split="train")
  labels = [source[i]["label"] for i in range(len(source))]
  order = [captions.index(c) for c in got]  # the source's order, whatever tfds shuffled to
  assert sorted(got) == sorted(captions)
  assert labels == [i % 2 for i in order]
  config.text.feature = "title"
  with pytest.raises(ValueError, match=r"text.feature='title': .* text features are \['caption'\]"):
    prompts.split_captions(config)
