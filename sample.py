"""Sample images from a trained run's EMA parameters.

  python sample.py --workdir runs/fmnist --num_samples 64 --sampler ddim --steps 50 --seed 0 \\
    --out runs/fmnist/grid
  python sample.py --workdir runs/c10 --num_samples 16 --guidance_scale 3 --class_label 7 --gif \\
    --out /tmp/c10_cat

Writes ``OUT/samples.png`` (a grid), ``OUT/samples.npz`` (``images``: uint8 [N, H, W, C], and
``labels`` for a class-conditional model) and, with ``--gif``, ``OUT/trajectory.gif`` (the
chain x_T -> x_0 of every sample, as grids). Options left unset come from the run's
``config.sampling``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "The training run's directory (config.json, checkpoints/).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("num_samples", 64, "How many images.")
flags.DEFINE_string(
  "sampler", None, "ddpm | ddim | dpm++2m | euler_maruyama | pc (default: config)."
)
flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sampling.num_steps).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_float("eta", None, "DDIM eta (default: config).")
flags.DEFINE_float("temperature", None, "Scale of the injected noise (default: config).")
flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config).")
flags.DEFINE_integer("class_label", None, "Draw only this class (class-conditional models).")
flags.DEFINE_integer("batch_size", None, "Samples per chunk (default: config.sampling.batch_size).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to load (default: the newest).")
flags.DEFINE_bool("gif", False, "Also write trajectory.gif.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS

MAX_GIF_FRAMES = 100


# ----------------------------------------------------------------------------- sampling


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  from jaxdiff import parallel

  parallel.use_all_cpu_cores()  # before anything touches a device
  parallel.maybe_initialize_distributed()

  import jax
  import numpy as np

  from jaxdiff import diffusion, images, sampling, trainer

  mesh = parallel.make_mesh()
  config, model_fn = trainer.load_ema(FLAGS.workdir, FLAGS.checkpoint_step, mesh)
  scfg = config.sampling

  def pick(flag: Any, default: Any) -> Any:
    return default if flag is None else flag

  n = FLAGS.num_samples
  guidance_scale = pick(FLAGS.guidance_scale, scfg.guidance_scale)
  labels, null_label = None, None
  if config.model.class_conditional:
    num_classes = config.data.num_classes
    if FLAGS.class_label is not None and not 0 <= FLAGS.class_label < num_classes:
      raise app.UsageError(f"--class_label={FLAGS.class_label} must be in 0..{num_classes - 1}")
    label = FLAGS.class_label
    labels = np.full(n, label) if label is not None else np.arange(n) % num_classes
    null_label = num_classes
  elif FLAGS.class_label is not None or guidance_scale != 1.0:
    raise app.UsageError(
      "--class_label and --guidance_scale != 1 need a class-conditional model"
      " (model.class_conditional is False in this run's config)"
    )
  # Every chunk is split over the devices: round the chunk up to a multiple of them.
  batch = min(pick(FLAGS.batch_size, scfg.batch_size), n)
  batch = -(-batch // mesh.size) * mesh.size

  out = sampling.sample_in_chunks(
    diffusion.from_config(config.diffusion),
    model_fn,
    jax.random.key(FLAGS.seed),
    n,
    (config.data.image_size, config.data.image_size, config.data.channels),
    batch_size=batch,
    labels=labels,
    return_trajectory=FLAGS.gif,
    progress=True,
    sampler=pick(FLAGS.sampler, scfg.sampler),
    num_steps=pick(FLAGS.steps, scfg.num_steps),
    eta=pick(FLAGS.eta, scfg.eta),
    clip_denoised=scfg.clip_denoised,
    guidance_scale=guidance_scale,
    null_label=null_label,
    temperature=pick(FLAGS.temperature, scfg.temperature),
    mesh=mesh,
  )
  samples, trajectory = out if FLAGS.gif else (out, None)
  if jax.process_index() != 0:
    return
  out_dir = Path(FLAGS.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  pixels = images.to_uint8(samples)
  images.save_png(images.make_grid(pixels), out_dir / "samples.png")
  arrays = {"images": pixels} if labels is None else {"images": pixels, "labels": labels}
  np.savez(out_dir / "samples.npz", **arrays)
  written = ["samples.png", "samples.npz"]
  if trajectory is not None:
    # Evenly spaced frames, x_T first and the samples last.
    idx = np.unique(np.linspace(0, len(trajectory) - 1, MAX_GIF_FRAMES).round().astype(int))
    frames = [images.make_grid(images.to_uint8(trajectory[i])) for i in idx]
    images.save_gif(frames, out_dir / "trajectory.gif")
    written.append("trajectory.gif")
  print(f"wrote {', '.join(written)} ({n} samples) to {out_dir}")


if __name__ == "__main__":
  app.run(main)
