"""Shared pieces of the benchmarks: timing, worker processes, the PyTorch baseline.

The baseline is lucidrains' denoising-diffusion-pytorch (``Unet`` + ``GaussianDiffusion``),
sized to the parameter count of the jaxdiff model it is compared with. It imports
torchvision and pytorch-fid at import time; neither is needed to train or sample, and
neither has a CPU build here, so its worker gets small stand-ins for both on its path.
To set the torch side up:

  pip install torch==2.13.0 && pip install --no-deps denoising-diffusion-pytorch \\
      && pip install accelerate ema-pytorch einops scipy
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_STANDINS = {
  "torchvision/__init__.py": "import types\ntransforms = types.SimpleNamespace()\n"
  "utils = types.SimpleNamespace()\n",
  "pytorch_fid/__init__.py": "",
  "pytorch_fid/inception.py": "class InceptionV3:\n  pass\n",
}


def median_time(fn, n: int) -> float:
  """Median wall time of ``n`` calls of ``fn`` (which must block until done)."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run_worker(cmd: list[str], env: dict | None = None) -> dict:
  """Runs a worker process; its last stdout line is a JSON result."""
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode != 0:
    raise RuntimeError(f"{cmd[1:]} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def torch_env() -> dict:
  """The environment for a torch worker: stand-ins on the path, OpenMP threads that sleep."""
  standins = Path(tempfile.mkdtemp(prefix="bench_standins_"))
  for rel, text in _STANDINS.items():
    (standins / rel).parent.mkdir(parents=True, exist_ok=True)
    (standins / rel).write_text(text)
  return dict(os.environ, PYTHONPATH=str(standins), OMP_WAIT_POLICY="PASSIVE")


def has_torch(python: str, env: dict) -> bool:
  probe = [python, "-c", "import torch, denoising_diffusion_pytorch"]
  return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def lucidrains_diffusion(target_params: int, image_size: int, **diffusion_kwargs):
  """``(GaussianDiffusion, Unet)`` whose Unet has the parameter count nearest the target."""
  import torch
  from denoising_diffusion_pytorch import GaussianDiffusion, Unet

  torch.set_num_threads(os.cpu_count() or 1)

  def build(dim):
    return Unet(dim=dim, dim_mults=(1, 2, 2), channels=1, flash_attn=False)

  def count(m):
    return sum(p.numel() for p in m.parameters())

  # GroupNorm(8) needs dim % 8 == 0: the multiple of 8 nearest in parameters.
  dim = min(range(8, 129, 8), key=lambda d: abs(count(build(d)) - target_params))
  unet = build(dim)
  diffusion = GaussianDiffusion(
    unet, image_size=image_size, timesteps=1000, objective="pred_noise", **diffusion_kwargs
  )
  return diffusion, {"params": count(unet), "dim": dim, "threads": torch.get_num_threads()}


def jax_fashion_model(batch_size: int):
  """The ``fashion_mnist_ddpm`` config's model and train state on all CPU cores (a DDPM, as
  denoising-diffusion-pytorch's is)."""
  import sys

  sys.path.insert(0, str(ROOT))
  from jaxdiff import parallel

  parallel.use_all_cpu_cores()
  import jax

  from configs import fashion_mnist_ddpm
  from jaxdiff import training

  config = fashion_mnist_ddpm.get_config()
  config.training.batch_size = batch_size
  mesh = parallel.make_mesh()
  graphdef, abstract_params, optimizer, diffusion = training.build(config)
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  return config, mesh, graphdef, abstract_params, optimizer, diffusion, shardings, state


# ----------------------------------------------------------------------------- torch workers
# Run as ``python baseline.py train|ddim ...`` under an interpreter with torch (no JAX needed).


def torch_train(batch: int, size: int, steps: int, target_params: int) -> dict:
  """Images/s of denoising-diffusion-pytorch's training step (Adam, eps loss)."""
  import torch

  diffusion, info = lucidrains_diffusion(target_params, size)
  opt = torch.optim.Adam(diffusion.parameters(), lr=2e-4)
  x = torch.rand(batch, 1, size, size)  # its forward maps [0, 1] to [-1, 1] itself

  def step():
    loss = diffusion(x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(3):
    step()
  return {"img_s": batch / median_time(step, steps), **info}


def torch_ddim(batch: int, size: int, steps: int, target_params: int) -> dict:
  """Images/s of denoising-diffusion-pytorch's DDIM sampler (eta 0) with ``steps`` steps."""
  import torch

  diffusion, info = lucidrains_diffusion(
    target_params, size, sampling_timesteps=steps, ddim_sampling_eta=0.0
  )
  diffusion.eval()

  def run():
    with torch.no_grad():
      diffusion.sample(batch_size=batch)

  run()
  return {"img_s": batch / median_time(run, 3), **info}


if __name__ == "__main__":
  import argparse

  p = argparse.ArgumentParser(description="denoising-diffusion-pytorch timing worker")
  p.add_argument("what", choices=["train", "ddim"])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--size", type=int, default=28)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--target_params", type=int, required=True)
  a = p.parse_args()
  worker = torch_train if a.what == "train" else torch_ddim
  print(json.dumps(worker(a.batch, a.size, a.steps, a.target_params)))
