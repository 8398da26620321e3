"""Evaluating a trained run: the variational bound in bits/dim, and sample quality.

  python -m jaxdiff.evaluate --workdir runs/fashion_mnist --metric bpd --split test \\
      --num_examples 1000
  python -m jaxdiff.evaluate --workdir runs/fashion_mnist --metric fid --num_samples 10000 \\
      --sampler ddim --steps 100                        # features: jaxdiff's own classifier
  python -m jaxdiff.evaluate --workdir runs/cifar10 --metric fid --num_samples 50000 \\
      --features inception --features_path pt_inception.npz          # the standard FID

Both print one JSON line and write it, with their other outputs, under ``--out`` (default
``WORKDIR/eval``; process 0 writes, each file atomically):

* ``bpd``: the full variational bound of Ho et al. (2020, eq. 5) on the first N examples of
  a split: decoder ``L_0`` + all ``T - 1`` KL terms + the prior ``L_T``, with
  ``clip_denoised=True`` as in the reference evaluations. The JSON holds the mean and its
  standard error over examples and the decomposition; ``bpd_*.csv`` the per-timestep terms
  (mean and standard error of ``L_t``, and the x_0 / noise MSEs); ``bpd_*.png`` the terms over t.
  The examples are batch-sharded over all devices; the T terms run as ``lax.scan`` chunks of
  ``t_chunk`` timesteps (one compile) so the progress bar moves. Example i's noise comes from
  ``fold_in(fold_in(key(seed), i), t)``: the result does not depend on the batch size or the
  device count.
* ``fid``: samples N images with any sampler, quantises them to 8 bits as a saved image would
  be, and reports the Fréchet distance of their features to the reference split's (cached per
  dataset/split/network in ``--cache_dir``) and the Inception-style score of their logits.
  Features come from a ``jaxdiff.features.FeatureNet``: ``classifier`` (default; trained on
  the run's dataset by ``jaxdiff.classifier`` on first use and cached) or ``inception`` (FID
  InceptionV3 weights from ``--features_path``; file format in ``jaxdiff.inception``).
  Scores from different networks, sample counts or reference splits are not comparable.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxdiff import (
  data,
  diffusion,
  features,
  files,
  images,
  losses,
  metrics,
  parallel,
  sampling,
  trainer,
)

METRICS = ("bpd", "fid")
DEFAULT_CACHE = "~/.cache/jaxdiff"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
  """Where reference statistics and classifiers live: ``path``, ``$JAXDIFF_CACHE`` or
  ``~/.cache/jaxdiff``."""
  return Path(path or os.environ.get("JAXDIFF_CACHE") or DEFAULT_CACHE).expanduser()


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def read_examples(config: Any, split: str, num_examples: int | None) -> np.ndarray:
  """The first ``num_examples`` (all if None) images of a split, uint8 ``[N, H, W, C]``.

  Raises:
    ValueError: ``num_examples`` < 1 or more than the split holds.
  """
  source = data.make_source(config.data, split=split)
  n = len(source) if num_examples is None else num_examples
  if not 1 <= n <= len(source):
    raise ValueError(f"num_examples={num_examples}; split {split!r} has 1..{len(source)}")
  size, channels = config.data.image_size, config.data.channels
  out = np.empty((n, size, size, channels), np.uint8)
  for start in range(0, n, 1024):
    idx = list(range(start, min(start + 1024, n)))
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(idx)
    else:
      records = [source[i] for i in idx]
    out[start : start + len(idx)] = np.stack([r["image"] for r in records])
  return out


def _put(mesh: Any, x: np.ndarray) -> jax.Array:
  """A host array (the same on every process) as a global array sharded on the batch axis."""
  sharding = parallel.batch_sharding(mesh)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _check_batch(batch: int, mesh: Any) -> int:
  if batch < 1 or batch % mesh.size:
    raise ValueError(f"batch_size={batch} must be a positive multiple of the {mesh.size} devices")
  return batch


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """Pads the leading axis to ``n`` by repeating the last element (padding is discarded)."""
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


# ---------------------------------------------------------------- likelihood


# Module-level jits: the model's parameters, the schedule and the data are arguments, so every
# evaluation of the same shapes (other checkpoints, EMA or raw) reuses the compiled code.
_chunk_terms = jax.jit(losses.calc_bpd_terms, static_argnames="clip_denoised")
_prior_bpd = jax.jit(losses.prior_bpd)


@jax.jit
def _example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def bits_per_dim(
  workdir: str | Path,
  *,
  split: str | None = None,
  num_examples: int | None = None,
  batch_size: int | None = None,
  seed: int = 0,
  checkpoint_step: int | None = None,
  params: str = "ema",
  t_chunk: int = 100,
  out: str | Path | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """The full variational bound of a run on a data split, in bits/dim.

  Args:
    workdir: the training run.
    split: tfds split (default ``config.eval.split``).
    num_examples: the first N examples (default ``config.eval.num_examples``; 0 = all).
    batch_size: global examples per batch, a multiple of the device count (default
      ``config.eval.batch_size``).
    seed: the noise seed.
    checkpoint_step: which checkpoint (default: the newest).
    params: "ema" or "raw" parameters.
    t_chunk: timesteps per compiled scan (the progress bar's unit; not the result's).
    out: output directory (default ``WORKDIR/eval``); ``""`` writes nothing.
    progress: show a tqdm bar.

  Returns:
    The JSON record (``bpd``, ``bpd_stderr``, ``prior_bpd``, ``decoder_bpd``, ``kl_bpd``, ...)
    plus ``terms``: per-timestep arrays ``vb``, ``vb_stderr``, ``xstart_mse``, ``mse`` ``[T]``,
    and ``per_example_bpd`` ``[N]`` (for paired comparisons: same examples, same noise).
  """
  start_time = time.perf_counter()
  mesh = parallel.make_mesh()
  if t_chunk < 1:
    raise ValueError(f"t_chunk={t_chunk} must be >= 1")
  if batch_size is not None:
    _check_batch(batch_size, mesh)
  config, model_fn, step = trainer.load_model(workdir, checkpoint_step, mesh, params=params)
  ecfg = config.eval
  split = split or ecfg.split
  n_req = ecfg.num_examples if num_examples is None else num_examples
  batch = _check_batch(batch_size or ecfg.batch_size, mesh)
  x_all = read_examples(config, split, n_req or None)
  n = len(x_all)
  d = diffusion.from_config(config.diffusion)
  T = d.num_timesteps
  k = min(t_chunk, T)
  # Fixed-length chunks (the last padded with t = T - 1, its columns dropped): one compile.
  chunks = [np.arange(s, min(s + k, T)) for s in range(0, T, k)]

  key = jax.random.key(seed)
  sums = {name: np.zeros(T) for name in ("vb", "vb_sq", "xstart_mse", "mse")}
  totals = np.zeros(n)  # per-example bound
  decoder = np.zeros(n)
  prior = np.zeros(n)
  num_batches = -(-n // batch)
  bar = tqdm.tqdm(
    total=num_batches * len(chunks),
    disable=not progress or jax.process_index() != 0,
    unit="chunk",
    desc=f"bpd {split} x{n}",
    dynamic_ncols=True,
  )
  for b in range(num_batches):
    lo, hi = b * batch, min((b + 1) * batch, n)
    x0 = _put(mesh, _pad_to(x_all[lo:hi], batch).astype(np.float32) / np.float32(127.5) - 1)
    keys = _example_keys(key, _put(mesh, np.arange(lo, lo + batch, dtype=np.int32)))
    p = parallel.to_host(_prior_bpd(d, x0))[: hi - lo]
    prior[lo:hi] = p
    totals[lo:hi] = p
    for ts in chunks:
      padded = _pad_to(ts, k)
      terms = _chunk_terms(
        d, model_fn, x0, keys, jnp.asarray(padded), clip_denoised=bool(ecfg.clip_denoised)
      )
      terms = parallel.to_host(terms)
      vb = terms["vb"][: hi - lo, : len(ts)].astype(np.float64)  # [b, K]
      totals[lo:hi] += vb.sum(axis=1)
      if ts[0] == 0:
        decoder[lo:hi] = vb[:, 0]
      sums["vb"][ts] += vb.sum(axis=0)
      sums["vb_sq"][ts] += np.square(vb).sum(axis=0)
      sums["xstart_mse"][ts] += terms["xstart_mse"][: hi - lo, : len(ts)].sum(axis=0)
      sums["mse"][ts] += terms["mse"][: hi - lo, : len(ts)].sum(axis=0)
      bar.update(1)
    bar.set_postfix(bpd=f"{totals[:hi].mean():.4f}")
  bar.close()

  def stderr(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

  vb_mean = sums["vb"] / n
  vb_var = np.maximum(sums["vb_sq"] / n - vb_mean**2, 0.0) * (n / max(n - 1, 1))
  result: dict[str, Any] = {
    "metric": "bpd",
    "workdir": str(workdir),
    "step": step,
    "params": params,
    "split": split,
    "num_examples": n,
    "seed": seed,
    "num_timesteps": T,
    "clip_denoised": bool(ecfg.clip_denoised),
    "bpd": float(totals.mean()),
    "bpd_stderr": stderr(totals),
    "prior_bpd": float(prior.mean()),
    "decoder_bpd": float(decoder.mean()),
    "kl_bpd": float((totals - prior - decoder).mean()),
    "seconds": round(time.perf_counter() - start_time, 1),
  }
  terms = {
    "vb": vb_mean,
    "vb_stderr": np.sqrt(vb_var / n),
    "xstart_mse": sums["xstart_mse"] / n,
    "mse": sums["mse"] / n,
  }
  out_dir = Path(workdir) / "eval" if out is None else (Path(out) if out else None)
  if out_dir is not None and jax.process_index() == 0:
    stem = f"bpd_{_slug(split)}_n{n}_step{step}_{params}"
    result["files"] = [str(out_dir / f"{stem}.{ext}") for ext in ("json", "csv", "png")]
    with files.atomic_path(out_dir / f"{stem}.json") as p:
      p.write_text(json.dumps(result) + "\n")
    with files.atomic_path(out_dir / f"{stem}.csv") as p:
      _write_terms_csv(p, terms)
    with files.atomic_path(out_dir / f"{stem}.png") as p:
      plot_terms(terms, result, p)
  return {**result, "terms": terms, "per_example_bpd": totals}


def _write_terms_csv(path: Path, terms: dict[str, np.ndarray]) -> None:
  names = list(terms)
  rows = ["t," + ",".join(names)]
  for t in range(len(terms["vb"])):
    rows.append(f"{t}," + ",".join(f"{terms[k][t]:.8g}" for k in names))
  path.write_text("\n".join(rows) + "\n")


def plot_terms(terms: dict[str, np.ndarray], result: dict[str, Any], path: Path) -> None:
  """The bound's terms ``L_t`` over t (log scale), with the decoder and prior marked."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  vb, se = terms["vb"], terms["vb_stderr"]
  t = np.arange(len(vb))
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
  ax.plot(t[1:], vb[1:], lw=1.2, label="KL terms $L_{t}$, t ≥ 1")
  ax.fill_between(t[1:], np.maximum(vb[1:] - 2 * se[1:], 1e-12), vb[1:] + 2 * se[1:], alpha=0.3)
  ax.scatter([0], [vb[0]], color="C3", zorder=3, label=f"decoder $L_0$ = {vb[0]:.3f}")
  ax.set_yscale("log")
  ax.set_xlabel("timestep index t")
  ax.set_ylabel("bits/dim")
  ax.set_title(
    f"bound {result['bpd']:.3f} ± {result['bpd_stderr']:.3f} bits/dim "
    f"(prior {result['prior_bpd']:.1e}), step {result['step']} {result['params']}",
    fontsize=9,
  )
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, format="png")
  plt.close(fig)


