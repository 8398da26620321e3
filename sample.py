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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  from jaxdiff import parallel

  parallel.use_all_cpu_cores()  # before anything touches a device
  parallel.maybe_initialize_distributed()
  from jaxdiff.generate import generate

  try:
    result = generate(
      FLAGS.workdir,
      FLAGS.out,
      num_samples=FLAGS.num_samples,
      sampler=FLAGS.sampler,
      steps=FLAGS.steps,
      seed=FLAGS.seed,
      eta=FLAGS.eta,
      temperature=FLAGS.temperature,
      guidance_scale=FLAGS.guidance_scale,
      class_label=FLAGS.class_label,
      batch_size=FLAGS.batch_size,
      checkpoint_step=FLAGS.checkpoint_step,
      gif=FLAGS.gif,
    )
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  if result["files"]:
    names = ", ".join(f.name for f in result["files"])
    print(f"wrote {names} ({FLAGS.num_samples} samples) to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
