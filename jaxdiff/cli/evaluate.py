"""Evaluate a trained run: the variational bound in bits/dim, or sample quality (FD / IS).

  python -m jaxdiff.cli.evaluate --workdir runs/fashion_mnist --metric bpd --split test \\
      --num_examples 1000
  python -m jaxdiff.cli.evaluate --workdir runs/fashion_mnist --metric fid --num_samples 10000 \\
      --sampler ddim --steps 100                    # features: jaxdiff's own classifier
  python -m jaxdiff.cli.evaluate --workdir runs/cifar10 --metric fid --num_samples 50000 \\
      --features inception --features_path pt_inception.npz          # the standard FID

Loads the run (``jaxdiff.run.load_run``), calls the evaluator (``jaxdiff.evaluation``), writes
the record and its other outputs under ``--out`` (default ``WORKDIR/eval``; ``--out=''`` writes
nothing; process 0 writes, each file atomically) and prints it as one JSON line. ``bpd`` reads
the first N examples of a split; ``fid`` compares the features of N samples, quantised to 8 bits,
with the reference split's statistics (cached per dataset/split/network in ``--cache_dir``).
The default feature network is the dataset's classifier from the cache: when there is none, the
command says how to train one, or trains it first if given ``--train_classifier``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from absl import app, flags

flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_enum("metric", None, ["bpd", "fid"], "What to evaluate.")
flags.DEFINE_string("split", None, "Data split (default: config.eval.split).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to load (default: the newest).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "The EMA or the raw parameters.")
flags.DEFINE_integer("seed", 0, "Noise (bpd) or sampling (fid) seed.")
flags.DEFINE_integer(
  "batch_size", None, "bpd: examples per batch (default: config.eval.batch_size); fid: samples"
  " per chunk (default: config.sampling.batch_size)."
)  # fmt: skip
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval; '' writes nothing).")
flags.DEFINE_integer(
  "num_examples", None, "bpd: the first N examples (0 = all; default: config.eval.num_examples)."
)
flags.DEFINE_integer("t_chunk", 100, "bpd: timesteps per compiled scan.")
flags.DEFINE_integer("num_samples", 10_000, "fid: how many samples.")
flags.DEFINE_string("sampler", None, "fid: the sampler (default: config.sampling.sampler).")
flags.DEFINE_integer("steps", None, "fid: sampler steps (default: config.sampling.num_steps).")
flags.DEFINE_float("eta", None, "fid: DDIM eta (default: config.sampling.eta).")
flags.DEFINE_enum("features", "classifier", ["classifier", "inception"], "fid: feature network.")
flags.DEFINE_string("features_path", None, "fid: the feature network's weight file.")
flags.DEFINE_string("cache_dir", None, "fid: cache (default: $JAXDIFF_CACHE or ~/.cache/jaxdiff).")
flags.DEFINE_bool(
  "train_classifier", False, "fid: train and cache the dataset's default classifier first if"
  " there is none (minutes on a CPU)."
)  # fmt: skip
flags.mark_flags_as_required(["workdir", "metric"])
FLAGS = flags.FLAGS


def _out_dir() -> Path | None:
  if FLAGS.out is None:
    return Path(FLAGS.workdir) / "eval"
  return Path(FLAGS.out) if FLAGS.out else None


def _context(run: Any) -> dict[str, Any]:
  return {"workdir": str(FLAGS.workdir), "step": run.step, "params": FLAGS.params}


def _bpd() -> dict[str, Any]:
  import jax

  from jaxdiff import data, evaluation
  from jaxdiff.run import load_run

  run = load_run(FLAGS.workdir, FLAGS.checkpoint_step)
  ecfg = run.config.eval
  split = FLAGS.split or ecfg.split
  n = ecfg.num_examples if FLAGS.num_examples is None else FLAGS.num_examples
  images = data.read_examples(run.config.data, split, n or None)  # 0 = all
  record = evaluation.bits_per_dim(
    run.diffusion,
    run.model_fn(FLAGS.params),
    images,
    seed=FLAGS.seed,
    batch_size=FLAGS.batch_size or ecfg.batch_size,
    t_chunk=FLAGS.t_chunk,
    clip_denoised=bool(ecfg.clip_denoised),
    mesh=run.mesh,
    progress=True,
  )
  record = {"metric": "bpd", **_context(run), "split": split, **record}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = evaluation.write_bpd(out, record)
  return record


def _feature_net(config: Any) -> Any:
  """The feature network; with --train_classifier a missing default classifier is trained."""
  import jax

  from jaxdiff import evaluation
  from jaxdiff.training import classifier

  kind, path, cache = FLAGS.features, FLAGS.features_path, FLAGS.cache_dir
  try:
    return evaluation.feature_net(kind, path, config.data, cache)
  except FileNotFoundError:
    if not (FLAGS.train_classifier and kind == "classifier" and not path):
      raise
  default = evaluation.default_classifier_path(config.data, cache)
  print(f"training the classifier of {config.data.name} into {default}", file=sys.stderr)
  classifier.train(config, default, progress=jax.process_index() == 0)
  return evaluation.feature_net("classifier", default, config.data, cache)


def _sample_fn(run: Any, sampler: dict[str, Any]) -> Any:
  """``(key, n) -> float samples [n, H, W, C]``, drawn as the run's ``config.sampling`` says."""
  import jax

  from jaxdiff.sampling import sample_from_config

  model_fn = run.model_fn(FLAGS.params)
  overrides = {"sampler": sampler["sampler"], "num_steps": sampler["steps"], "eta": sampler["eta"]}

  def sample_fn(key: jax.Array, n: int) -> Any:
    return sample_from_config(
      run.config, run.diffusion, model_fn, key, n, mesh=run.mesh, batch_size=FLAGS.batch_size,
      progress=jax.process_index() == 0, **overrides,
    )  # fmt: skip

  return sample_fn