# ---------------------------------------------------------------- sample quality


def _check_features(kind: str, path: str | Path | None) -> None:
  if kind not in features.FEATURE_KINDS:
    raise ValueError(f"features={kind!r}; allowed: {', '.join(features.FEATURE_KINDS)}")
  if path and not Path(path).expanduser().is_file():
    raise FileNotFoundError(f"no {kind} weight file at {Path(path).expanduser()}")
  if kind == "inception" and not path:
    raise ValueError(
      "features='inception' needs --features_path: the FID InceptionV3 weights cannot be"
      " downloaded by jaxdiff; see jaxdiff/inception.py for the file format and converter"
    )


def default_classifier_path(config: Any, cache: str | Path | None = None) -> Path:
  """Where ``feature_net("classifier", None, config)`` keeps the dataset's classifier."""
  d = config.data
  return cache_dir(cache) / f"classifier-{d.name}-{d.image_size}x{d.channels}.npz"


def feature_net(
  kind: str, path: str | Path | None, config: Any, cache: str | Path | None = None
) -> features.FeatureNet:
  """The feature network for ``config``'s dataset.

  ``classifier`` without a path uses ``CACHE/classifier-{dataset}-{size}x{channels}.npz``,
  training it first (a few minutes on a CPU) if it is not there.
  """
  _check_features(kind, path)
  if path:
    return features.load(kind, path)
  dcfg = config.data
  default = default_classifier_path(config, cache)
  if not default.exists():
    from jaxdiff import classifier

    print(f"no classifier at {default}: training one on {dcfg.name}", flush=True)
    if jax.process_index() == 0:
      classifier.train(config, default)
    parallel.sync("classifier")
  return features.load("classifier", default)


