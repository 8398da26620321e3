"""Sample images from a trained run's EMA parameters.

  python sample.py --workdir runs/fmnist --num_samples 64 --sampler ddim --steps 50 --seed 0 \\
    --out runs/fmnist/grid
  python -m jaxdiff.cli.sample --workdir runs/c10 --num_samples 16 --guidance_scale 3 \\
    --class_label 7 --gif --out /tmp/c10_cat

Writes ``OUT/samples.png`` (a grid), ``OUT/samples.npz`` (``images``: uint8 [N, H, W, C], and
``labels`` for a class-conditional model) and, with ``--gif``, ``OUT/trajectory.gif`` (the
chain x_T -> x_0 of every sample, as grids). Options left unset come from the run's
``config.sampling``.
"""

from absl import app, flags

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


def main(argv: list[str]) -> None:
  from jaxdiff.cli import start_jax

  start_jax(argv)
  import jax

  from jaxdiff.io import images
  from jaxdiff.run import load_run
  from jaxdiff.sampling import class_labels

  try:
    run = load_run(FLAGS.workdir, FLAGS.checkpoint_step)
    out = run.sample(
      FLAGS.num_samples,
      seed=FLAGS.seed,
      class_label=FLAGS.class_label,
      batch_size=FLAGS.batch_size,
      progress=True,
      return_trajectory=FLAGS.gif,
      sampler=FLAGS.sampler,
      num_steps=FLAGS.steps,
      eta=FLAGS.eta,
      temperature=FLAGS.temperature,
      guidance_scale=FLAGS.guidance_scale,
    )
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  pixels, trajectory = out if FLAGS.gif else (out, None)
  if jax.process_index() == 0:
    labels = class_labels(run.config, FLAGS.num_samples, FLAGS.class_label)
    files = images.save_samples(FLAGS.out, pixels, labels, trajectory)
    names = ", ".join(f.name for f in files)
    print(f"wrote {names} ({FLAGS.num_samples} samples, step {run.step}) to {FLAGS.out}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