def _fid() -> dict[str, Any]:
  import jax

  from jaxdiff import evaluation
  from jaxdiff.run import load_run

  evaluation.check_kind(FLAGS.features, FLAGS.features_path)  # before the slow parts
  if FLAGS.num_samples < 2:
    raise ValueError(f"num_samples={FLAGS.num_samples}: a covariance needs at least 2")
  run = load_run(FLAGS.workdir, FLAGS.checkpoint_step)
  config, scfg = run.config, run.config.sampling
  split = FLAGS.split or config.eval.split
  net = _feature_net(config)
  cache = evaluation.cache_dir(FLAGS.cache_dir)
  reference, _ = evaluation.reference_stats(
    net, config.data, split=split, cache_dir=cache, batch_size=config.eval.batch_size,
    mesh=run.mesh, progress=True,
  )  # fmt: skip
  sampler = {
    "sampler": FLAGS.sampler or scfg.sampler,
    "steps": FLAGS.steps or scfg.num_steps,
    "eta": scfg.eta if FLAGS.eta is None else FLAGS.eta,
  }
  record = evaluation.sample_quality(
    _sample_fn(run, sampler), net, reference, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
    batch_size=config.eval.batch_size, mesh=run.mesh,
  )  # fmt: skip
  reference_name = f"{config.data.name}:{split}"
  record = {"metric": "fid", **_context(run), **sampler, **record, "reference": reference_name}
  if (out := _out_dir()) is not None and jax.process_index() == 0:
    record["files"] = evaluation.write_fid(out, record)
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


def main(argv: list[str]) -> None:
  """Prints the record as one JSON line (process 0); an expected error (bad options, missing
  files, an unprepared dataset) ends the command with one line on stderr and exit status 1."""
  from jaxdiff.cli import start_jax

  start_jax(argv)
  import jax

  from jaxdiff import data, evaluation

  _show_library_logs()
  try:
    record = _bpd() if FLAGS.metric == "bpd" else _fid()
  except (ValueError, FileNotFoundError, data.DatasetNotPreparedError) as e:
    raise SystemExit(f"error: {e}") from None
  if jax.process_index() == 0:
    print(json.dumps(evaluation.json_record(record)), flush=True)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
