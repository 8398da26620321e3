"""Evaluate a trained run: bits/dim (its variational bound, or by its probability-flow ODE), or
sample quality (FD / IS).

  jaxdiff evaluate --workdir runs/fmnist --metric bpd --split test --num_examples 1000
  jaxdiff evaluate --workdir runs/fm_flow --metric ode_bpd --num_examples 100 --ode_steps 32
  jaxdiff evaluate --workdir runs/fm_flow --metric ode_bpd --ode_method dopri5 --ode_rtol 1e-5
  jaxdiff evaluate --workdir runs/fmnist --metric fd --num_samples 10000 --sampler ddim --steps 100
  jaxdiff evaluate --workdir runs/cifar10 --metric fid --num_samples 50000 \\
      --features_path pt_inception.npz                   # the standard FID: Inception features
  jaxdiff evaluate --workdir runs/fm_autoencoder --metric recon --split test  # an autoencoder

``fd`` is the Fréchet distance between the features of samples and of the reference split, with
the feature network ``config.eval.features`` (default: jaxdiff's classifier of the dataset; it is
not comparable with published FIDs); ``fid`` is the same with InceptionV3 features, the published
metric. ``bpd`` is the variational bound of a ddpm or vdm run; ``ode_bpd``, for any process, the
probability-flow ODE's bits/dim of the uniformly dequantised images (Hutchinson trace
estimate; :mod:`jaxdiff.evaluation.ode_bpd`). ``recon`` (autoencoder runs) is the PSNR of the
reconstructions of ``eval.split`` and their FD to the split (the data floor of latent models on
that autoencoder). A latent run's
``fd`` / ``fid`` scores its decoded samples; its ``bpd`` is the bound over the autoencoder's
scaled latents of the split, reported as metric ``latent_bpd`` in ``latent_bpd_*`` files (bits
per latent dimension with a Gaussian decoder term): never comparable with, nor named as, a
pixel model's bits/dim. Options left unset
come from the run's ``config.eval`` and ``config.sampling``; ``--config.eval.KEY=value`` /
``--config.sampling.KEY=value`` change any of their fields for this command, and the short
flags are other names for the same fields.

Loads the run (``jaxdiff.load_run``), calls the evaluator (``jaxdiff.evaluation``), writes the
record and its other outputs under ``--out`` (default ``WORKDIR/eval``; ``--out=''`` writes
nothing; process 0 writes, each file atomically) and prints it as one JSON line. When the
default classifier is not in the cache, the command says how to train one, or trains it first
with ``--train_classifier``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from absl import app, flags

from jaxdiff import cli
from jaxdiff.cli import overrides

flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_enum(
  "metric", None, ["bpd", "ode_bpd", "fd", "fid", "recon"], "What to evaluate (see above)."
)
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to load (default: the newest).")
flags.DEFINE_bool("best", False, "Load the checkpoint kept as the best by eval.best_metric.")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "The EMA or the optimiser's parameters.")
flags.DEFINE_integer("seed", 0, "Noise (bpd) or sampling (fd, fid) seed.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval; '' writes nothing).")
flags.DEFINE_integer("t_chunk", 100, "bpd: timesteps per compiled scan.")
flags.DEFINE_enum(
  "ode_method", "rk4", ["rk4", "heun", "dopri5"],
  "ode_bpd: the solver: fixed --ode_steps of rk4 or heun (4 or 2 calls a step), or adaptive"
  " dopri5 steps (Dormand-Prince 5(4), each image its own) to --ode_rtol and --ode_atol.",
)  # fmt: skip
flags.DEFINE_float("ode_rtol", 1e-5, "ode_bpd, dopri5: relative tolerance (Song et al.'s 1e-5).")
flags.DEFINE_float("ode_atol", 1e-5, "ode_bpd, dopri5: absolute tolerance.")
flags.DEFINE_integer(
  "ode_max_steps", 1000, "ode_bpd, dopri5: most attempted steps per image (6 calls each)."
)
flags.DEFINE_enum(
  "divergence", "hutchinson", ["hutchinson", "exact"],
  "ode_bpd: the trace estimate (exact: one JVP per dimension, small images only).",
)  # fmt: skip
flags.DEFINE_bool(
  "train_classifier", False, "fd: train and cache the dataset's default classifier first if"
  " there is none (minutes on a CPU)."
)  # fmt: skip
# Short flags: other names for fields of config.eval and config.sampling.
flags.DEFINE_string("split", None, "Data split (config.eval.split).")
flags.DEFINE_integer(
  "batch_size",
  None,
  "Images per batch of the bound and of feature extraction (config.eval.batch_size).",
)
flags.DEFINE_integer(
  "num_examples", None, "bpd: the first N examples, 0 = all (config.eval.num_examples)."
)
flags.DEFINE_integer("num_samples", None, "fd, fid: how many samples (config.eval.num_samples).")
flags.DEFINE_integer(
  "ode_steps", None, "ode_bpd: fixed solver steps, even in ln sigma (config.eval.ode_steps)."
)
flags.DEFINE_string("sampler", None, "fd, fid: the sampler (config.sampling.sampler).")
flags.DEFINE_integer("steps", None, "fd, fid: sampler steps (config.sampling.num_steps).")
flags.DEFINE_float("eta", None, "fd, fid: DDIM eta (config.sampling.eta).")
flags.DEFINE_string("features", None, "fd: classifier | inception (config.eval.features).")
flags.DEFINE_string(
  "features_path", None, "fd, fid: the feature network's weight file (config.eval.features_path)."
)
flags.DEFINE_string(
  "cache_dir",
  None,
  "Reference statistics and classifiers (config.eval.cache_dir; '' = $JAXDIFF_CACHE or"
  " ~/.cache/jaxdiff).",
)
flags.mark_flags_as_required(["workdir", "metric"])
overrides.define(["eval", "sampling"])
cli.define_common_flags()
flags.declare_key_flag("compilation_cache_dir")
FLAGS = flags.FLAGS

SHORTHANDS = {
  "split": "eval.split",
  "batch_size": "eval.batch_size",
  "num_examples": "eval.num_examples",
  "num_samples": "eval.num_samples",
  "ode_steps": "eval.ode_steps",
  "sampler": "sampling.sampler",
  "steps": "sampling.num_steps",
  "eta": "sampling.eta",
  "features": "eval.features",
  "features_path": "eval.features_path",
  "cache_dir": "eval.cache_dir",
}


def _out_dir() -> Any:
  from jaxdiff.io import files

  if FLAGS.out is None:
    return files.as_path(FLAGS.workdir) / "eval"
  return files.as_path(FLAGS.out) if FLAGS.out else None


def _kind_problems(config: Any) -> list[str]:
  """A metric the run cannot give: each kind of run has its own."""

  if config.model.name == "autoencoder":
    if FLAGS.metric != "recon":
      return [
        f"--metric {FLAGS.metric}: {FLAGS.workdir} is an autoencoder run, which encodes and"
        " decodes rather than samples; use --metric recon"
      ]
    return []
  if FLAGS.metric == "recon":
    return [f"--metric recon: {FLAGS.workdir} is not an autoencoder run (model.name="
            f"{config.model.name!r})"]  # fmt: skip
  from jaxdiff import config as config_lib
  from jaxdiff.core import process as process_lib

  process = process_lib.kind(config.diffusion)
  if FLAGS.metric == "bpd" and process not in ("ddpm", "vdm"):
    return [f"--metric bpd: the {process} process has no variational bound; use --metric ode_bpd"
            " (its probability-flow ODE), fd or fid"]  # fmt: skip
  if FLAGS.metric == "ode_bpd" and config_lib.is_latent(config):
    return ["--metric ode_bpd: a latent run's density is over latents, not images; use --metric"
            " bpd (its bound in bits per latent dimension), fd or fid"]  # fmt: skip
  return []


def _check(config: Any) -> list[str]:
  """Every problem with the options this metric uses, before anything is loaded."""
  from jaxdiff.training import evaluator

  problems = _kind_problems(config)
  if problems:
    return problems
  if FLAGS.metric in ("bpd", "ode_bpd", "recon"):
    fields = ["num_examples", "batch_size"] + (["ode_steps"] if FLAGS.metric == "ode_bpd" else [])
    problems = evaluator.field_problems(config, fields)
    if FLAGS.metric == "ode_bpd":
      from jaxdiff.evaluation import ode_bpd

      solver = ode_bpd.solver_problems(
        FLAGS.ode_method, config.eval.ode_steps, FLAGS.ode_rtol, FLAGS.ode_atol,
        FLAGS.ode_max_steps, FLAGS.divergence,
      )  # fmt: skip
      # in the flags' names; eval.ode_steps has its line from the field check above
      flag = {"method": "--ode_method", "divergence": "--divergence", "rtol": "--ode_rtol",
              "atol": "--ode_atol", "max_steps": "--ode_max_steps"}  # fmt: skip
      for line in solver:
        name, _, rest = line.partition("=")
        if name in flag:
          problems.append(f"{flag[name]}={rest}")
    if FLAGS.metric == "bpd" and FLAGS.t_chunk < 1:
      problems.append(f"t_chunk={FLAGS.t_chunk}: an integer >= 1")
    return problems
  from jaxdiff import evaluation
  from jaxdiff.sampling import check_sampling

  problems = check_sampling(config)
  problems += evaluator.field_problems(config, ["num_samples", "batch_size"])
  try:  # more than the loop's check: whether the file holds that kind of network
    evaluation.check_kind(config.eval.features, config.eval.features_path or None)
  except (ValueError, FileNotFoundError) as e:
    problems.append(str(e))
  return problems


def _config() -> Any:
  """The run's config with this command's overrides, checked."""
  from jaxdiff import run as run_lib

  overrides.check_checkpoint_choice()
  if FLAGS.out:
    overrides.check_out_dir(FLAGS.out)
  values = overrides.collect(["eval", "sampling"], SHORTHANDS)
  config = run_lib.read_config(FLAGS.workdir)
  if FLAGS.metric == "fid":  # FID means Inception features
    if values.setdefault("eval.features", "inception") != "inception":
      raise app.UsageError(
        f"--metric fid uses Inception features, not {values['eval.features']!r}; for a"
        " Fréchet distance of other features use --metric fd"
      )
    if config.eval.features != "inception":  # the run's features_path is another network's
      values.setdefault("eval.features_path", "")
  config = overrides.apply(config, values)
  if problems := _check(config):
    raise app.UsageError("; ".join(problems))
  return config


def _load(config: Any) -> Any:
  import dataclasses

  from jaxdiff.run import load_run

  run = load_run(FLAGS.workdir, FLAGS.checkpoint_step, best=FLAGS.best)
  return dataclasses.replace(run, config=config)


def _context(run: Any) -> dict[str, Any]:
  return {"workdir": str(FLAGS.workdir), "step": run.step, "params": FLAGS.params}


def _latents(run: Any, split: str, n: int | None) -> Any:
  """The scaled posterior means of a latent run's split (the cache ``latent_source`` keeps)."""
  from jaxdiff import latent

  ae = run.autoencoder
  encode = latent.encoder(ae.graphdef, ae.params, run.config.latent.scale_factor)
  source = latent.latent_source(run.config, encode, run.mesh, split)
  return source.images[:n]


