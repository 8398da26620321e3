"""The Fashion-MNIST quality study in the README: likelihood and sample quality of the
``fashion_mnist_ddpm`` config (the README's main job until 2026-12-01) on this machine, versus
training time, sampler and EMA.

Run from the repository root (the run's checkpoints are reused if ``--workdir`` holds them)::

  python benchmarks/study_fashion_mnist.py --workdir runs/study_fashion_mnist

What it does, in order, with every number from ``jaxdiff.evaluation``'s evaluators:

1. Trains ``configs/fashion_mnist_ddpm.py`` into ``--workdir``, keeping a checkpoint every
   ``--checkpoint_every`` steps; skipped if the run is complete.
2. Gets the feature network: jaxdiff's Fashion-MNIST classifier from the cache (this script
   trains it first if it is not there, as ``--train_classifier`` does; its test accuracy is
   recorded).
3. The *data floor*: the Fréchet distance of ``--fd_samples`` real training images to the test
   set's statistics. A perfect model would score about this at that sample count, because the
   distance is biased upwards at small N.
4. Versus training time: at each of ``--bpd_steps`` checkpoints, test bits/dim on the first
   ``--bpd_examples`` test images (full bound, T = 1000 terms); at each of ``--fd_steps``,
   the classifier-FD of ``--fd_samples`` DPM-Solver++(2M) 20-step samples; both with the EMA
   and with the raw parameters. The same examples, noise and sampling seed are used everywhere,
   so differences between checkpoints and between EMA and raw are paired comparisons.
5. Versus sampler: at the last checkpoint (EMA), DDPM 1000, DDIM 50/100 and DPM++ 10/20 steps,
   ``--fd_samples`` each, same seed; with the sampling time.

Writes ``OUT/study.json`` (every record), ``OUT/training.png``, ``OUT/samplers.png``,
``OUT/bpd_terms.png`` (the bound's terms over t at the last ``--bpd_steps``, EMA) and
``OUT/samples.png`` (64 samples of each sampler, side by side), and
prints the README's tables. Default OUT is ``benchmarks/results/fashion_mnist``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for configs/

from jaxdiff import parallel  # noqa: E402

SAMPLERS = (("ddpm", 1000), ("ddim", 100), ("ddim", 50), ("dpm++2m", 20), ("dpm++2m", 10))


def _parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/study_fashion_mnist")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fashion_mnist"))
  p.add_argument("--checkpoint_every", type=int, default=100)
  p.add_argument("--bpd_steps", default="200,700,1300", help="checkpoints for bits/dim")
  p.add_argument("--fd_steps", default="100,200,400,700,1000,1300", help="checkpoints for FD")
  p.add_argument("--bpd_examples", type=int, default=32)
  p.add_argument("--fd_samples", type=int, default=256)
  p.add_argument("--skip_samplers", action="store_true", help="only the training-time part")
  p.add_argument("--cache_dir", default=None)
  p.add_argument(
    "--manual_dir", default="../shared/data/fashion_mnist", help="the official raw files"
  )
  return p.parse_args(argv)


def _steps(text: str) -> list[int]:
  return [int(s) for s in text.split(",") if s]


def _train(workdir: Path, checkpoint_every: int, manual_dir: str) -> None:
  from configs import fashion_mnist_ddpm
  from jaxdiff import training
  from jaxdiff.io import checkpoints

  config = fashion_mnist_ddpm.get_config()
  config.data.manual_dir = manual_dir
  config.training.checkpoint_every = checkpoint_every
  config.training.keep_checkpoints = config.training.num_steps // checkpoint_every + 1
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  latest = ckpt.latest_step()
  ckpt.close()
  if latest == config.training.num_steps:
    print(f"{workdir}: trained to step {latest}, reusing it", flush=True)
    return
  training.train(config, workdir)


def _minutes_at(workdir: Path) -> dict[int, float]:
  """Cumulative training minutes at each logged step, from the logged throughput."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  total, prev, out = 0.0, 0, {}
  for r in records:
    total += (r["step"] - prev) * 64 / r["img_per_sec"] / 60  # 64 = the config's batch size
    prev = r["step"]
    out[r["step"]] = round(total, 1)
  return out


def _classifier(config, cache):
  """The dataset's default classifier (trained first if missing) and its metadata."""
  from jaxdiff import evaluation
  from jaxdiff.training import classifier as classifier_training

  path = evaluation.default_classifier_path(config.data, cache)
  if not path.is_file():
    print(f"no classifier at {path}: training one", flush=True)
    classifier_training.train(config, path)
  _, meta = evaluation.classifier.load(path)
  return evaluation.feature_net("classifier", path, config.data, cache), meta


def _data_floor(config, net, reference, n: int) -> float:
  from jaxdiff import data, evaluation

  real = data.read_examples(config.data, "train", n)  # uint8, scaled as samples are
  feats, _ = evaluation.compute_features(net, real, batch_size=config.eval.batch_size)
  return evaluation.frechet_distance(evaluation.feature_stats(feats), reference)


