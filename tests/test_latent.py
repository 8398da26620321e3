"""Latent diffusion: the autoencoder, its scale, the latent cache, and diffusion on latents.

One tiny autoencoder run (8x8 grey images, f = 2, 4x4x2 latents, a PatchGAN from step 2) and one
latent U-Net run on it are shared by the tests; shapes are checked abstractly (no compiling).
"""

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdiff
from jaxdiff import latent, models, parallel, training
from jaxdiff.config import sample_shape
from jaxdiff.io.images import from_uint8
from jaxdiff.models import autoencoder as ae_lib
from jaxdiff.training import autoencoder as ae_train
from tests.conftest import jaxdiff_cli, tiny_config


def ae_config(image_dir, **overrides):
  config = tiny_config(image_dir, **overrides)
  config.model.name = "autoencoder"
  config.model.ch = 8
  config.model.ch_mult = (1, 2)  # f = 2: 8x8 -> 4x4
  config.model.attn_resolutions = ()
  config.model.num_groups = 4
  config.autoencoder.latent_channels = 2
  config.autoencoder.disc_weight = 0.5
  config.autoencoder.disc_start = 2
  config.autoencoder.disc_ch = 8
  config.autoencoder.disc_layers = 1
  config.autoencoder.scale_examples = 16
  config.training.ema_decay = 0.5
  config.training.sample_every = 2
  config.sampling.num_samples = 8
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


def latent_config(image_dir, ae_dir, **overrides):
  config = tiny_config(image_dir)
  config.latent.autoencoder_workdir = str(ae_dir)
  config.model.ch = 16
  config.model.attn_resolutions = (2,)  # 4x4 latents: 4 -> 2
  config.sampling.clip_denoised = False
  config.eval.clip_denoised = False
  for dotted, value in overrides.items():
    section, key = dotted.split("__")
    config[section][key] = value
  return config


@pytest.fixture(scope="module")
def ae_run(image_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae_run")
  training.train(ae_config(image_dir), workdir)
  return workdir


@pytest.fixture(scope="module")
def latent_run(image_dir, ae_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("latent_run")
  training.train(latent_config(image_dir, ae_run), workdir)
  return workdir


# ----------------------------------------------------------------------------- the autoencoder


@pytest.mark.parametrize("ch_mult,size,padded", [((1, 2), 28, 28), ((1, 2, 2), 28, 32),
                                                 ((1, 1, 2, 2), 28, 32), ((1,), 5, 5)])  # fmt: skip
@pytest.mark.parametrize("latent_channels", [1, 4])
def test_encoder_and_decoder_shapes_for_each_factor(ch_mult, size, padded, latent_channels):
  f = 2 ** (len(ch_mult) - 1)
  model = nnx.eval_shape(
    lambda: ae_lib.Autoencoder(
      in_channels=3,
      latent_channels=latent_channels,
      image_size=size,
      padded_size=padded,
      ch=8,
      ch_mult=ch_mult,
      num_res_blocks=1,
      num_groups=4,
      rngs=nnx.Rngs(0),
    )  # fmt: skip
  )
  graphdef, params = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  recon, mean, logvar = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
  side = padded // f
  assert model.latent_shape == (side, side, latent_channels)
  chex.assert_shape([mean, logvar], (2, side, side, latent_channels))
  chex.assert_shape(recon, (2, size, size, 3))


def test_padding_is_edge_replication_and_crop_undoes_it():
  x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  padded = ae_lib.pad_to(x, 8)  # 3 extra rows: 1 above, 2 below
  assert padded.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(padded[:, 0], padded[:, 1])
  np.testing.assert_array_equal(padded[:, 6], padded[:, 5])
  np.testing.assert_array_equal(ae_lib.crop_to(padded, 5), x)


def test_kl_term_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 4, 2))
  logvar = rng.normal(size=(3, 4, 4, 2)) * 2
  # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2, per dimension.
  s2 = np.exp(logvar)
  expected = np.sum(-0.5 * logvar + 0.5 * (s2 + mean**2) - 0.5, axis=(1, 2, 3))
  got = ae_lib.posterior_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(ae_lib.posterior_kl(jnp.zeros((1, 2)), jnp.zeros((1, 2))), [0.0])


