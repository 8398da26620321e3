"""Training throughput: jaxdiff's train step against denoising-diffusion-pytorch's.

  python benchmarks/bench_train.py [--rounds 3] [--steps 10] [--torch_python PATH]

Both train a DDPM U-Net of about the same size (jaxdiff's ``fashion_mnist`` model,
and lucidrains' ``Unet`` with the ``dim`` whose parameter count is nearest) on
28x28x1 images at batch 64, eps-prediction with T = 1000, Adam. Each side runs in
its own process (no thread pools fighting), alternating jax, torch, jax, ... for
``--rounds`` pairs; each process compiles/warms up, then times ``--steps`` steps.
Data loading is excluded on both sides (a fixed random batch).

It prints images/s per round, the medians, the ratio of medians and the median of
the per-round ratios, and for jaxdiff the FLOP/s the step achieves (XLA's cost
analysis over the measured time) against a large matmul's on the same machine.

Setting up the torch side: see ``benchmarks/baseline.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # noqa: E402

BATCH, SIZE = 64, 28


def jax_worker(steps: int) -> dict:
  config, mesh, graphdef, abstract_params, optimizer, diffusion, shardings, state = (
    baseline.jax_fashion_model(BATCH)
  )
  import jax
  import jax.numpy as jnp

  from jaxdiff import models, parallel, training

  step_fn = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
    mesh,
    {
      "image": rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 1)).astype(np.float32),
      "label": np.zeros((BATCH,), np.int32),
    },
  )
  key = jax.random.key(1)
  # XLA's cost analysis counts one device's share of the partitioned program.
  flops = mesh.size * step_fn.lower(state, batch, key).compile().cost_analysis().get("flops", 0.0)
  box = [state]

  def step():
    box[0], metrics = step_fn(box[0], batch, key)
    jax.block_until_ready(metrics)

  for _ in range(3):
    step()
  t = baseline.median_time(step, steps)

  # Large matmuls on the same devices, one per device: what XLA's CPU backend does at best.
  n = 2048
  a = jax.device_put(jnp.ones((mesh.size, n, n), jnp.float32), parallel.batch_sharding(mesh))
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t_mm = baseline.median_time(lambda: mm(a).block_until_ready(), 10)
  return {
    "img_s": BATCH / t,
    "params": models.count_params(abstract_params),
    "devices": mesh.size,
    "step_gflops": flops / 1e9,
    "achieved_gflop_s": flops / t / 1e9,
    "matmul_gflop_s": mesh.size * 2 * n**3 / t_mm / 1e9,
  }


# ----------------------------------------------------------------------------- driver


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--torch_python", default=sys.executable, help="interpreter with torch")
  p.add_argument("--worker", choices=["jax"], help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker == "jax":
    print(json.dumps(jax_worker(args.steps)))
    return

  me = str(Path(__file__).resolve())
  torch_env = baseline.torch_env()
  has_torch = baseline.has_torch(args.torch_python, torch_env)

  rows = []
  for r in range(args.rounds):
    j = baseline.run_worker([sys.executable, me, "--worker", "jax", "--steps", str(args.steps)])
    t = None
    if has_torch:
      t = baseline.run_worker(
        [args.torch_python, baseline.__file__, "train", "--steps", str(args.steps),
         "--target_params", str(j["params"])], env=torch_env,
      )  # fmt: skip
    rows.append((j, t))
    line = f"round {r + 1}: jaxdiff {j['img_s']:7.1f} img/s"
    if t:
      ratio = j["img_s"] / t["img_s"]
      line += f"   denoising-diffusion-pytorch {t['img_s']:7.1f} img/s   ratio {ratio:.2f}"
    print(line, flush=True)

  j0 = rows[0][0]
  jax_med = float(np.median([j["img_s"] for j, _ in rows]))
  print(
    f"\njaxdiff: {j0['params']:,} params, {j0['devices']} CPU device(s), batch {BATCH}: "
    f"median {jax_med:.1f} img/s"
  )
  achieved = float(np.median([j["achieved_gflop_s"] for j, _ in rows]))
  matmul = float(np.median([j["matmul_gflop_s"] for j, _ in rows]))
  print(
    f"train step: {j0['step_gflops']:.1f} GFLOP, {achieved:.1f} GFLOP/s achieved; "
    f"2048^2 matmul {matmul:.1f} GFLOP/s; step/matmul = {achieved / matmul:.2f}"
  )
  if not has_torch:
    print("denoising-diffusion-pytorch not importable: no comparison (see the docstring)")
    return
  t0 = rows[0][1]
  torch_med = float(np.median([t["img_s"] for _, t in rows]))
  paired = float(np.median([j["img_s"] / t["img_s"] for j, t in rows]))
  print(
    f"denoising-diffusion-pytorch: Unet(dim={t0['dim']}), {t0['params']:,} params, "
    f"{t0['threads']} threads: median {torch_med:.1f} img/s"
  )
  print(
    f"ratio (jaxdiff / pytorch): {jax_med / torch_med:.2f} of medians, {paired:.2f} median paired"
  )


if __name__ == "__main__":
  main()