def _fid(run, params: str, net, reference, n: int, sampler: str, steps: int, out: Path) -> dict:
  """Sample quality of ``n`` samples, with the record and sample grid written into ``out``."""
  from jaxdiff import evaluation

  record = evaluation.sample_quality(
    run.sample_fn(params, sampler=sampler, steps=steps),
    net,
    reference,
    num_samples=n,
    batch_size=run.config.eval.batch_size,
    mesh=run.mesh,
  )
  context = {"step": run.step, "params": params, "sampler": sampler, "steps": steps}
  record = {"metric": "fid", **context, **record}
  record["files"] = evaluation.write_fid(out, record)
  return record


def _bpd(run, params: str, images, out: Path) -> dict:
  """Test bits/dim of ``images``, with the record, terms and plot written into ``out``."""
  from jaxdiff import evaluation

  record = evaluation.bits_per_dim(
    run.diffusion, run.model_fn(params), images, batch_size=len(images),
    clip_denoised=run.config.eval.clip_denoised, mesh=run.mesh,
  )  # fmt: skip
  record = {"metric": "bpd", "step": run.step, "params": params, "split": "test", **record}
  record["files"] = evaluation.write_bpd(out, record)
  return record


def _training_rows(args, workdir: Path, out: Path, study: dict, net, reference, minutes) -> None:
  """Step 4 of the module docstring: bits/dim and FD versus training time, EMA and raw."""
  from jaxdiff import data
  from jaxdiff.run import load_run

  eval_dir = workdir / "eval"
  bpd_steps, fd_steps = _steps(args.bpd_steps), _steps(args.fd_steps)
  images = None
  for step in sorted(set(bpd_steps) | set(fd_steps)):
    run = load_run(workdir, step)
    if images is None:
      images = data.read_examples(run.config.data, "test", args.bpd_examples)
    per_example = {}
    for params in ("ema", "raw"):
      row = {"step": step, "minutes": minutes.get(step), "params": params}
      if step in fd_steps:
        fid = _fid(run, params, net, reference, args.fd_samples, "dpm++2m", 20, eval_dir)
        row.update(fd=fid["fd"], is_mean=fid["is_mean"])
      if step in bpd_steps:
        bpd = _bpd(run, params, images, eval_dir)
        row.update(bpd=bpd["bpd"], bpd_stderr=bpd["bpd_stderr"], bpd_seconds=bpd["seconds"])
        per_example[params] = bpd["per_example_bpd"]
        if params == "ema":
          shutil.copyfile(bpd["files"][2], out / "bpd_terms.png")  # the last one stays
      if params == "raw" and len(per_example) == 2:
        # Paired: the same images and noise, so the difference is far sharper than either.
        diff = per_example["ema"] - per_example["raw"]
        row.update(
          bpd_ema_minus_raw=float(diff.mean()),
          bpd_ema_minus_raw_stderr=float(diff.std(ddof=1) / len(diff) ** 0.5),
        )
      print(json.dumps(row), flush=True)
      study["training"].append(row)
      _save(out, study)


