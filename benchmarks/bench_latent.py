"""Time per train step of the pixel model, the autoencoder and the latent models.

  python benchmarks/bench_latent.py [--rounds 3] [--steps 10] [--models NAME ...]

Each of ``configs/fashion_mnist_ddpm.py`` (pixel U-Net), ``fashion_mnist_autoencoder.py``,
``fashion_mnist_latent.py`` (U-Net on 8x8x4 latents), ``fashion_mnist_latent_dit.py`` and
``fashion_mnist_text.py`` (the latent U-Net with cross-attention to 16 MiniLM tokens; random
tokens, the encoder's cost is paid once per caption, not per step) runs its jitted train step on
a fixed random batch of its own shape, at its config's batch size, in its own process on all
CPU cores; they alternate for ``--rounds`` rounds, each process
compiling and warming up before timing ``--steps`` steps. Data loading is excluded (the latent
runs read a cache; the pixel run decodes PNG-free arrays either way). It prints the median time
per step of each and its ratio to the pixel model's: what the README's equal-budget comparison
converts minutes into steps with.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
  "pixel U-Net": "fashion_mnist_ddpm.py",  # the DDPM the latent runs are
  "autoencoder": "fashion_mnist_autoencoder.py",
  "latent U-Net": "fashion_mnist_latent.py",
  "latent DiT": "fashion_mnist_latent_dit.py",
  "latent text U-Net": "fashion_mnist_text.py",
}


def worker(name: str, steps: int) -> dict:
  sys.path.insert(0, str(ROOT))
  from jaxdiff import parallel

  parallel.use_all_cpu_cores()
  import jax

  from jaxdiff import config as config_lib
  from jaxdiff import models, training

  config = config_lib.from_file(ROOT / "configs" / CONFIGS[name])
  if config_lib.is_latent(config):  # the shapes an autoencoder run of the config would give
    ae = config_lib.from_file(ROOT / "configs" / CONFIGS["autoencoder"])
    with config.unlocked():
      config.latent.size = ae.autoencoder.padded_size // 2 ** (len(ae.model.ch_mult) - 1)
      config.latent.channels = ae.autoencoder.latent_channels
      config.latent.scale_factor = 1.0
  if config_lib.is_text(config):  # MiniLM's width, without loading it
    with config.unlocked():
      config.text.width = 384
  mesh = parallel.make_mesh()
  graphdef, abstract_params, optimizer, diffusion = training.build(config)
  shardings = parallel.state_sharding(mesh, training.abstract_state(config, optimizer))
  state = training.create_state(config, optimizer, jax.random.key(0), shardings)
  step_fn = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  shape = config_lib.sample_shape(config) if name != "autoencoder" else None
  if shape is None:
    d = config.data
    shape = (d.image_size, d.image_size, d.channels)
  b = config.training.batch_size
  rng = np.random.default_rng(0)
  host = {
    "image": rng.standard_normal((b, *shape)).astype(np.float32),
    "label": np.zeros((b,), np.int32),
  }
  if config_lib.is_text(config):  # captions of 3..16 tokens
    length, width = config.text.max_length, config.text.width
    mask = np.arange(length)[None] < rng.integers(3, length + 1, (b, 1))
    host["tokens"] = rng.standard_normal((b, length, width)).astype(np.float32) * mask[..., None]
    host.update(mask=mask, pooled=rng.standard_normal((b, width)).astype(np.float32))
  batch = parallel.global_batch(mesh, host)
  key = jax.random.key(1)
  box = [state]

  def step():
    box[0], metrics = step_fn(box[0], batch, key)
    jax.block_until_ready(metrics)

  for _ in range(3):
    step()
  return {
    "seconds": baseline.median_time(step, steps),
    "params": models.count_params(abstract_params),
    "batch": b,
    "shape": list(shape),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                 help="which models (the pixel U-Net, the reference, always runs)")  # fmt: skip
  p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps)))
    return
  me = str(Path(__file__).resolve())
  names = ["pixel U-Net", *(n for n in args.models if n != "pixel U-Net")]
  times: dict[str, list[float]] = {name: [] for name in names}
  info = {}
  for r in range(args.rounds):
    for name in names:
      out = baseline.run_worker([sys.executable, me, "--worker", name, "--steps", str(args.steps)])
      times[name].append(out["seconds"])
      info[name] = out
    print(f"round {r + 1}: " + "  ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()))
  pixel = float(np.median(times["pixel U-Net"]))
  print()
  for name, t in times.items():
    med = float(np.median(t))
    i = info[name]
    print(
      f"{name:13s} {i['params']:>10,} params  batch {i['batch']} x {i['shape']}:"
      f" median {med * 1e3:7.1f} ms/step  = {med / pixel:.3f} x the pixel model's"
    )
  print(json.dumps({n: float(np.median(t)) for n, t in times.items()}))


if __name__ == "__main__":
  main()
