"""The noise-process study in the README (issue 15, item 8): the DDPM recipe (the README main
job's until 2026-12-01) against v-prediction with min-SNR, EDM, VDM and flow matching, each
trained on the main job's budget. Flow matching won on FD and is the main job's recipe now.

Run from the repository root; a recipe whose run is complete is reused, one that is not is
trained (or resumed) first, and a recipe already measured in ``OUT/study.json`` (same step and
sizes) is not measured again unless ``--redo``, so the study can be built up over several
sittings, one recipe at a time::

  python benchmarks/study_processes.py --root runs/study_processes            # all recipes
  python benchmarks/study_processes.py --root runs/study_processes --recipes ddpm,flow

Every recipe is ``configs/fashion_mnist_ddpm.py`` (1.6M-parameter U-Net, 1,300 steps of batch
64, the same optimiser, EMA and seed) with the overrides of :data:`RECIPES`, so the only
difference is the noise process and its loss (the flow recipe is ``configs/fashion_mnist.py``).
For each, with the EMA parameters of the last checkpoint:

1. sample quality: the classifier Fréchet distance (the Fashion-MNIST classifier's features, as
   in the README's other studies) of ``--fd_samples`` samples, for each of the recipe's samplers
   at a comparable number of model evaluations, same seed; the best is the recipe's row;
2. likelihood: bits/dim of the first ``--bpd_examples`` test images by the probability-flow ODE
   (``jaxdiff.evaluation.ode_bpd``; the same images, dequantisation and probes for every
   recipe, so the comparison is paired: the table gives each recipe's per-image difference from
   DDPM's; ``--redo_ode`` measures it again for recipes already measured), and the
   recipe's own variational bound where it has one
   (ddpm's T-term bound on ``--bound_examples`` images; VDM's continuous-time bound);
3. time per training step: the jitted train steps of all recipes timed round-robin in this one
   process (``--time_rounds`` rounds of ``--time_steps`` steps each; medians), so the ratios are
   paired on the same machine state. This runs once every recipe has its row (or with
   ``--time``), over all of them.

Writes ``OUT/study.json`` (every record), ``OUT/samples.png`` (64 samples of each recipe's best
sampler) and ``OUT/fd.png``, and prints the README's table. Default OUT is
``benchmarks/results/processes``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for configs/

from jaxdiff import parallel  # noqa: E402

# name -> (config overrides, [(sampler, steps), ...] at ~20-40 model evaluations)
RECIPES: dict[str, tuple[dict[str, object], list[tuple[str, int]]]] = {
  "ddpm": ({}, [("dpm++2m", 20), ("ddim", 40)]),
  "v_minsnr": (
    {"diffusion.mean_type": "v", "diffusion.min_snr_gamma": 5.0},
    [("dpm++2m", 20), ("ddim", 40)],
  ),
  "edm": ({"diffusion.process": "edm"}, [("heun", 18), ("dpm++2m", 20)]),
  "vdm": ({"diffusion.process": "vdm"}, [("dpm++2m", 20), ("vdm_ddim", 40)]),
  "flow": (
    {"diffusion.process": "flow", "diffusion.t_sampler": "logit_normal"},
    [("heun", 18), ("dpm++2m", 20), ("euler", 36)],
  ),
}
LABELS = {
  "ddpm": "DDPM, eps, uniform t (the main job until 2026-12-01)",
  "v_minsnr": "DDPM, v-prediction, min-SNR-5 weighting",
  "edm": "EDM (preconditioning, log-normal sigma)",
  "vdm": "VDM (learned schedule, continuous-time bound)",
  "flow": "flow matching, logit-normal t (the README main job)",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default="runs/study_processes", help="one workdir per recipe inside")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "processes"))
  p.add_argument("--recipes", default=",".join(RECIPES))
  p.add_argument("--fd_samples", type=int, default=1000)
  p.add_argument("--bpd_examples", type=int, default=100)
  p.add_argument("--bound_examples", type=int, default=32, help="ddpm's T-term bound (slow)")
  p.add_argument("--ode_steps", type=int, default=32, help="RK4 steps in ln sigma")
  p.add_argument("--time_rounds", type=int, default=5)
  p.add_argument("--time_steps", type=int, default=5)
  p.add_argument("--num_steps", type=int, default=None, help="override the training steps")
  p.add_argument("--redo", action="store_true", help="measure recipes already in study.json")
  p.add_argument(
    "--redo_ode", action="store_true", help="only the ODE bits/dim of measured recipes, again"
  )
  p.add_argument("--time", action="store_true", help="time the train steps now")
  p.add_argument("--cache_dir", default=None)
  p.add_argument("--manual_dir", default="../shared/data/fashion_mnist")
  return p.parse_args(argv)


def recipe_config(name: str, args: argparse.Namespace):
  from configs import fashion_mnist_ddpm

  config = fashion_mnist_ddpm.get_config()
  config.data.manual_dir = args.manual_dir
  for dotted, value in RECIPES[name][0].items():
    section, key = dotted.split(".")
    config[section][key] = value
  if config.diffusion.process != "ddpm":
    # DDPM's sampler (ddim) is not one of every process: the samples drawn during training use
    # the recipe's first. So the flow recipe is configs/fashion_mnist.py, the main job.
    config.sampling.sampler, config.sampling.num_steps = RECIPES[name][1][0]
  if args.num_steps:
    config.training.num_steps = args.num_steps
  return config


def _train(name: str, args: argparse.Namespace) -> Path:
  from jaxdiff import training
  from jaxdiff.io import checkpoints

  workdir = Path(args.root) / name
  config = recipe_config(name, args)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  latest = ckpt.latest_step()
  ckpt.close()
  if latest != config.training.num_steps:
    print(f"{name}: training {workdir} (at step {latest})", flush=True)
    training.train(config, workdir)
  return workdir


def _fd(run, net, reference, n: int, sampler: str, steps: int, out: Path) -> dict:
  from jaxdiff import evaluation

  record = evaluation.sample_quality(
    run.sample_fn("ema", sampler=sampler, steps=steps),
    net,
    reference,
    num_samples=n,
    batch_size=run.config.eval.batch_size,
    mesh=run.mesh,
  )
  context = {"step": run.step, "params": "ema", "sampler": sampler, "steps": steps}
  record = {"metric": "fd", **context, **record}
  record["files"] = evaluation.write_fid(out, record)
  return record


def _ode_bpd(run, images, steps: int) -> dict:
  from jaxdiff.core import process as process_lib
  from jaxdiff.evaluation import ode_bpd

  view = process_lib.sigma_view(run.diffusion, run.model_fn("ema"))
  record = ode_bpd.ode_bits_per_dim(
    view, images, batch_size=len(images), num_steps=steps, mesh=run.mesh
  )
  record["per_example_bpd"] = [float(b) for b in record["per_example_bpd"]]  # for paired diffs
  return record


def _own_bound(name: str, run, images) -> dict | None:
  """The recipe's own variational bound, where it has one."""
  from jaxdiff import evaluation

  if run.config.diffusion.process == "ddpm":
    record = evaluation.bits_per_dim(
      run.diffusion, run.model_fn("ema"), images, batch_size=len(images), mesh=run.mesh
    )
    return {"bound": "ddpm T-term", "bpd": record["bpd"], "bpd_stderr": record["bpd_stderr"]}
  if run.config.diffusion.process == "vdm":
    record = evaluation.vdm_bits_per_dim(
      run.diffusion, run.model_fn("ema"), images, batch_size=len(images), num_t=8, mesh=run.mesh
    )
    return {"bound": "vdm continuous", "bpd": record["bpd"], "bpd_stderr": record["bpd_stderr"]}
  return None


