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

denoising-diffusion-pytorch imports torchvision and pytorch-fid at import time;
neither is needed to train, and neither has a CPU build here, so the torch worker
puts small stand-ins for both on its path. To set the torch side up:

  pip install torch==2.13.0 && pip install --no-deps denoising-diffusion-pytorch \\
      && pip install accelerate ema-pytorch einops scipy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH, SIZE = 64, 28


def _median_step_time(step, n: int) -> float:
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# ----------------------------------------------------------------------------- jax worker


def jax_worker(steps: int) -> dict:
  sys.path.insert(0, str(ROOT))
  from jaxdiff import parallel

  parallel.use_all_cpu_cores()
  import jax
  import jax.numpy as jnp

  from configs import fashion_mnist
  from jaxdiff import models, training

  config = fashion_mnist.get_config()
  config.training.batch_size = BATCH
  mesh = parallel.make_mesh()
  graphdef, abstract_params, optimizer, diffusion = training.build(config)
  abstract = jax.eval_shape(lambda k: training.init_state(config, optimizer, k), jax.random.key(0))
  shardings = parallel.state_sharding(mesh, abstract)
  state = jax.jit(lambda k: training.init_state(config, optimizer, k), out_shardings=shardings)(
    jax.random.key(0)
  )
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
  t = _median_step_time(step, steps)

  # Large matmuls on the same devices, one per device: what XLA's CPU backend does at best.
  n = 2048
  a = jax.device_put(jnp.ones((mesh.size, n, n), jnp.float32), parallel.batch_sharding(mesh))
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t_mm = _median_step_time(lambda: mm(a).block_until_ready(), 10)
  return {
    "img_s": BATCH / t,
    "params": models.count_params(abstract_params),
    "devices": mesh.size,
    "step_gflops": flops / 1e9,
    "achieved_gflop_s": flops / t / 1e9,
    "matmul_gflop_s": mesh.size * 2 * n**3 / t_mm / 1e9,
  }


# ----------------------------------------------------------------------------- torch worker

_STANDINS = {
  "torchvision/__init__.py": "import types\ntransforms = types.SimpleNamespace()\n"
  "utils = types.SimpleNamespace()\n",
  "pytorch_fid/__init__.py": "",
  "pytorch_fid/inception.py": "class InceptionV3:\n  pass\n",
}


def torch_worker(steps: int, target_params: int) -> dict:
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  from denoising_diffusion_pytorch import GaussianDiffusion, Unet

  def build(dim):
    return Unet(dim=dim, dim_mults=(1, 2, 2), channels=1, flash_attn=False)

  def count(m):
    return sum(p.numel() for p in m.parameters())

  # GroupNorm(8) needs dim % 8 == 0: the multiple of 8 nearest in parameters.
  dim = min(range(8, 129, 8), key=lambda d: abs(count(build(d)) - target_params))
  unet = build(dim)
  diffusion = GaussianDiffusion(unet, image_size=SIZE, timesteps=1000, objective="pred_noise")
  opt = torch.optim.Adam(diffusion.parameters(), lr=2e-4)
  x = torch.rand(BATCH, 1, SIZE, SIZE)  # its forward maps [0, 1] to [-1, 1] itself

  def step():
    loss = diffusion(x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(3):
    step()
  t = _median_step_time(step, steps)
  return {"img_s": BATCH / t, "params": count(unet), "dim": dim, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def _run(cmd, env=None) -> dict:
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode != 0:
    raise RuntimeError(f"{cmd[2:]} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--torch_python", default=sys.executable, help="interpreter with torch")
  p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--target_params", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker == "jax":
    print(json.dumps(jax_worker(args.steps)))
    return
  if args.worker == "torch":
    print(json.dumps(torch_worker(args.steps, args.target_params)))
    return

  me = str(Path(__file__).resolve())
  standins = Path(tempfile.mkdtemp(prefix="bench_standins_"))
  for rel, text in _STANDINS.items():
    (standins / rel).parent.mkdir(parents=True, exist_ok=True)
    (standins / rel).write_text(text)
  torch_env = dict(os.environ, PYTHONPATH=str(standins), OMP_WAIT_POLICY="PASSIVE")
  has_torch = (
    subprocess.run(
      [args.torch_python, "-c", "import torch, denoising_diffusion_pytorch"],
      env=torch_env, capture_output=True,
    ).returncode == 0
  )  # fmt: skip

  rows = []
  for r in range(args.rounds):
    j = _run([sys.executable, me, "--worker", "jax", "--steps", str(args.steps)])
    t = None
    if has_torch:
      t = _run(
        [args.torch_python, me, "--worker", "torch", "--steps", str(args.steps),
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
