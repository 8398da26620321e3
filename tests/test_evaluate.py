"""python -m jaxdiff.evaluate: bits/dim of a split and FD/IS of samples, on a tiny trained run."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from jaxdiff import classifier, evaluate, losses, trainer
from jaxdiff import diffusion as D


@pytest.fixture(scope="module")
def run(image_dir, tmp_path_factory):
  config = tiny.get_config()
  config.data.name = "image_folder"
  config.data.image_folder = str(image_dir)
  config.data.num_classes = 2
  config.training.num_steps = 3
  config.training.ema_decay = 0.5  # EMA and raw parameters differ after 3 steps
  config.training.sample_every = 0
  config.eval.batch_size = 16
  config.eval.num_examples = 12
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def bpd(run):
  return evaluate.bits_per_dim(run, t_chunk=7, progress=False)


def test_bpd_record_files_and_decomposition(run, bpd):
  T = bpd["num_timesteps"]
  assert bpd["num_examples"] == 12 and bpd["step"] == 3 and bpd["params"] == "ema"
  assert np.isfinite(bpd["bpd"]) and 0 < bpd["bpd_stderr"] < bpd["bpd"]
  parts = bpd["prior_bpd"] + bpd["decoder_bpd"] + bpd["kl_bpd"]
  np.testing.assert_allclose(parts, bpd["bpd"], rtol=1e-9)
  np.testing.assert_allclose(bpd["terms"]["vb"].sum() + bpd["prior_bpd"], bpd["bpd"], rtol=1e-6)
  np.testing.assert_allclose(bpd["terms"]["vb"][0], bpd["decoder_bpd"], rtol=1e-9)
  for name in ("vb", "vb_stderr", "xstart_mse", "mse"):
    assert bpd["terms"][name].shape == (T,)
  json_path, csv_path, png_path = map(Path, bpd["files"])
  assert json.loads(json_path.read_text())["bpd"] == bpd["bpd"]
  rows = np.loadtxt(csv_path, delimiter=",", skiprows=1)
  assert rows.shape == (T, 5)
  np.testing.assert_allclose(rows[:, 1], bpd["terms"]["vb"], rtol=1e-6)
  assert png_path.stat().st_size > 1000
  assert not [p for p in json_path.parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_bpd_matches_the_bound_computed_directly(run, bpd):
  """The chunked, sharded, padded evaluation equals calc_bpd_terms over all t on one batch."""
  config, model_fn, _ = trainer.load_model(run)
  d = D.from_config(config.diffusion)
  x0 = evaluate.read_examples(config, "test", 12).astype(np.float32) / 127.5 - 1
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(12))
  terms = losses.calc_bpd_terms(d, model_fn, x0, keys, np.arange(d.num_timesteps))
  total = np.asarray(terms["vb"]).sum(1) + np.asarray(losses.prior_bpd(d, x0))
  np.testing.assert_allclose(bpd["bpd"], total.mean(), rtol=1e-5)
  np.testing.assert_allclose(bpd["bpd_stderr"], total.std(ddof=1) / np.sqrt(12), rtol=1e-4)


def test_bpd_is_independent_of_batch_size_and_chunking_but_not_of_params(run, bpd, tmp_path):
  other = evaluate.bits_per_dim(run, batch_size=8, t_chunk=20, out="", progress=False)
  np.testing.assert_allclose(other["bpd"], bpd["bpd"], rtol=1e-5)
  np.testing.assert_allclose(other["terms"]["vb"], bpd["terms"]["vb"], rtol=1e-4, atol=1e-7)
  assert "files" not in other
  raw = evaluate.bits_per_dim(run, params="raw", out=tmp_path, progress=False)
  assert raw["params"] == "raw" and raw["bpd"] != bpd["bpd"]
  assert all(p.endswith(("raw.json", "raw.csv", "raw.png")) for p in raw["files"])


def test_bpd_bad_input(run):
  with pytest.raises(ValueError, match="num_examples=1000.*1..48"):
    evaluate.bits_per_dim(run, num_examples=1000, progress=False)
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the 8"):
    evaluate.bits_per_dim(run, batch_size=12, progress=False)
  with pytest.raises(ValueError, match="params='best'; allowed: ema, raw"):
    evaluate.bits_per_dim(run, params="best", progress=False)
  with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
    evaluate.bits_per_dim(run, checkpoint_step=7, progress=False)


@pytest.fixture(scope="module")
def classifier_path(run, tmp_path_factory):
  config, _, _ = trainer.load_model(run)
  path = tmp_path_factory.mktemp("cls") / "classifier.npz"
  classifier.train(config, path, steps=3, batch_size=16, progress=False)
  return path


def test_fid_record_and_determinism(run, classifier_path, tmp_path):
  kwargs = dict(
    num_samples=16,
    sampler="ddim",
    steps=4,
    features_path=classifier_path,
    cache=tmp_path / "cache",
    progress=False,
  )
  a = evaluate.sample_quality(run, out=tmp_path / "out", **kwargs)
  assert a["features"].startswith("classifier-image_folder-") and a["num_samples"] == 16
  assert a["fd"] >= 0 and np.isfinite(a["fd"]) and a["is_mean"] >= 1 - 1e-6
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the reference statistics
  assert json.loads(Path(a["files"][0]).read_text())["fd"] == a["fd"]
  b = evaluate.sample_quality(run, out="", **kwargs)  # cached reference, same seed
  assert b["fd"] == pytest.approx(a["fd"], rel=1e-6)
  c = evaluate.sample_quality(run, out="", seed=1, **kwargs)
  assert c["fd"] != a["fd"]


def test_fid_feature_network_errors(run, tmp_path):
  with pytest.raises(ValueError, match="features='inception' needs --features_path"):
    evaluate.sample_quality(run, num_samples=8, features="inception", progress=False)
  with pytest.raises(ValueError, match="features='vgg'; allowed: inception, classifier"):
    evaluate.sample_quality(run, num_samples=8, features="vgg", progress=False)
  with pytest.raises(FileNotFoundError, match="no classifier weight file"):
    evaluate.sample_quality(
      run, num_samples=8, features_path=tmp_path / "missing.npz", progress=False
    )
  with pytest.raises(ValueError, match="num_samples=1"):
    evaluate.sample_quality(run, num_samples=1, progress=False)


def test_command_line_prints_one_json_line(run, capsys, tmp_path):
  result = evaluate.main(
    ["--workdir", str(run), "--metric", "bpd", "--num_examples", "8", "--out", str(tmp_path)]
  )
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(line)["bpd"] == result["bpd"] and result["num_examples"] == 8
  with pytest.raises(SystemExit):
    evaluate.main(["--workdir", str(run), "--metric", "psnr"])


@pytest.mark.slow  # InceptionV3 at 299x299 on CPU
def test_fid_with_the_inception_port(run, tmp_path):
  """The standard-FID path end to end, with random weights in the documented file format."""
  from jaxdiff import inception

  weights = tmp_path / "inception.npz"
  np.savez(weights, **inception.random_state_dict(0))
  result = evaluate.sample_quality(
    run,
    num_samples=8,
    sampler="ddim",
    steps=2,
    features="inception",
    features_path=weights,
    cache=tmp_path / "cache",
    out="",
    progress=False,
  )
  assert result["features"].startswith("inception-") and np.isfinite(result["fd"])
  assert result["fd"] >= 0 and result["is_mean"] >= 1 - 1e-6