def test_posterior_draws_have_the_posterior_moments():
  mean = jnp.full((20000, 1), 0.5)
  logvar = jnp.full((20000, 1), np.log(0.25))
  z = np.asarray(ae_lib.posterior_sample(mean, logvar, jax.random.key(0)))
  assert abs(z.mean() - 0.5) < 4 * 0.5 / np.sqrt(20000)
  assert abs(z.std() - 0.5) < 0.01


def test_loss_terms_perceptual_and_adversarial(image_dir):
  """Every term against a NumPy recomputation from the same forward pass, and the gradients:
  the discriminator learns only from its own loss, the autoencoder never from it."""
  config = ae_config(image_dir, autoencoder__perceptual_weight=0.3)
  model = models.build_model(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  w = jax.random.normal(jax.random.key(1), (64, 5))
  net = jaxdiff.evaluation.FeatureNet(
    "fake", lambda x: {"features": x.reshape(len(x), -1) @ w, "logits": x[:, 0, 0]}, 5, 1
  )
  loss_fn = ae_train.make_loss_fn(config, graphdef, net)
  x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1, maxval=1)
  key = jax.random.key(3)
  loss, terms = loss_fn(params, x, jnp.ones(4), key)
  recon, mean, logvar = nnx.merge(graphdef, params)(x, key=key)
  x64, r64 = np.asarray(x, np.float64), np.asarray(recon, np.float64)
  l1 = np.abs(x64 - r64).mean(axis=(1, 2, 3))
  rec = l1 + config.autoencoder.l2_weight * np.square(x64 - r64).mean(axis=(1, 2, 3))
  fr, ff = (
    np.asarray(f, np.float64).reshape(4, -1) @ np.asarray(w, np.float64) for f in (x, recon)
  )
  fr, ff = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (fr, ff))
  perceptual = np.square(fr - ff).sum(axis=1)
  d_real = np.asarray(model.discriminator(x), np.float64)
  d_fake = np.asarray(model.discriminator(recon), np.float64)
  g = -d_fake.mean(axis=(1, 2, 3))
  d = 0.5 * (
    np.maximum(1 - d_real, 0).mean(axis=(1, 2, 3)) + np.maximum(1 + d_fake, 0).mean(axis=(1, 2, 3))
  )
  kl = np.asarray(ae_lib.posterior_kl(mean, logvar), np.float64)
  ae = config.autoencoder
  total = rec + ae.perceptual_weight * perceptual + ae.kl_weight * kl / 64 + ae.disc_weight * g + d
  for name, ref in [("rec", rec), ("perceptual", perceptual), ("g_loss", g), ("d_loss", d)]:
    np.testing.assert_allclose(terms[name], ref, rtol=1e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(loss, total.mean(), rtol=1e-4)
  # Before disc_start the adversarial terms do not count.
  off, _ = loss_fn(params, x, jnp.zeros(4), key)
  np.testing.assert_allclose(off, (total - ae.disc_weight * g - d).mean(), rtol=1e-4)

  # Gradients: d alone reaches the discriminator; g reaches the decoder.
  @jax.jit  # one compile for the three gradients (eager, they cost ~20 s)
  def gradients(p):
    grads = jax.grad(lambda p: loss_fn(p, x, jnp.ones(4), key)[0])(p)
    only_d = jax.grad(lambda p: jnp.mean(loss_fn(p, x, jnp.ones(4), key)[1]["d_loss"]))(p)
    no_adv = jax.grad(lambda p: loss_fn(p, x, jnp.zeros(4), key)[0])(p)
    return grads, only_d, no_adv

  grads, only_d, no_adv = gradients(params)
  chex.assert_trees_all_close(grads["discriminator"], only_d["discriminator"], rtol=1e-4, atol=1e-7)
  assert not np.allclose(grads["dec_out"]["kernel"], no_adv["dec_out"]["kernel"])
  only_d_enc = jax.tree.leaves(only_d["enc_in"])
  assert all(np.all(np.asarray(g_) == 0) for g_ in only_d_enc)


@pytest.mark.slow
def test_autoencoder_step_is_the_same_on_1_and_8_devices(image_dir):
  config = ae_config(image_dir, autoencoder__disc_start=0)
  graphdef, _, optimizer, diffusion = training.build(config)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
    "label": np.zeros(8, np.int32),
  }
  results = []
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
    state = training.create_state(config, optimizer, jax.random.key(0), shardings)
    step = training.jit_train_step(
      training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
    )
    metrics = []
    for _ in range(2):
      state, m = step(state, parallel.global_batch(mesh, batch), jax.random.key(1))
      metrics.append(jax.device_get(m))
    results.append((metrics, jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  for a, b in zip(m1, m8, strict=True):
    for k in ("loss", "rec", "kl", "g_loss", "d_loss", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  assert m1[0]["disc_on"] == 1.0
  chex.assert_trees_all_close(p1, p8, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the scale


def test_scale_factor_is_one_over_the_std_of_the_latents():
  images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
  stats = latent.measure_scale(lambda x: 3.0 * x + 1.0, images, batch_size=4)
  z = 3.0 * (images.astype(np.float64) / 127.5 - 1) + 1.0
  assert stats["num_examples"] == 10
  np.testing.assert_allclose(stats["std"], z.std(), rtol=1e-6)
  np.testing.assert_allclose(stats["scale_factor"], 1 / z.std(), rtol=1e-6)


def test_each_autoencoder_checkpoint_stores_its_scale(ae_run):
  run = jaxdiff.load_run(ae_run)
  images = jaxdiff.data.read_examples(run.config.data, "train", 16)
  coder = ae_lib.Coder(run.graphdef)
  stats = latent.measure_scale(lambda x: coder.encode(run.params, x), images)
  np.testing.assert_allclose(run.scale_factor, stats["scale_factor"], rtol=1e-5)
  z = np.asarray(run.encode(from_uint8(images)))
  np.testing.assert_allclose(z.std(), 1.0, rtol=1e-4)  # scaled latents have unit std
  with pytest.raises(ValueError, match="an autoencoder run: it encodes and decodes"):
    run.sample(2)


# ----------------------------------------------------------------------------- the cache


def test_the_cache_holds_the_scaled_posterior_means_in_order(ae_run, latent_run):
  config = jaxdiff.run.read_config(latent_run)
  base = latent.cache_path(config, "train")
  cached = np.load(f"{base}.npy")
  info = json.loads(Path(f"{base}.json").read_text())
  ae = jaxdiff.load_run(ae_run)
  images = jaxdiff.data.read_examples(config.data, "train")
  expected = np.asarray(ae.encode(from_uint8(images)))
  assert cached.shape == (48, 4, 4, 2) == tuple(info["shape"])
  np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)
  assert info["digest"] == config.latent.digest and info["mode"] == "mean"
  labels = np.load(f"{base}.labels.npy")
  assert sorted(set(labels.tolist())) == [0, 1]


@pytest.mark.slow
def test_a_seeded_posterior_draw_is_the_same_on_any_device_count(ae_run, image_dir, tmp_path):
  config = latent.resolve(latent_config(image_dir, ae_run, latent__sample=True))
  ae = jaxdiff.load_run(ae_run)
  encode = latent.encoder(ae.graphdef, ae.params, config.latent.scale_factor)
  out = []
  for n in (1, 8):
    with config.unlocked():
      config.latent.cache_dir = str(tmp_path / f"d{n}")
      config.latent.encode_batch_size = 5  # rounded up to the devices: other batch splits
    out.append(np.asarray(latent.latent_source(config, encode, parallel.make_mesh(n)).images))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-6)
  mean = np.asarray(ae.encode(from_uint8(jaxdiff.data.read_examples(config.data, "train"))))
  assert not np.allclose(out[0], mean, atol=1e-3)  # a draw, not the mean


@pytest.mark.slow
def test_a_changed_autoencoder_never_reuses_the_cache(image_dir, ae_run, latent_run, tmp_path):
  import shutil

  changed = tmp_path / "ae"
  shutil.copytree(ae_run, changed)
  before = latent.resolve(latent_config(image_dir, changed))
  config = ae_config(image_dir, training__num_steps=5)
  training.train(config, changed)  # one more step: a new newest checkpoint
  after = latent.resolve(latent_config(image_dir, changed))
  assert after.latent.autoencoder_step == 5 and before.latent.autoencoder_step == 4
  assert after.latent.digest != before.latent.digest
  assert latent.cache_path(after, "train") != latent.cache_path(before, "train")
  # The latent run trained on the old checkpoint refuses to resume on the new one...
  moved = tmp_path / "latent"
  shutil.copytree(latent_run, moved)
  with pytest.raises(training.ResumeRefusedError, match="latent.autoencoder_step"):
    training.train(
      latent_config(image_dir, ae_run, latent__autoencoder_step=2, training__num_steps=6), moved
    )


def test_reconstruction_quality_of_the_autoencoder_run(ae_run, classifier_path):
  run = jaxdiff.load_run(ae_run)
  net = jaxdiff.evaluation.feature_net("classifier", classifier_path, run.config.data)
  images = jaxdiff.data.read_examples(run.config.data, "train", 12)
  reference = jaxdiff.evaluation.feature_stats(
    jaxdiff.evaluation.compute_features(net, images, None, batch_size=8)[0]
  )
  record = jaxdiff.evaluation.reconstruction_quality(
    run.reconstruct, images, net, reference, batch_size=8
  )
  recon = jaxdiff.io.images.to_uint8(
    np.clip(np.asarray(run.reconstruct(from_uint8(images))), -1, 1)
  )
  err = np.square(images.astype(np.float64) - recon).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(record["psnr"], np.mean(10 * np.log10(255**2 / err)), rtol=1e-6)
  assert record["num_examples"] == 12 and record["fd"] >= 0
  assert record["preview"].shape == (16, 8, 8, 1)  # 8 originals above their 8 reconstructions
  identical = jaxdiff.evaluation.psnr(images, images)
  assert np.all(np.isinf(identical))


# ----------------------------------------------------------------------------- latent runs


def test_latent_run_samples_decoded_images_of_the_data_shape(latent_run):
  run = jaxdiff.load_run(latent_run)
  assert sample_shape(run.config) == (4, 4, 2)
  assert run.autoencoder is not None and run.image_shape == (8, 8, 1)
  images = run.sample(4, steps=3, seed=0)
  assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
  again, trajectory = run.sample(4, steps=3, seed=0, return_trajectory=True)
  np.testing.assert_array_equal(images, again)
  assert trajectory.shape == (4, 4, 8, 8, 1)  # x_T and three steps, decoded


@pytest.mark.slow
def test_latent_run_resumes_exactly(image_dir, ae_run, latent_run, tmp_path):
  config = latent_config(image_dir, ae_run)
  first = tmp_path / "resumed"
  with config.unlocked():
    config.training.num_steps = 2
  training.train(config, first)
  with config.unlocked():
    config.training.num_steps = 4
  training.train(config, first)

  def losses(d):
    return [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]

  np.testing.assert_allclose(losses(first), losses(latent_run), rtol=1e-6)


def test_latent_run_checks(image_dir, ae_run, latent_run, tmp_path):
  def problems(**overrides):
    return training.validation.problems(latent_config(image_dir, ae_run, **overrides), 8)

  assert problems() == []
  assert any("sampling.clip_denoised=True" in p for p in problems(sampling__clip_denoised=True))
  assert any("data.random_flip=True" in p for p in problems(data__random_flip=True))
  # The bound's L0 uses a Gaussian decoder on latents, so the hybrid loss is allowed.
  assert problems(diffusion__loss_type="hybrid", diffusion__var_type="learned_range") == []
  assert any("no checkpoint 99" in p for p in problems(latent__autoencoder_step=99))
  assert any("data.image_size=16" in p for p in problems(data__image_size=16))
  missing = training.validation.problems(latent_config(image_dir, tmp_path / "none"), 8)
  assert any("config.json not found" in p for p in missing)
  not_ae = training.validation.problems(latent_config(image_dir, latent_run), 8)
  assert any("not an autoencoder run" in p for p in not_ae)
  bad_pad = training.validation.problems(ae_config(image_dir, autoencoder__padded_size=9), 8)
  assert any(p.startswith("autoencoder.padded_size=9: must be 0") for p in bad_pad)


@pytest.mark.slow
def test_cli_evaluates_reconstructions_and_a_named_latent_bound(
  ae_run, latent_run, classifier_path, tmp_path
):
  out = jaxdiff_cli(
    "evaluate", f"--workdir={ae_run}", "--metric=recon", "--split=train",
    f"--features_path={classifier_path}", f"--cache_dir={tmp_path}", f"--out={tmp_path / 'o'}",
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["metric"] == "recon" and record["num_examples"] == 8
  assert np.isfinite(record["psnr"]) and np.isfinite(record["fd"])
  out = jaxdiff_cli(
    "evaluate",
    f"--workdir={latent_run}",
    "--metric=bpd",
    "--split=train",
    f"--out={tmp_path / 'b'}",
  )
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["metric"] == "latent_bpd" and "not bits/dim of images" in record["space"]
  assert record["decoder"] == "gaussian" and np.isfinite(record["bpd"])
  assert all(Path(f).name.startswith("latent_bpd_train_n8") for f in record["files"])
  out = jaxdiff_cli("evaluate", f"--workdir={ae_run}", "--metric=fd")
  assert out.returncode == 1 and "use --metric recon" in out.stderr
  out = jaxdiff_cli(
    "sample", f"--workdir={latent_run}", "--num_samples=4", "--steps=2", f"--out={tmp_path / 's'}"
  )
  assert out.returncode == 0, out.stderr
  assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (4, 8, 8, 1)


def test_the_latent_decoder_term_is_a_gaussian_density():
  """L_0 of a latent run: -log N(x0; mean, var) per dimension in bits, float64 reference."""
  from jaxdiff.core import diffusion, likelihood

  d = diffusion.make_diffusion(np.linspace(1e-4, 0.02, 10), var_type="fixed_small")
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(2, 3, 3, 2)) * 1.7  # latents: not on any 8-bit grid, not in [-1, 1]
  x_t, eps = rng.normal(size=x0.shape), rng.normal(size=x0.shape)
  t = np.zeros(2, np.int32)
  got = likelihood.vb_terms_bpd(
    d, jnp.asarray(eps, jnp.float32), jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32),
    jnp.asarray(t), clip_denoised=False, decoder="gaussian",
  )  # fmt: skip
  betas = np.linspace(1e-4, 0.02, 10)
  ac = np.cumprod(1 - betas)
  mean = (x_t - np.sqrt(1 - ac[0]) * eps) / np.sqrt(ac[0])  # x0 predicted from eps at t = 0
  # fixed_small at t = 0: the posterior variance, clipped to its t = 1 value (Ho et al.'s code).
  var = betas[1] * (1 - ac[0]) / (1 - ac[1])
  nll = 0.5 * (x0 - mean) ** 2 / var + 0.5 * np.log(2 * np.pi * var)
  np.testing.assert_allclose(got, nll.mean(axis=(1, 2, 3)) / np.log(2), rtol=2e-3)