def sample_quality(
  workdir: str | Path,
  *,
  num_samples: int = 10_000,
  sampler: str | None = None,
  steps: int | None = None,
  eta: float | None = None,
  seed: int = 0,
  batch_size: int | None = None,
  checkpoint_step: int | None = None,
  params: str = "ema",
  features: str = "classifier",
  features_path: str | Path | None = None,
  split: str | None = None,
  cache: str | Path | None = None,
  out: str | Path | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Fréchet distance and Inception-style score of a run's samples.

  Args:
    workdir: the training run.
    num_samples: N samples (compare runs only at equal N: the distance is biased upwards
      at small N).
    sampler, steps, eta: as for ``sample.py`` (default: ``config.sampling``).
    seed: sampling seed.
    batch_size: samples per compiled chunk (default ``config.sampling.batch_size``).
    checkpoint_step: which checkpoint (default: the newest).
    params: "ema" or "raw".
    features: "classifier" or "inception".
    features_path: the network's weight file (classifier: trained and cached if omitted).
    split: the reference split (default ``config.eval.split``).
    cache: the cache directory (see ``cache_dir``).
    out: output directory (default ``WORKDIR/eval``); ``""`` writes nothing.
    progress: show progress bars.

  Returns:
    The JSON record: ``fd``, ``is_mean``, ``is_std``, the settings and timings.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples={num_samples}: a covariance needs at least 2")
  start_time = time.perf_counter()
  _check_features(features, features_path)  # before the slow parts
  mesh = parallel.make_mesh()
  config, model_fn, step = trainer.load_model(workdir, checkpoint_step, mesh, params=params)
  scfg = config.sampling
  split = split or config.eval.split
  sampler = sampler or scfg.sampler
  steps = steps or scfg.num_steps
  eta = scfg.eta if eta is None else eta
  net = feature_net(features, features_path, config, cache)
  ref_stats, _ = metrics.reference_stats(
    net, config, split=split, cache_dir=cache_dir(cache), batch_size=config.eval.batch_size
  )

  labels = None
  if config.model.class_conditional:
    labels = np.arange(num_samples) % config.data.num_classes
  batch = min(batch_size or scfg.batch_size, num_samples)
  batch = -(-batch // mesh.size) * mesh.size
  t0 = time.perf_counter()
  samples = sampling.sample_in_chunks(
    diffusion.from_config(config.diffusion),
    model_fn,
    jax.random.key(seed),
    num_samples,
    (config.data.image_size, config.data.image_size, config.data.channels),
    batch_size=batch,
    labels=labels,
    progress=progress and jax.process_index() == 0,
    sampler=sampler,
    num_steps=steps,
    eta=eta,
    clip_denoised=scfg.clip_denoised,
    null_label=config.data.num_classes if labels is not None else None,
    temperature=scfg.temperature,
    mesh=mesh,
  )
  sample_seconds = time.perf_counter() - t0
  pixels = images.to_uint8(samples)  # what a saved sample would hold
  quantised = pixels.astype(np.float32) / np.float32(127.5) - 1
  feats, logits = metrics.compute_features(
    net, quantised, mesh, batch_size=config.eval.batch_size, progress=False
  )
  stats = metrics.feature_stats(feats)
  fd = metrics.frechet_distance(stats, ref_stats)
  is_mean, is_std = metrics.inception_score(logits, num_splits=min(10, num_samples))
  result = {
    "metric": "fid",
    "workdir": str(workdir),
    "step": step,
    "params": params,
    "sampler": sampler,
    "steps": steps,
    "eta": eta,
    "seed": seed,
    "num_samples": num_samples,
    "features": net.name,
    "reference": f"{config.data.name}:{split}",
    "fd": float(fd),
    "is_mean": float(is_mean),
    "is_std": float(is_std),
    "sample_seconds": round(sample_seconds, 1),
    "seconds": round(time.perf_counter() - start_time, 1),
  }
  out_dir = Path(workdir) / "eval" if out is None else (Path(out) if out else None)
  if out_dir is not None and jax.process_index() == 0:
    stem = f"fid_{sampler}{steps}_n{num_samples}_step{step}_{params}_{net.name}"
    stem = _slug(stem)
    result["files"] = [str(out_dir / f"{stem}.{ext}") for ext in ("json", "png")]
    with files.atomic_path(out_dir / f"{stem}.json") as p:
      p.write_text(json.dumps(result) + "\n")
    with files.atomic_path(out_dir / f"{stem}.png") as p:
      images.save_png(images.make_grid(pixels[:64]), p)
  return result


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> dict[str, Any]:
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m jaxdiff.evaluate",
    description="Evaluate a training run: bits/dim on a split, or FD/IS of its samples.",
  )
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--metric", required=True, choices=METRICS)
  parser.add_argument("--split", default=None, help="data split (default: config.eval.split)")
  parser.add_argument("--checkpoint_step", type=int, default=None, help="default: the newest")
  parser.add_argument("--params", default="ema", choices=trainer.PARAMS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=None)
  parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/eval)")
  bpd = parser.add_argument_group("bpd")
  bpd.add_argument(
    "--num_examples", type=int, default=None, help="first N examples (0 = all; default: config)"
  )
  bpd.add_argument("--t_chunk", type=int, default=100, help="timesteps per compiled scan")
  fid = parser.add_argument_group("fid")
  fid.add_argument("--num_samples", type=int, default=10_000)
  fid.add_argument("--sampler", default=None, help=f"one of {', '.join(sampling.SAMPLERS)}")
  fid.add_argument("--steps", type=int, default=None)
  fid.add_argument("--eta", type=float, default=None)
  fid.add_argument("--features", default="classifier", choices=features.FEATURE_KINDS)
  fid.add_argument("--features_path", default=None, help="the feature network's weight file")
  fid.add_argument("--cache_dir", default=None, help=f"default: $JAXDIFF_CACHE or {DEFAULT_CACHE}")
  args = parser.parse_args(argv)

  common = dict(
    split=args.split,
    seed=args.seed,
    batch_size=args.batch_size,
    checkpoint_step=args.checkpoint_step,
    params=args.params,
    out=args.out,
  )
  if args.metric == "bpd":
    result = bits_per_dim(
      args.workdir, num_examples=args.num_examples, t_chunk=args.t_chunk, **common
    )
    result.pop("terms")
    result.pop("per_example_bpd")
  else:
    result = sample_quality(
      args.workdir,
      num_samples=args.num_samples,
      sampler=args.sampler,
      steps=args.steps,
      eta=args.eta,
      features=args.features,
      features_path=args.features_path,
      cache=args.cache_dir,
      **common,
    )
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  parallel.use_all_cpu_cores()  # before anything touches a device
  parallel.maybe_initialize_distributed()
  main()