def _bpd(config: Any) -> dict[str, Any]:
  import jax

  from jaxdiff import data, evaluation

  ecfg = config.eval
  run = _load(config)
  n = ecfg.num_examples or None  # 0 = all
  is_latent = run.autoencoder is not None
  if is_latent:  # the bound over latents: a density there, in bits per latent dimension
    examples = _latents(run, ecfg.split, n)
  else:
    examples = data.read_examples(config.data, ecfg.split, n)
  from jaxdiff.core import process as process_lib

  if process_lib.kind(config.diffusion) == "vdm":
    return _vdm_bpd(config, run, examples)
  record = evaluation.bits_per_dim(
    run.diffusion, run.model_fn(FLAGS.params), examples, seed=FLAGS.seed,
    batch_size=ecfg.batch_size, t_chunk=FLAGS.t_chunk, clip_denoised=bool(ecfg.clip_denoised),
    mesh=run.mesh, progress=True, decoder="gaussian" if is_latent else "discretized",
  )  # fmt: skip
  if is_latent:
    record["space"] = (
      "the autoencoder's scaled latents (Gaussian decoder term): bits per latent dimension,"
      " a differential bound, not bits/dim of images"
    )
  record.pop("metric", None)  # the evaluator's name; a latent run's bound is named apart
  record = {"metric": "latent_bpd" if is_latent else "bpd", **_context(run), "split": ecfg.split,
            **record}  # fmt: skip
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = evaluation.write_bpd(out, record)
  return record


