"""The evaluators on a randomly initialised model (no training run needed), the report writers,
and ``jaxdiff evaluate`` on the tiny trained run."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from jaxdiff import data, evaluation, models, parallel
from jaxdiff.core import diffusion as D
from jaxdiff.core import likelihood
from jaxdiff.sampling import sample_from_config
from tests.conftest import cli_env

N = 12  # test images for bits/dim


def _perturbed(params, seed: int):
  # A fresh U-Net's output layer starts at zero (it predicts no noise at all); small random
  # offsets make the outputs, and so the bound, depend on the parameters.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [
    x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def setup(image_dir):
  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(image_dir)
  config.data.num_classes = 2
  graphdef, params = nnx.split(models.build_model(config, rngs=nnx.Rngs(0)))
  return SimpleNamespace(
    config=config,
    d=D.from_config(config.diffusion),
    model_fn=models.bind(graphdef, _perturbed(params, 1)),
    other_fn=models.bind(graphdef, _perturbed(params, 2)),  # e.g. the raw parameters
    images=data.read_examples(config.data, "test", N),  # uint8 [N, 8, 8, 1]
    mesh=parallel.make_mesh(),
  )


@pytest.fixture(scope="module")
def bpd(setup):
  return evaluation.bits_per_dim(setup.d, setup.model_fn, setup.images, batch_size=16, t_chunk=7)


# ---------------------------------------------------------------------------- bits/dim


def test_bpd_record_and_decomposition(bpd):
  T = bpd["num_timesteps"]
  assert bpd["metric"] == "bpd" and bpd["num_examples"] == N and bpd["seed"] == 0
  assert bpd["clip_denoised"] is True and "files" not in bpd  # an evaluator writes nothing
  assert np.isfinite(bpd["bpd"]) and 0 < bpd["bpd_stderr"] < bpd["bpd"]
  parts = bpd["prior_bpd"] + bpd["decoder_bpd"] + bpd["kl_bpd"]
  np.testing.assert_allclose(parts, bpd["bpd"], rtol=1e-9)
  np.testing.assert_allclose(bpd["terms"]["vb"].sum() + bpd["prior_bpd"], bpd["bpd"], rtol=1e-6)
  np.testing.assert_allclose(bpd["terms"]["vb"][0], bpd["decoder_bpd"], rtol=1e-9)
  for name in ("vb", "vb_stderr", "xstart_mse", "mse"):
    assert bpd["terms"][name].shape == (T,)
  assert bpd["per_example_bpd"].shape == (N,)
  json.dumps(evaluation.json_record(bpd))  # the rest is JSON


def test_bpd_matches_the_bound_computed_directly(setup, bpd):
  """The chunked, sharded, padded evaluation equals calc_bpd_terms over all t on one batch."""
  x0 = setup.images.astype(np.float32) / 127.5 - 1
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(N))
  d = setup.d
  terms = likelihood.calc_bpd_terms(d, setup.model_fn, x0, keys, np.arange(d.num_timesteps))
  total = np.asarray(terms["vb"]).sum(1) + np.asarray(likelihood.prior_bpd(d, x0))
  np.testing.assert_allclose(bpd["per_example_bpd"], total, rtol=1e-5)
  np.testing.assert_allclose(bpd["bpd"], total.mean(), rtol=1e-5)
  np.testing.assert_allclose(bpd["bpd_stderr"], total.std(ddof=1) / np.sqrt(N), rtol=1e-4)


def test_bpd_is_independent_of_batch_size_and_chunking_but_not_of_params(setup, bpd):
  other = evaluation.bits_per_dim(
    setup.d, setup.model_fn, setup.images, batch_size=8, t_chunk=20, mesh=setup.mesh
  )
  np.testing.assert_allclose(other["bpd"], bpd["bpd"], rtol=1e-5)
  np.testing.assert_allclose(other["terms"]["vb"], bpd["terms"]["vb"], rtol=1e-4, atol=1e-7)
  raw = evaluation.bits_per_dim(setup.d, setup.other_fn, setup.images, batch_size=16, t_chunk=7)
  assert raw["bpd"] != bpd["bpd"]


def test_bpd_bad_input(setup):
  run = lambda **kw: evaluation.bits_per_dim(setup.d, setup.model_fn, **kw)
  with pytest.raises(ValueError, match="batch_size=12 is not a positive multiple of the 8"):
    run(images=setup.images, batch_size=12)
  with pytest.raises(ValueError, match="t_chunk=0 must be >= 1"):
    run(images=setup.images, batch_size=8, t_chunk=0)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\] with N >= 1"):
    run(images=setup.images[:0], batch_size=8)


def test_write_bpd(bpd, tmp_path):
  record = {"metric": "bpd", "step": 3, "params": "raw", "split": "test[:12]", **bpd}
  paths = evaluation.write_bpd(tmp_path / "eval", record)
  json_path, csv_path, png_path = map(Path, paths)
  assert json_path.name == f"bpd_test_12_n{N}_step3_raw.json"
  saved = json.loads(json_path.read_text())
  assert saved["bpd"] == bpd["bpd"] and saved["files"] == paths and "terms" not in saved
  rows = np.loadtxt(csv_path, delimiter=",", skiprows=1)
  assert rows.shape == (bpd["num_timesteps"], 5)
  np.testing.assert_allclose(rows[:, 1], bpd["terms"]["vb"], rtol=1e-6)
  assert png_path.stat().st_size > 1000
  assert sorted(p.name for p in json_path.parent.iterdir()) == sorted(Path(p).name for p in paths)


# ---------------------------------------------------------------------------- sample quality


@pytest.fixture(scope="module")
def feature_net(setup, classifier_path):
  return evaluation.feature_net("classifier", classifier_path, setup.config.data)


def _sample_fn(setup):
  def sample_fn(key, n):
    return sample_from_config(
      setup.config, setup.d, setup.model_fn, key, n, mesh=setup.mesh, sampler="ddim", num_steps=4
    )

  return sample_fn


def test_sample_quality_record_determinism_and_report(setup, feature_net, tmp_path):
  reference, logits = evaluation.reference_stats(
    feature_net, setup.config.data, split="test", cache_dir=tmp_path / "cache", batch_size=16
  )
  assert reference.num == 48 and logits.shape == (48, 2)
  kwargs = dict(num_samples=16, batch_size=16, mesh=setup.mesh)
  a = evaluation.sample_quality(_sample_fn(setup), feature_net, reference, **kwargs)
  assert a["metric"] == "fd" and a["num_samples"] == 16 and a["features"] == feature_net.name
  assert a["features"].startswith("classifier-image_folder-")
  assert a["fd"] >= 0 and np.isfinite(a["fd"]) and a["is_mean"] >= 1 - 1e-6
  assert a["preview"].shape == (16, 8, 8, 1) and a["preview"].dtype == np.uint8
  b = evaluation.sample_quality(_sample_fn(setup), feature_net, reference, **kwargs)
  assert b["fd"] == a["fd"]  # same seed, same samples
  c = evaluation.sample_quality(_sample_fn(setup), feature_net, reference, seed=1, **kwargs)
  assert c["fd"] != a["fd"]

  record = {"sampler": "ddim", "steps": 4, "step": 0, "params": "ema", **a}
  json_path, png_path = map(Path, evaluation.write_fid(tmp_path / "out", record))
  assert json_path.name == f"fd_ddim4_n16_step0_ema_{feature_net.name}.json"
  assert json.loads(json_path.read_text())["fd"] == a["fd"] and png_path.stat().st_size > 100
  with pytest.raises(ValueError, match="num_samples=1"):
    evaluation.sample_quality(
      _sample_fn(setup), feature_net, reference, num_samples=1, batch_size=8
    )


def test_feature_network_errors(setup, tmp_path):
  data_config = setup.config.data
  with pytest.raises(ValueError, match="features='inception' needs --features_path"):
    evaluation.feature_net("inception", None, data_config)
  with pytest.raises(ValueError, match="features='vgg'; allowed: inception, classifier"):
    evaluation.feature_net("vgg", None, data_config)
  with pytest.raises(FileNotFoundError, match="no classifier weight file"):
    evaluation.feature_net("classifier", tmp_path / "missing.npz", data_config)


def test_missing_default_classifier_says_how_to_make_one(setup, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXDIFF_CACHE", str(tmp_path / "env_cache"))
  default = evaluation.default_classifier_path(setup.config.data)
  assert default == tmp_path / "env_cache" / "classifier-image_folder-8x1.npz"
  with pytest.raises(FileNotFoundError) as e:
    evaluation.feature_net("classifier", None, setup.config.data)
  message = str(e.value)
  assert str(default) in message
  assert f"jaxdiff train-classifier --config YOUR_CONFIG.py --out {default.parent}" in message
  assert "--train_classifier" in message
  assert not list(tmp_path.rglob("*"))  # nothing was trained or written


def test_ode_bpd_of_a_model_through_its_process(setup, tmp_path):
  """The probability-flow bits/dim of the tiny U-Net through its process's sigma view: one finite
  number per example, depending on the parameters, in a file named by its metric. (Its accuracy
  is tests/test_ode_bpd.py's, with exact models of Gaussian data.)"""
  from jaxdiff.core import process

  images = setup.images[:8]
  rec = evaluation.ode_bits_per_dim(
    process.sigma_view(setup.d, setup.model_fn), images, batch_size=8, num_steps=2
  )
  assert rec["metric"] == "ode_bpd" and rec["per_example_bpd"].shape == (8,)
  assert np.all(np.isfinite(rec["per_example_bpd"])) and rec["bpd_stderr"] > 0
  ab0 = float(setup.d.alphas_cumprod[0])
  assert rec["sigma_min"] == pytest.approx(((1 - ab0) / ab0) ** 0.5, rel=1e-5)  # the first level
  other = evaluation.ode_bits_per_dim(
    process.sigma_view(setup.d, setup.other_fn), images, batch_size=8, num_steps=2
  )
  assert not np.allclose(rec["per_example_bpd"], other["per_example_bpd"])
  record = {**rec, "step": 3, "params": "ema", "split": "test"}
  (path,) = evaluation.write_likelihood(tmp_path, record)
  assert Path(path).name == "ode_bpd_test_n8_step3_ema.json"
  assert json.loads(Path(path).read_text())["bpd"] == rec["bpd"]


# ---------------------------------------------------------------------------- the command


def _evaluate(*flags: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "jaxdiff", "evaluate", *flags]
  env = cli_env(devices=2, checkout=True)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_command_prints_one_json_line_and_writes_files(tiny_run, tmp_path):
  out = tmp_path / "eval"
  proc = _evaluate(
    f"--workdir={tiny_run}", "--metric=bpd", "--num_examples=8", "--t_chunk=10", f"--out={out}"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["num_examples"] == 8 and record["step"] == 2 and record["params"] == "ema"
  assert np.isfinite(record["bpd"]) and "terms" not in record
  assert [Path(p).parent for p in record["files"]] == [out] * 3
  assert json.loads(Path(record["files"][0]).read_text())["bpd"] == record["bpd"]


@pytest.mark.slow  # a second subprocess; ode_bits_per_dim itself is tested above
def test_command_ode_bpd(tiny_run, tmp_path):
  """With adaptive steps: the tiny U-Net called at a different sigma for each image."""
  out = tmp_path / "eval"
  proc = _evaluate(
    f"--workdir={tiny_run}", "--metric=ode_bpd", "--num_examples=4", "--ode_method=dopri5",
    "--ode_rtol=1e-2", "--ode_atol=1e-2", "--ode_max_steps=100", "--batch_size=4", f"--out={out}",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["metric"] == "ode_bpd" and record["num_examples"] == 4
  assert {k: record[k] for k in ("method", "rtol", "atol", "max_steps")} == {
    "method": "dopri5", "rtol": 0.01, "atol": 0.01, "max_steps": 100
  }  # fmt: skip
  assert np.isfinite(record["bpd"]) and 8 <= record["nfe_mean"] <= record["nfe_max"] <= 602
  assert [Path(p).name for p in record["files"]] == ["ode_bpd_test_n4_step2_ema.json"]
  bad = _evaluate(f"--workdir={tiny_run}", "--metric=ode_bpd", "--ode_steps=0")
  assert bad.returncode == 1 and "eval.ode_steps=0: must be an int >= 1" in bad.stderr


@pytest.mark.slow  # a second subprocess; sample_quality itself is tested above
def test_command_fid_writes_nothing_with_empty_out(tiny_run, classifier_path, tmp_path):
  proc = _evaluate(
    f"--workdir={tiny_run}", "--metric=fd", "--num_samples=8", "--sampler=ddim", "--steps=2",
    f"--features_path={classifier_path}", f"--cache_dir={tmp_path}", "--out=",
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["features"].startswith("classifier-image_folder-") and record["num_samples"] == 8
  assert record["sampler"] == "ddim" and record["steps"] == 2 and record["step"] == 2
  assert record["metric"] == "fd"  # classifier features: not the FID
  assert np.isfinite(record["fd"]) and "files" not in record and "preview" not in record
  assert not (tiny_run / "eval").exists()
  assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # only the reference statistics


def test_command_errors_are_one_line(tiny_run, tmp_path):
  proc = _evaluate(
    f"--workdir={tiny_run}",
    "--metric=fd",
    "--num_samples=4",
    f"--cache_dir={tmp_path}",
    "--features_path=",  # the run's config names a classifier file: ask for the default one
  )
  assert proc.returncode == 1
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: no classifier for dataset 'image_folder'")
  assert "jaxdiff train-classifier" in error and "Traceback" not in proc.stderr
  assert not list(tmp_path.iterdir())


@pytest.mark.slow  # InceptionV3 at 299x299 on CPU
def test_sample_quality_with_the_inception_port(setup, tmp_path):
  """The standard-FID path end to end, with random weights in the documented file format."""
  from jaxdiff.evaluation import inception

  weights = tmp_path / "inception.npz"
  np.savez(weights, **inception.random_state_dict(0))
  net = evaluation.feature_net("inception", weights, setup.config.data)
  assert net.name.startswith("inception-")
  reference, _ = evaluation.reference_stats(
    net, setup.config.data, split="test", cache_dir=tmp_path / "cache", batch_size=16
  )
  record = evaluation.sample_quality(
    _sample_fn(setup), net, reference, num_samples=8, batch_size=8, mesh=setup.mesh
  )
  assert np.isfinite(record["fd"]) and record["fd"] >= 0 and record["is_mean"] >= 1 - 1e-6
  assert record["metric"] == "fid"  # Inception features: the published metric