def main(argv: list[str] | None = None) -> None:
  args = _parse(argv)
  workdir, out = Path(args.workdir), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  from jaxdiff import evaluation
  from jaxdiff.run import load_run

  started = time.perf_counter()
  _train(workdir, args.checkpoint_every, args.manual_dir)
  minutes = _minutes_at(workdir)
  run = load_run(workdir)
  config = run.config
  net, meta = _classifier(config, args.cache_dir)
  reference, _ = evaluation.reference_stats(
    net, config.data, split="test", cache_dir=evaluation.cache_dir(args.cache_dir)
  )
  study: dict = {
    "config": "configs/fashion_mnist_ddpm.py",
    "devices": f"{parallel.make_mesh().size} x {_device_kind()}",
    "features": net.name,
    "classifier_test_accuracy": meta.get("test_accuracy"),
    "fd_samples": args.fd_samples,
    "bpd_examples": args.bpd_examples,
    "data_floor_fd": _data_floor(config, net, reference, args.fd_samples),
    "training": [],
    "samplers": [],
  }
  print(f"data floor FD at N={args.fd_samples}: {study['data_floor_fd']:.3f}", flush=True)
  _training_rows(args, workdir, out, study, net, reference, minutes)

  for sampler, steps in () if args.skip_samplers else SAMPLERS:
    fid = _fid(run, "ema", net, reference, args.fd_samples, sampler, steps, workdir / "eval")
    row = {
      "sampler": sampler,
      "steps": steps,
      "fd": fid["fd"],
      "is_mean": fid["is_mean"],
      "sample_seconds": fid["sample_seconds"],
      "grid": fid["files"][1],
    }
    print(json.dumps(row), flush=True)
    study["samplers"].append(row)
    _save(out, study)

  study["step"] = run.step
  study["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
  _save(out, study)
  plot(study, out)
  print(tables(study))


def _device_kind() -> str:
  import jax

  return jax.devices()[0].device_kind


def _save(out: Path, study: dict) -> None:
  tmp = out / "study.json.tmp"
  tmp.write_text(json.dumps(study, indent=1) + "\n")
  tmp.replace(out / "study.json")


def plot(study: dict, out: Path) -> None:
  """``training.png`` (bits/dim and FD over training, EMA vs raw) and ``samplers.png``."""
  import numpy as np
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.6), dpi=120)
  axes = fig.subplots(1, 2)
  for params, style in (("ema", "-o"), ("raw", "--s")):
    rows = [r for r in study["training"] if r["params"] == params]
    b = [r for r in rows if "bpd" in r]
    axes[0].errorbar(
      [r["step"] for r in b],
      [r["bpd"] for r in b],
      yerr=[r["bpd_stderr"] for r in b],
      fmt=style,
      capsize=3,
      label=params.upper() if params == "ema" else "raw",
    )
    f = [r for r in rows if "fd" in r]
    axes[1].plot(
      [r["step"] for r in f],
      [r["fd"] for r in f],
      style,
      label=params.upper() if params == "ema" else "raw",
    )
  axes[0].set_ylabel(f"test bits/dim (first {study['bpd_examples']} images)")
  axes[1].axhline(study["data_floor_fd"], color="gray", ls=":", label="real data, same N")
  axes[1].set_ylabel(f"classifier FD, DPM++ 20 steps, N={study['fd_samples']}")
  axes[1].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("training step (batch 64)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    secondary = ax.secondary_xaxis("top", functions=_step_minutes(study))
    secondary.set_xlabel("training minutes (this CPU)", fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "training.png")

  if not study["samplers"]:
    return
  fig = Figure(figsize=(5.5, 3.6), dpi=120)
  ax = fig.subplots()
  for r in study["samplers"]:
    ax.scatter(r["steps"], r["fd"], s=30)
    ax.annotate(
      f"{r['sampler']} {r['steps']}\n{r['sample_seconds']:.0f} s",
      (r["steps"], r["fd"]),
      fontsize=7,
      xytext=(4, 4),
      textcoords="offset points",
    )
  ax.axhline(study["data_floor_fd"], color="gray", ls=":", label="real data, same N")
  ax.set_xscale("log")
  ax.set_xlabel("sampler steps (model evaluations)")
  ax.set_ylabel(f"classifier FD, N={study['fd_samples']}")
  ax.set_title(f"step {study.get('step')}, EMA parameters", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "samplers.png")

  from PIL import Image

  rows = study["samplers"]
  fig = Figure(figsize=(2.2 * len(rows), 2.5), dpi=120)
  axes = fig.subplots(1, len(rows))
  for ax, r in zip(np.atleast_1d(axes), rows, strict=True):
    ax.imshow(np.asarray(Image.open(r["grid"])), cmap="gray")
    ax.set_title(f"{r['sampler']} {r['steps']}: FD {r['fd']:.1f}", fontsize=8)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out / "samples.png")


def _step_minutes(study: dict):
  import numpy as np

  rows = sorted({(r["step"], r["minutes"]) for r in study["training"] if r["minutes"]})
  steps = np.array([0] + [s for s, _ in rows], float)
  mins = np.array([0] + [m for _, m in rows], float)
  return (lambda s: np.interp(s, steps, mins), lambda m: np.interp(m, mins, steps))


def tables(study: dict) -> str:
  """The README's markdown tables."""
  lines = [
    "| step | minutes | bits/dim EMA | bits/dim raw | EMA − raw (paired) | FD EMA | FD raw |",
    "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  by_step: dict[int, dict] = {}
  for r in study["training"]:
    by_step.setdefault(r["step"], {"minutes": r["minutes"]})[r["params"]] = r

  def cell(r, key, err=None):
    if r is None or key not in r:
      return ""
    return f"{r[key]:.3f} ± {r[err]:.3f}" if err else f"{r[key]:.2f}"

  for step, r in sorted(by_step.items()):
    ema, raw = r.get("ema"), r.get("raw")
    lines.append(
      f"| {step} | {r['minutes'] or '':} | {cell(ema, 'bpd', 'bpd_stderr')} | "
      f"{cell(raw, 'bpd', 'bpd_stderr')} | "
      f"{cell(raw, 'bpd_ema_minus_raw', 'bpd_ema_minus_raw_stderr')} | "
      f"{cell(ema, 'fd')} | {cell(raw, 'fd')} |"
    )
  lines += ["", "| sampler | steps | FD | IS | seconds |", "|---|---:|---:|---:|---:|"]
  for r in study["samplers"]:
    lines.append(
      f"| {r['sampler']} | {r['steps']} | {r['fd']:.2f} | {r['is_mean']:.2f} | "
      f"{r['sample_seconds']:.0f} |"
    )
  lines.append(
    f"\ndata floor (real train images vs test, N={study['fd_samples']}): "
    f"{study['data_floor_fd']:.2f}"
  )
  return "\n".join(lines)


if __name__ == "__main__":
  parallel.use_all_cpu_cores()
  main()