def _vdm_bpd(config: Any, run: Any, examples: Any) -> dict[str, Any]:
  """VDM's bound (:func:`jaxdiff.evaluation.vdm_bits_per_dim`), one diffusion-term draw per
  example; its record in one JSON file (the terms have no timesteps to tabulate)."""
  import jax

  from jaxdiff import evaluation
  from jaxdiff.evaluation import report

  ecfg = config.eval
  record = evaluation.vdm_bits_per_dim(
    run.diffusion, run.model_fn(FLAGS.params), examples, seed=FLAGS.seed,
    batch_size=ecfg.batch_size, mesh=run.mesh, progress=True,
  )  # fmt: skip
  record = {**record, **_context(run), "split": ecfg.split}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = report.write_likelihood(out, record)
  return record


def _ode_bpd(config: Any) -> dict[str, Any]:
  """Bits/dim by the probability-flow ODE (:func:`jaxdiff.evaluation.ode_bits_per_dim`) of any
  process; its record in one JSON file."""
  import jax

  from jaxdiff import data, evaluation
  from jaxdiff.core import process as process_lib
  from jaxdiff.evaluation import report

  ecfg = config.eval
  run = _load(config)
  examples = data.read_examples(config.data, ecfg.split, ecfg.num_examples or None)
  record = evaluation.ode_bits_per_dim(
    process_lib.sigma_view(run.diffusion, run.model_fn(FLAGS.params)), examples,
    batch_size=ecfg.batch_size, seed=FLAGS.seed, num_steps=ecfg.ode_steps,
    method=FLAGS.ode_method, divergence=FLAGS.divergence, rtol=FLAGS.ode_rtol,
    atol=FLAGS.ode_atol, max_steps=FLAGS.ode_max_steps, mesh=run.mesh, progress=True,
  )  # fmt: skip
  record = {**record, **_context(run), "split": ecfg.split}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = report.write_likelihood(out, record)
  return record


