"""Text conditioning end to end: caption tables, the pipeline's caption rows and dropout, the
text train step, guidance with a negative prompt, sampling from prompts (API and CLI).

The encoder is a SMALL random BERT in the Hugging Face layout (tests/test_text_encoder.py's), so
nothing here needs the MiniLM package; one tiny text run is shared by the tests that read a run.
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff import data, parallel, prompts, training
from jaxdiff import sampling as S
from jaxdiff.run import load_run
from tests.conftest import jaxdiff_cli, tiny_config
from tests.test_sampling import _diffusion
from tests.test_text_encoder import SMALL, write_tiny_bert

CAPTIONS = ["a dark coat", "a small bag", "an ankle boot", "a blue shirt"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_bert")
  write_tiny_bert(folder)
  return folder


@pytest.fixture(scope="module")
def captioned_dir(tmp_path_factory):
  """16 random 8x8 grey PNGs in two class folders, with a captions.jsonl (4 distinct)."""
  root = tmp_path_factory.mktemp("captioned")
  rng = np.random.default_rng(1)
  lines = []
  for i in range(16):
    name = f"class{i % 2}/{i:03d}.png"
    (root / name).parent.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / name)
    lines.append(json.dumps({"file": name, "caption": CAPTIONS[i % 4]}))
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return root


def text_config(image_dir, encoder_dir, cache_dir, **overrides):
  config = tiny_config(image_dir, **overrides)
  config.text.encoder = "minilm"
  config.text.encoder_path = str(encoder_dir)
  config.text.max_length = 8
  config.text.cache_dir = str(cache_dir)
  config.text.caption_dropout = 0.25
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


@pytest.fixture(scope="module")
def text_run(captioned_dir, encoder_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("text_run")
  cache = tmp_path_factory.mktemp("text_cache")
  training.train(text_config(captioned_dir, encoder_dir, cache, training__num_steps=2), workdir)
  return workdir


# ----------------------------------------------------------------------------- guidance


def test_guidance_with_a_negative_prompt_is_its_formula_in_one_call():
  calls = []

  def model(x, t, y):
    calls.append(x.shape[0])
    shift = y["pooled"].sum(-1) + 0.5 * (y["tokens"] * y["mask"][..., None]).sum((1, 2))
    return jnp.sin(x) + shift.reshape(-1, 1, 1, 1) + 1e-3 * t.reshape(-1, 1, 1, 1)

  rng = np.random.default_rng(0)

  def encoding(b):
    mask = rng.random((b, 5)) < 0.7
    tokens = rng.normal(size=(b, 5, 3)).astype(np.float32) * mask[..., None]
    return {"tokens": tokens, "mask": mask, "pooled": rng.normal(size=(b, 3)).astype(np.float32)}

  x, t = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32), jnp.array([4, 5, 6])
  cond, negative = encoding(3), encoding(3)
  got = S.guided_model_output(model, x, t, cond, guidance_scale=4.0, uncond=negative)
  assert calls == [6]  # the prompt and the negative prompt: ONE call on the doubled batch
  c, u = (np.asarray(model(x, t, y), np.float64) for y in (cond, negative))
  np.testing.assert_allclose(got, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"guidance_scale=4.0 needs .* null_label not given"):
    S.guided_model_output(model, x, t, cond, guidance_scale=4.0)


def test_chunked_sampling_keeps_each_rows_conditioning():
  """Rows of a mapping are chunked and padded like labels: chunk c is ``sample`` of its rows."""

  def model(x, t, y):
    return jnp.sin(x) + y["pooled"][:, :1, None, None] * y["mask"][:, :1, None, None]

  rng = np.random.default_rng(0)
  y = {
    "tokens": rng.normal(size=(5, 3, 2)).astype(np.float32),
    "mask": rng.random((5, 3)) < 0.8,
    "pooled": rng.normal(size=(5, 2)).astype(np.float32),
  }
  kw = dict(sampler="ddim", num_steps=3, clip_denoised=False)
  key = jax.random.key(0)
  out = S.sample_in_chunks(_diffusion(), model, key, 5, (2, 2, 1), labels=y, batch_size=2, **kw)
  for c, rows in enumerate([[0, 1], [2, 3], [4, 4]]):
    chunk = {k: v[rows] for k, v in y.items()}
    want = S.sample(_diffusion(), model, jax.random.fold_in(key, c), (2, 2, 2, 1), labels=chunk,
                    **kw)  # fmt: skip
    n = 1 if c == 2 else 2
    np.testing.assert_allclose(out[2 * c : 2 * c + n], np.asarray(want)[:n], atol=1e-6)
  with pytest.raises(ValueError, match=r"labels\['pooled'\] has shape \(4, 2\), expected \(5"):
    S.sample_in_chunks(_diffusion(), model, key, 5, (2, 2, 1), batch_size=2,
                       labels={**y, "pooled": y["pooled"][:4]}, **kw)  # fmt: skip


# ----------------------------------------------------------------------------- captions, data


def test_caption_table_encodes_each_distinct_caption_once_and_caches(
  captioned_dir, encoder_dir, tmp_path
):
  config = prompts.resolve(text_config(captioned_dir, encoder_dir, tmp_path))
  assert config.text.width == SMALL["hidden_size"]
  table = prompts.caption_table(config)
  assert table.captions == ["", *sorted(CAPTIONS)]
  source = data.make_source(config.data, split="train")
  by_file = {f"class{i % 2}/{i:03d}.png": CAPTIONS[i % 4] for i in range(16)}
  want = [by_file[str(p.relative_to(captioned_dir))] for p in source.paths]
  assert [table.captions[i] for i in table.index] == want
  enc = prompts.encoder(config)
  direct = enc.encode(table.captions)
  for k in prompts.TEXT_KEYS:
    np.testing.assert_allclose(table.rows(np.arange(5))[k], direct[k], atol=1e-6)
  cached = list(tmp_path.glob("*.npz"))
  assert len(cached) == 1
  before = enc.num_encoded
  again = prompts.caption_table(config)  # read back, nothing encoded
  assert enc.num_encoded == before
  np.testing.assert_array_equal(again.arrays["tokens"], table.arrays["tokens"])
  # Another caption set is another file, never the stale one.
  (captioned_dir / "captions.jsonl").write_text(
    (captioned_dir / "captions.jsonl").read_text().replace("a small bag", "a tiny bag")
  )
  try:
    other = prompts.caption_table(config)
  finally:
    (captioned_dir / "captions.jsonl").write_text(
      (captioned_dir / "captions.jsonl").read_text().replace("a tiny bag", "a small bag")
    )
  assert "a tiny bag" in other.captions and len(list(tmp_path.glob("*.npz"))) == 2


def test_pipeline_attaches_caption_rows_and_drops_them_reproducibly():
  source = data.ArraySource(np.zeros((64, 2, 2, 1), np.uint8), np.arange(64) % 2)
  k, length, width = 5, 3, 2
  arrays = {
    "tokens": np.arange(k * length * width, dtype=np.float32).reshape(k, length, width),
    "mask": np.ones((k, length), bool),
    "pooled": np.arange(k * width, dtype=np.float32).reshape(k, width),
  }
  table = prompts.CaptionTable(
    ["", "a", "b", "c", "d"], arrays, (np.arange(64) % 4 + 1).astype(np.int32)
  )

  def batches(dropout, n=8):
    ds = data.make_dataset(source, seed=3, batch_size=16, text=table, caption_dropout=dropout)
    it = iter(ds)
    return [next(it) for _ in range(n)]

  kept = batches(0.0)
  for b in kept:
    rows = b["pooled"][:, 0].astype(int) // width
    assert np.all(rows >= 1)
    np.testing.assert_array_equal(b["tokens"], arrays["tokens"][rows])
  dropped = batches(0.5)
  rows = np.concatenate([b["pooled"][:, 0].astype(int) // width for b in dropped])
  assert 0.3 < np.mean(rows == 0) < 0.7  # 128 draws at rate 1/2
  again = np.concatenate([b["pooled"][:, 0].astype(int) // width for b in batches(0.5)])
  np.testing.assert_array_equal(rows, again)
  # The images are those of the run without text: dropout has a stream of its own.
  for a, b in zip(kept, dropped, strict=True):
    np.testing.assert_array_equal(a["label"], b["label"])


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # two meshes' compiles / a CLI process
def test_text_step_traces_once_and_is_the_same_on_1_and_8_devices(
  captioned_dir, encoder_dir, tmp_path
):
  config = prompts.resolve(text_config(captioned_dir, encoder_dir, tmp_path))
  graphdef, _, optimizer, diffusion = training.build(config)
  rng = np.random.default_rng(0)
  mask = np.arange(8)[None, :] < rng.integers(2, 9, (8, 1))
  w = config.text.width
  batch = {
    "image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
    "label": np.zeros(8, np.int32),
    "tokens": (rng.normal(size=(8, 8, w)) * mask[..., None]).astype(np.float32),
    "mask": mask,
    "pooled": rng.normal(size=(8, w)).astype(np.float32),
  }
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
    state = training.create_state(config, optimizer, jax.random.key(0), shardings)
    step_fn = chex.assert_max_traces(
      training.make_train_step(config, graphdef, optimizer, diffusion), n=1
    )
    step = training.jit_train_step(step_fn, mesh, shardings)
    losses = []
    for i in range(2):
      changed = {**batch, "pooled": batch["pooled"] + i}  # new text, same shapes: no retrace
      state, m = step(state, parallel.global_batch(mesh, changed), jax.random.key(1))
      losses.append(float(m["loss"]))
    chex.clear_trace_counter()
    results.append((losses, jax.device_get(state.params)))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  chex.assert_trees_all_close(p1, p8, rtol=1e-4, atol=1e-6)
  assert any(
    "cross_attn" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(p1)
  )


def test_text_run_checks(captioned_dir, encoder_dir, image_dir, tmp_path):
  def problems(directory=captioned_dir, **overrides):
    config = text_config(directory, encoder_dir, tmp_path, **overrides)
    return training.validation.problems(config, 8)

  assert problems() == []
  assert any("text.encoder='t5'" in p for p in problems(text__encoder="t5"))
  assert any("text.caption_dropout=1.0" in p for p in problems(text__caption_dropout=1.0))
  assert any("text.max_length=1" in p for p in problems(text__max_length=1))
  assert any("model.attn_resolutions=()" in p for p in problems(model__attn_resolutions=()))
  assert any("eval.every=2" in p for p in problems(eval__every=2))
  missing = problems(text__encoder_path=str(tmp_path / "none"))
  assert any("lacks model.safetensors and tokenizer.json" in p for p in missing)
  assert problems(model__name="dit", model__patch_size=2) == []


# ----------------------------------------------------------------------------- sampling


def test_run_samples_one_group_per_prompt(text_run):
  run = load_run(text_run)
  assert run.config.text.width == SMALL["hidden_size"]
  kw = dict(sampler="ddim", steps=3, guidance_scale=3.0)
  two = run.sample(3, prompt=["a dark coat", "an ankle boot"], negative_prompt="a bag", **kw)
  assert two.shape == (6, 8, 8, 1) and two.dtype == np.uint8
  first = run.sample(3, prompt="a dark coat", negative_prompt="a bag", **kw)
  assert first.shape == (3, 8, 8, 1)
  plain = run.sample(3, **kw)  # no prompt: the empty prompt
  assert plain.shape == (3, 8, 8, 1)
  with pytest.raises(ValueError, match=r"prompt=\[\]: must be a string or a non-empty list"):
    run.sample(3, prompt=[])


@pytest.mark.slow  # two meshes' compiles / a CLI process
def test_sample_cli_writes_prompts_and_refuses_them_without_text(text_run, tiny_run, tmp_path):
  out = jaxdiff_cli(
    "sample", f"--workdir={text_run}", f"--out={tmp_path / 'o'}", "--num_samples=2",
    "--prompt=a dark coat", "--prompt=a small bag", "--negative_prompt=a boot",
    "--guidance_scale=2", "--steps=2",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  with np.load(tmp_path / "o" / "samples.npz") as z:
    assert z["images"].shape == (4, 8, 8, 1)
    assert list(z["prompts"]) == ["a dark coat"] * 2 + ["a small bag"] * 2
  bad = jaxdiff_cli("sample", f"--workdir={tiny_run}", f"--out={tmp_path / 'p'}", "--prompt=a coat")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "--prompt: " in bad.stderr and "not a text-conditioned run" in bad.stderr
  assert not (tmp_path / "p").exists()


@pytest.mark.slow  # a CLI process
def test_fd_of_a_text_run_samples_from_the_training_captions(text_run, classifier_path, tmp_path):
  out = jaxdiff_cli(
    "evaluate", f"--workdir={text_run}", "--metric=fd", "--num_samples=8", "--sampler=ddim",
    "--steps=2", f"--features_path={classifier_path}", f"--cache_dir={tmp_path}", "--out=",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["metric"] == "fd" and record["num_samples"] == 8 and np.isfinite(record["fd"])
