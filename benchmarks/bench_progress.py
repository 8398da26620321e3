"""The cost of per-step sampling progress: the same sampler with and without its host callback.

``sampling.sample(..., progress=...)`` compiles a ``jax.debug.callback`` into the scan body
(``jaxdiff.sampling.progress``) that fires once per sampler step. This times one jitted
sampler call with the callback (feeding a tqdm bar written to ``/dev/null``, as a real bar
costs) against one without, for the README's U-Net as a DDPM
(``configs/fashion_mnist_ddpm.py``, random weights) and the tiny test model, on all CPU cores
with the batch sharded over them, as the CLI samples.

Method: each repeat is a pair timed back to back (the order alternating), so load on a shared
machine hits both alike. Reported per model: the median over pairs of ``with / without - 1``,
the ratio of the fastest runs, and the *expected* overhead: the callback's own cost per step
(measured on a 1000-step chain of a model that does nothing, where it is the only difference
and large enough to time) over the model's time per step. On a machine shared with other jobs
the first two scatter by several percent either way; the third is the stable figure. The
samples with and without the callback are also compared bit for bit.

Run from the repository root::

  python benchmarks/bench_progress.py [--models fashion_mnist_ddpm,tiny --steps 50 --batch 64]

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for configs/

from jaxdiff import parallel  # noqa: E402

parallel.use_all_cpu_cores()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxdiff import sampling  # noqa: E402
from jaxdiff.core import diffusion, schedules  # noqa: E402


def build(name: str):
  """``(model_fn, config)`` for ``configs/{name}.py``'s model with random weights."""
  import importlib

  from flax import nnx

  from jaxdiff import models

  config = importlib.import_module(f"configs.{name}").get_config()
  graphdef, state = nnx.split(models.build_model(config, rngs=nnx.Rngs(0)))
  return models.bind(graphdef, state), config


def timed(run) -> tuple[float, np.ndarray]:
  t0 = time.perf_counter()
  out = np.asarray(jax.block_until_ready(run()))
  return time.perf_counter() - t0, out


def paired(model_fn, d, shape, steps: int, repeats: int, mesh) -> dict:
  """Seconds per call without and with the callback, over ``repeats`` alternating pairs."""
  bar = tqdm(file=open(os.devnull, "w"), mininterval=0.1)  # noqa: SIM115 a bar's real cost
  opts = dict(sampler="ddim", num_steps=steps, mesh=mesh)

  def off():
    return sampling.sample(d, model_fn, jax.random.key(0), shape, **opts)

  def on():
    return sampling.sample(d, model_fn, jax.random.key(0), shape, progress=bar.update, **opts)

  _, a = timed(off)  # compile both
  _, b = timed(on)
  times = {"off": [], "on": []}
  for r in range(repeats):
    order = (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
    for key, run in order:
      times[key].append(timed(run)[0])
  ratios = [t_on / t_off for t_on, t_off in zip(times["on"], times["off"], strict=True)]
  diffs = [t_on - t_off for t_on, t_off in zip(times["on"], times["off"], strict=True)]
  return {
    "off": statistics.median(times["off"]),
    "on": statistics.median(times["on"]),
    "min_ratio": min(times["on"]) / min(times["off"]),
    "overhead": statistics.median(ratios) - 1,
    "range": (min(ratios) - 1, max(ratios) - 1),
    "per_step_diff": statistics.median(diffs) / steps,
    "identical": bool(np.array_equal(a, b)),
    "callbacks": bar.n,
    "steps": steps,
  }


def callback_cost(repeats: int, mesh) -> tuple[float, float]:
  """(seconds one step's callback adds, seconds of a bare step), from a 1000-step chain whose
  model does nothing: the callback's own cost, measurable on a noisy machine."""
  d = diffusion.make_diffusion(schedules.get_betas("linear", 1000))
  zeros = jax.tree_util.Partial(lambda x, t, y=None: jnp.zeros_like(x))
  r = paired(zeros, d, (mesh.size, 2, 2, 1), 1000, repeats, mesh)
  return r["per_step_diff"], r["off"] / 1000


def bench(name: str, batch: int, steps: int, repeats: int, mesh) -> dict:
  """``paired`` for ``configs/{name}.py``'s model with random weights."""
  model_fn, config = build(name)
  d = diffusion.from_config(config.diffusion)
  size, channels = config.data.image_size, config.data.channels
  steps = min(steps, d.num_timesteps)  # the tiny config has T = 20
  return paired(model_fn, d, (batch, size, size, channels), steps, repeats, mesh)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="fashion_mnist_ddpm,tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  mesh = parallel.make_mesh()
  print(
    f"backend={jax.default_backend()} devices={jax.device_count()} DDIM batch={args.batch}"
    f" repeats={args.repeats} (paired, alternating order)"
  )
  cost, bare = callback_cost(max(args.repeats, 9), mesh)
  print(
    f"one step's callback (a 1000-step chain of a model that does nothing, {1e6 * bare:.0f} us"
    f" a step): {1e6 * cost:+.1f} us",
    flush=True,
  )
  print(
    f"{'model':<15}{'steps':>6}{'ms/step':>9}{'paired':>9}{'of mins':>9}{'expected':>10}"
    "   (paired: median of with/without - 1; of mins: min with / min without - 1;"
    " expected: callback cost / step time)"
  )
  for name in args.models.split(","):
    r = bench(name, args.batch, args.steps, args.repeats, mesh)
    step = r["off"] / r["steps"]
    lo, hi = r["range"]
    print(
      f"{name:<15}{r['steps']:6d}{1e3 * step:9.2f}{r['overhead']:+9.2%}{r['min_ratio'] - 1:+9.2%}"
      f"{cost / step:+10.3%}   pairs {lo:+.1%}..{hi:+.1%}, bit-identical={r['identical']},"
      f" callbacks={r['callbacks']}",
      flush=True,
    )


if __name__ == "__main__":
  main()