def _feature_net(config: Any) -> Any:
  """The feature network; with --train_classifier a missing default classifier is trained."""

  from jaxdiff import evaluation
  from jaxdiff.training import classifier

  ecfg = config.eval
  kind, path, cache = ecfg.features, ecfg.features_path or None, ecfg.cache_dir or None
  try:
    return evaluation.feature_net(kind, path, config.data, cache)
  except FileNotFoundError:
    if not (FLAGS.train_classifier and kind == "classifier" and not path):
      raise
  default = evaluation.default_classifier_path(config.data, cache)
  print(f"training the classifier of {config.data.name} into {default}", file=sys.stderr)
  classifier.train(config, default, progress=True)
  return evaluation.feature_net("classifier", default, config.data, cache)


def _reference(config: Any, net: Any, mesh: Any) -> Any:
  """The feature statistics of ``config.eval.split`` (cached)."""
  from jaxdiff import evaluation

  ecfg = config.eval
  reference, _ = evaluation.reference_stats(
    net, config.data, split=ecfg.split, cache_dir=evaluation.cache_dir(ecfg.cache_dir or None),
    batch_size=ecfg.batch_size, mesh=mesh, progress=True,
  )  # fmt: skip
  return reference


def _fd(config: Any) -> dict[str, Any]:
  import jax

  from jaxdiff import evaluation

  ecfg, scfg = config.eval, config.sampling
  net = _feature_net(config)
  run = _load(config)
  reference = _reference(config, net, run.mesh)
  record = evaluation.sample_quality(
    run.sample_fn(FLAGS.params, progress=True), net, reference, num_samples=ecfg.num_samples,
    seed=FLAGS.seed, batch_size=ecfg.batch_size, mesh=run.mesh, progress=True,
  )  # fmt: skip
  sampler = {"sampler": scfg.sampler, "steps": scfg.num_steps, "eta": scfg.eta}
  record = {
    **_context(run), **sampler, **record, "reference": f"{config.data.name}:{ecfg.split}",
  }  # fmt: skip
  record.pop("metric", None)  # the evaluator's name for it; this command's is fd or fid
  record = {"metric": FLAGS.metric, **record}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = evaluation.write_fid(out, record)
  return record


def _recon(config: Any) -> dict[str, Any]:
  import jax

  from jaxdiff import data, evaluation

  ecfg = config.eval
  images = data.read_examples(config.data, ecfg.split, ecfg.num_examples or None)  # 0 = all
  net = _feature_net(config)
  run = _load(config)
  reference = _reference(config, net, run.mesh)
  record = evaluation.reconstruction_quality(
    lambda x: run.reconstruct(x, FLAGS.params), images, net, reference,
    batch_size=ecfg.batch_size, mesh=run.mesh, progress=True,
  )  # fmt: skip
  record = {**record, **_context(run), "split": ecfg.split}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = evaluation.write_recon(out, record)
  return record


def _show_library_logs() -> None:
  # The library logs through `logging` (e.g. where reference statistics came from); show
  # jaxdiff's own INFO lines, not those of every library below it.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(message)s"))
  logger = logging.getLogger("jaxdiff")
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def _evaluate() -> None:
  import jax

  from jaxdiff import evaluation

  config = _config()
  _show_library_logs()
  evaluate = {"bpd": _bpd, "ode_bpd": _ode_bpd, "recon": _recon}.get(FLAGS.metric, _fd)
  record = evaluate(config)
  if jax.process_index() == 0:
    print(json.dumps(evaluation.json_record(record)), flush=True)


def main(argv: list[str]) -> None:
  """Prints the record as one JSON line (process 0); an expected error (bad options, missing
  files, an unprepared dataset) ends the command with one line on stderr and exit status 1."""
  cli.start_jax(argv)
  cli.reporting_errors(_evaluate)


if __name__ == "__main__":
  cli.run_main(main)
