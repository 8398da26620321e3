"""Sampler overhead: time per sampler step / time of one jitted model call at the same batch.

A sampler step should cost one model evaluation (two for ``pc``, whose Langevin
corrector evaluates the model again) plus elementwise maths that are small
next to a U-Net. The target is a ratio <= 1.05 per model evaluation.

Method: the model is ``build_model`` on ``configs/tiny.py``, run under ``jax.jit`` as the
sampler runs it, with the parameters passed as arguments (``jax.tree_util.Partial``). Each
repeat is a pair, timed back to back so that load on the shared machine hits
both alike: S jitted model calls (dispatched in a loop, blocked once), then
one jitted S-step sampler call. The reported ratio is the median over repeats
of ``(sampler time / (S * calls per step)) / (model time / S)``.
Classifier-free guidance (``ddim+cfg``) runs the model on a doubled batch, so
its baseline is one model call at batch 2B.

Run from the repository root: ``python benchmarks/bench_sampling.py [--batch 32 --steps 20]``.
Prints a table; writes nothing.

``--vs_torch`` instead compares images/s of DDIM (eta 0) against denoising-diffusion-pytorch's
DDIM at equal model size (the ``fashion_mnist`` model; lucidrains' Unet sized to match) and
equal steps, 28x28x1, each side in its own process, alternating for ``--repeats`` pairs.
Setting up the torch side: see ``benchmarks/baseline.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for configs/
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baseline  # noqa: E402

from jaxdiff import sampling  # noqa: E402
from jaxdiff.core import diffusion, schedules  # noqa: E402


def build(num_classes: int):
  """``(apply(state, x, t, y=None), state, image_shape)`` for the tiny model."""
  from flax import nnx

  from configs import tiny
  from jaxdiff.models import build_model

  config = tiny.get_config()
  with config.unlocked():
    config.model.class_conditional = num_classes > 0
    config.data.num_classes = max(num_classes, 1)
  graphdef, state = nnx.split(build_model(config, rngs=nnx.Rngs(0)))

  def apply(state, x, t, y=None):
    return nnx.merge(graphdef, state)(x, t, y)

  size, channels = config.data.image_size, config.data.channels
  return apply, state, (size, size, channels)


# ----------------------------------------------------------------------------- vs PyTorch


def jax_ddim_worker(batch: int, steps: int) -> dict:
  config, mesh, graphdef, abstract_params, _, d, _, state = baseline.jax_fashion_model(batch)
  from jaxdiff import models

  model_fn = models.bind(graphdef, state.params)
  shape = (batch, 28, 28, 1)

  def run():
    x = sampling.sample(d, model_fn, jax.random.key(0), shape, sampler="ddim", num_steps=steps,
                        mesh=mesh)  # fmt: skip
    jax.block_until_ready(x)

  run()  # compile
  t = baseline.median_time(run, 3)
  return {"img_s": batch / t, "params": models.count_params(abstract_params)}


def vs_torch(args) -> None:
  me = str(Path(__file__).resolve())
  env = baseline.torch_env()
  if not baseline.has_torch(args.torch_python, env):
    print("denoising-diffusion-pytorch not importable: no comparison (see benchmarks/baseline.py)")
    return
  common = ["--batch", str(args.batch), "--steps", str(args.steps)]
  rows = []
  for r in range(args.repeats):
    j = baseline.run_worker([sys.executable, me, "--worker", "jax", *common])
    t = baseline.run_worker(
      [args.torch_python, baseline.__file__, "ddim", *common, "--target_params", str(j["params"])],
      env=env,
    )
    rows.append((j, t))
    print(f"round {r + 1}: jaxdiff {j['img_s']:7.1f} img/s   pytorch {t['img_s']:7.1f} img/s"
          f"   ratio {j['img_s'] / t['img_s']:.2f}", flush=True)  # fmt: skip
  jm = statistics.median(j["img_s"] for j, _ in rows)
  tm = statistics.median(t["img_s"] for _, t in rows)
  paired = statistics.median(j["img_s"] / t["img_s"] for j, t in rows)
  t0 = rows[0][1]
  print(
    f"DDIM {args.steps} steps, batch {args.batch}: jaxdiff ({rows[0][0]['params']:,} params)"
    f" {jm:.1f} img/s; denoising-diffusion-pytorch (Unet dim={t0['dim']}, {t0['params']:,}"
    f" params) {tm:.1f} img/s; ratio {jm / tm:.2f} of medians, {paired:.2f} median paired"
  )


def time_pair(model_call, sampler_call, steps: int) -> tuple[float, float]:
  """Seconds for ``steps`` model calls, then for one sampler call."""
  t0 = time.perf_counter()
  out = None
  for _ in range(steps):
    out = model_call()
  jax.block_until_ready(out)
  t1 = time.perf_counter()
  jax.block_until_ready(sampler_call())
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--vs_torch", action="store_true", help="images/s against PyTorch DDIM")
  parser.add_argument("--torch_python", default=sys.executable, help="interpreter with torch")
  parser.add_argument("--worker", choices=["jax"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == "jax":
    print(json.dumps(jax_ddim_worker(args.batch, args.steps)))
    return
  if args.vs_torch:
    vs_torch(args)
    return
  B, S = args.batch, args.steps

  num_classes = 10
  apply, state, image_shape = build(num_classes)
  model_fn = jax.tree_util.Partial(apply, state)
  d = diffusion.make_diffusion(schedules.get_betas("linear", 1000))
  key = jax.random.key(0)
  x = jax.random.normal(key, (B, *image_shape))
  labels = jnp.arange(B) % num_classes
  model_jit = jax.jit(apply)

  cases = [  # name, sampler, options, model calls per step, model batch multiplier
    ("ddpm", "ddpm", {}, 1, 1),
    ("ddim", "ddim", {}, 1, 1),
    ("ddim eta=1", "ddim", {"eta": 1.0}, 1, 1),
    ("dpm++2m", "dpm++2m", {}, 1, 1),
    ("euler_maruyama", "euler_maruyama", {}, 1, 1),
    ("pc", "pc", {}, 2, 1),
    ("ddim+cfg", "ddim", {"guidance_scale": 3.0, "null_label": num_classes}, 1, 2),
  ]
  print(
    f"backend={jax.default_backend()} devices={jax.device_count()} batch={B} steps={S}"
    f" image={image_shape} repeats={args.repeats}"
  )
  print(f"{'sampler':<16}{'ms/step':>9}{'ms/call':>9}{'ratio':>8}   (min..max)")
  for name, sampler, opts, calls, mult in cases:
    steps = sampling.sampler_timesteps(d, S, sampler=sampler)
    ds = diffusion.respace(d, steps)
    fn = jax.jit(sampling.make_sampler(sampler, **opts))
    y = labels if "guidance_scale" in opts else None
    xm, tm = jnp.concatenate([x] * mult), jnp.zeros((B * mult,), jnp.int32)
    ym = jnp.concatenate([labels] * mult) if mult > 1 else None

    def model_call(xm=xm, tm=tm, ym=ym):
      return model_jit(state, xm, tm, ym)

    def sampler_call(fn=fn, ds=ds, y=y):
      return fn(ds, model_fn, key, x, y)

    time_pair(model_call, sampler_call, S)  # compile both, warm caches
    ratios, per_step, per_call = [], [], []
    for _ in range(args.repeats):
      t_model, t_sampler = time_pair(model_call, sampler_call, S)
      per_call.append(t_model / S)
      per_step.append(t_sampler / S)
      ratios.append((t_sampler / (S * calls)) / (t_model / S))
    print(
      f"{name:<16}{1e3 * statistics.median(per_step):9.2f}{1e3 * statistics.median(per_call):9.2f}"
      f"{statistics.median(ratios):8.3f}   ({min(ratios):.3f}..{max(ratios):.3f})"
    )


if __name__ == "__main__":
  main()