def _step_times(names: list[str], args: argparse.Namespace) -> dict[str, float]:
  """Median seconds per train step of each recipe, timed round-robin in this process."""
  import jax

  from jaxdiff import training

  mesh = parallel.make_mesh()
  steps, batch = {}, None
  for name in names:
    config = recipe_config(name, args)
    graphdef, _, optimizer, diffusion = training.build(config)
    shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
    state = training.create_state(config, optimizer, jax.random.key(0), shardings)
    fn = training.jit_train_step(
      training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
    )
    if batch is None:
      rng = np.random.default_rng(0)
      size, b = config.data.image_size, config.training.batch_size
      images = rng.uniform(-1, 1, (b, size, size, config.data.channels)).astype(np.float32)
      batch = parallel.global_batch(mesh, {"image": images, "label": np.zeros(b, np.int32)})
    state, metrics = fn(state, batch, jax.random.key(1))  # compile
    jax.block_until_ready(metrics)
    steps[name] = [fn, state]
  times: dict[str, list[float]] = {n: [] for n in names}
  for _ in range(args.time_rounds):
    for name in names:
      fn, state = steps[name]
      start = time.perf_counter()
      for i in range(args.time_steps):
        state, metrics = fn(state, batch, jax.random.key(i))
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / args.time_steps)
      steps[name][1] = state
  return {n: float(np.median(t)) for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
  args = _parse(argv)
  names = [n for n in args.recipes.split(",") if n]
  unknown = sorted(set(names) - set(RECIPES))
  if unknown:
    raise SystemExit(f"unknown recipes {unknown}; allowed: {', '.join(RECIPES)}")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  from jaxdiff import data, evaluation
  from jaxdiff.run import load_run

  study = _load(out)
  for name in names:
    workdir = _train(name, args)
    run = load_run(workdir)
    if not args.redo and _measured(study, name, run.step, args):
      if args.redo_ode:
        images = data.read_examples(run.config.data, "test", args.bpd_examples)
        row = {**study["recipes"][name], "ode_bpd": _ode_bpd(run, images, args.ode_steps)}
        study = _save_row(out, name, row)
      print(f"{name}: measured at step {run.step} already (--redo measures again)", flush=True)
      continue
    net = evaluation.feature_net("classifier", None, run.config.data, args.cache_dir)
    reference, _ = evaluation.reference_stats(
      net, run.config.data, split="test", cache_dir=evaluation.cache_dir(args.cache_dir)
    )
    images = data.read_examples(run.config.data, "test", args.bpd_examples)
    row = {"label": LABELS[name], "overrides": RECIPES[name][0], "step": run.step, "fd": []}
    for sampler, steps in RECIPES[name][1]:
      rec = _fd(run, net, reference, args.fd_samples, sampler, steps, workdir / "eval")
      row["fd"].append({k: rec[k] for k in ("sampler", "steps", "fd", "is_mean", "sample_seconds")})
      row["fd"][-1]["grid"] = rec["files"][1]
      print(name, json.dumps(row["fd"][-1]), flush=True)
    row["ode_bpd"] = _ode_bpd(run, images, args.ode_steps)
    print(name, "ode bpd", row["ode_bpd"]["bpd"], flush=True)
    own = _own_bound(name, run, images[: args.bound_examples])
    if own:
      row["bound"] = own
    study = _save_row(out, name, row, fd_samples=args.fd_samples, bpd_examples=args.bpd_examples)
  study = _load(out)  # with the rows of any other process measuring other recipes meanwhile
  if args.time or set(study["recipes"]) == set(RECIPES):
    study["seconds_per_step"] = _step_times(list(RECIPES), args)  # needs no trained run
    _save(out, study)
  plot(study, out)
  print(table(study))


def _measured(study: dict, name: str, step: int, args: argparse.Namespace) -> bool:
  row = study["recipes"].get(name)
  return (
    row is not None and row["step"] == step
    and study.get("fd_samples") == args.fd_samples
    and study.get("bpd_examples") == args.bpd_examples
  )  # fmt: skip


def _load(out: Path) -> dict:
  path = out / "study.json"
  return json.loads(path.read_text()) if path.exists() else {"recipes": {}}


def _save_row(out: Path, name: str, row: dict, **settings) -> dict:
  """Writes one recipe's row into ``OUT/study.json`` as it is on disk now, so recipes measured by
  separate processes at once keep each other's rows; returns the study written."""
  study = _load(out)
  study["recipes"][name] = row
  study.update(settings)
  _save(out, study)
  return study


def _save(out: Path, study: dict) -> None:
  tmp = out / f"study.json.{os.getpid()}.tmp"  # each process its own
  tmp.write_text(json.dumps(study, indent=1) + "\n")
  tmp.replace(out / "study.json")


def _rows(study: dict) -> dict[str, dict]:
  """The measured recipes, in the order of :data:`RECIPES`."""
  return {n: study["recipes"][n] for n in RECIPES if n in study["recipes"]}


def _best(row: dict) -> dict:
  return min(row["fd"], key=lambda r: r["fd"])


def table(study: dict) -> str:
  """The README's markdown table."""
  base = study.get("seconds_per_step", {}).get("ddpm")
  lines = [
    "| recipe | best sampler | FD | ODE bits/dim | − DDPM's (paired) | own bound |"
    " s/step (ratio) |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for name, row in _rows(study).items():  # the labels as they read now (which is the main job)
    best = _best(row)
    ode = row["ode_bpd"]
    bound = row.get("bound")
    own = f"{bound['bpd']:.3f} ± {bound['bpd_stderr']:.3f}" if bound else "—"
    sec = study.get("seconds_per_step", {}).get(name)
    time_cell = f"{sec:.2f} ({sec / base:.2f})" if sec and base else ""
    diff = paired_difference(ode, study["recipes"].get("ddpm", {}).get("ode_bpd"))
    diff_cell = "—" if name == "ddpm" else "" if diff is None else f"{diff[0]:+.3f} ± {diff[1]:.3f}"
    label = LABELS.get(name, row["label"])
    lines.append(
      f"| {label} | {best['sampler']} {best['steps']} | {best['fd']:.2f} | "
      f"{ode['bpd']:.3f} ± {ode['bpd_stderr']:.3f} | {diff_cell} | {own} | {time_cell} |"
    )
  return "\n".join(lines)


def paired_difference(ode: dict, base: dict | None) -> tuple[float, float] | None:
  """Mean and standard error of the per-image difference of two ODE bits/dim records (the same
  images, dequantisation and probes), or None without both per-image lists."""
  a, b = (r.get("per_example_bpd") if r else None for r in (ode, base))
  if a is None or b is None or len(a) != len(b) or len(a) < 2:
    return None
  d = np.asarray(a) - np.asarray(b)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def plot(study: dict, out: Path) -> None:
  """``fd.png`` (FD of every recipe and sampler) and ``samples.png`` (each recipe's best)."""
  from matplotlib.figure import Figure
  from PIL import Image

  rows = _rows(study)
  fig = Figure(figsize=(7, 3.6), dpi=120)
  ax = fig.subplots()
  for i, row in enumerate(rows.values()):
    for j, r in enumerate(sorted(row["fd"], key=lambda r: r["fd"])):  # labels stacked upwards
      ax.scatter(i, r["fd"], s=25)
      ax.annotate(f"{r['sampler']} {r['steps']}: {r['fd']:.1f}", (i, r["fd"]), fontsize=7,
                  xytext=(6, -3 + 9 * j), textcoords="offset points")  # fmt: skip
  ax.set_xticks(range(len(rows)), list(rows), fontsize=8)
  ax.set_xlim(-0.3, len(rows) - 0.4)  # room for the last recipe's labels
  ax.set_ylim(bottom=0)
  ax.set_ylabel(f"classifier FD, N={study['fd_samples']} (lower is better)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out / "fd.png")

  fig = Figure(figsize=(2.4 * len(rows), 2.7), dpi=120)
  axes = np.atleast_1d(fig.subplots(1, len(rows)))
  for ax, (name, row) in zip(axes, rows.items(), strict=True):
    best = _best(row)
    ax.imshow(np.asarray(Image.open(best["grid"])), cmap="gray")
    ax.set_title(f"{name}: {best['sampler']} {best['steps']}, FD {best['fd']:.1f}", fontsize=7)
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out / "samples.png")


if __name__ == "__main__":
  parallel.use_all_cpu_cores()
  main()
