"""Sample images from a trained run (its EMA parameters by default).

  jaxdiff sample --workdir runs/fmnist --out runs/fmnist/grid --sampler ddim --steps 50
  jaxdiff sample --workdir runs/c10 --out /tmp/cat --num_samples 16 --guidance_scale 3 \\
      --class_label 7 --gif
  jaxdiff sample --workdir runs/fmnist --out grid --config.sampling.sampler=dpm++2m \\
      --config.sampling.num_steps=20

Writes ``OUT/samples.png`` (a grid), ``OUT/samples.npz`` (``images``: uint8 [N, H, W, C], and
``labels`` for a class-conditional model) and, with ``--gif``, ``OUT/trajectory.gif`` (the
chain x_T -> x_0 of every sample, as grids). Options left unset come from the run's
``config.sampling``; ``--config.sampling.KEY=value`` changes any of its fields for this command,
and the short flags (``--steps``, ``--sampler``, ...) are other names for the same fields.
"""

from absl import flags

from jaxdiff import cli
from jaxdiff.cli import overrides

flags.DEFINE_string("workdir", None, "The training run's directory (config.json, checkpoints/).")
flags.DEFINE_string("out", None, "Output directory (made if missing).")
flags.DEFINE_integer("num_samples", None, "How many images (config.sampling.num_samples).")
flags.DEFINE_string(
  "sampler",
  None,
  "ddpm | ddim | dpm++2m | euler_maruyama | pc; a flow run: euler | heun"
  " (config.sampling.sampler).",
)
flags.DEFINE_integer("steps", None, "Sampler steps (config.sampling.num_steps).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_float("eta", None, "DDIM eta (config.sampling.eta).")
flags.DEFINE_float(
  "temperature", None, "Scale of the injected noise (config.sampling.temperature)."
)
flags.DEFINE_float(
  "guidance_scale", None, "Classifier-free guidance scale (config.sampling.guidance_scale)."
)
flags.DEFINE_integer("class_label", None, "Draw only this class (class-conditional models).")
flags.DEFINE_integer("batch_size", None, "Samples per compiled chunk (config.sampling.batch_size).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint to load (default: the newest).")
flags.DEFINE_bool("best", False, "Load the checkpoint kept as the best by eval.best_metric.")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "The EMA or the optimiser's parameters.")
flags.DEFINE_bool("gif", False, "Also write trajectory.gif.")
flags.DEFINE_multi_string(
  "prompt",
  None,
  "Text runs: draw --num_samples images of this prompt; repeat the flag for one"
  " grid row per prompt (default: the empty prompt, unconditional samples).",
)
flags.DEFINE_string(
  "negative_prompt",
  None,
  "Text runs: guide away from this prompt (it takes the empty"
  " prompt's place in classifier-free guidance; needs --guidance_scale != 1).",
)
flags.mark_flags_as_required(["workdir", "out"])
overrides.define(["sampling"])
cli.define_common_flags()
flags.declare_key_flag("compilation_cache_dir")
FLAGS = flags.FLAGS

# Short flags: other names for fields of config.sampling.
SHORTHANDS = {
  "num_samples": "sampling.num_samples",
  "sampler": "sampling.sampler",
  "steps": "sampling.num_steps",
  "eta": "sampling.eta",
  "temperature": "sampling.temperature",
  "guidance_scale": "sampling.guidance_scale",
  "batch_size": "sampling.batch_size",
}


def _config():
  """The run's config with this command's overrides, checked (before any checkpoint is read)."""
  from absl import app

  from jaxdiff import run as run_lib
  from jaxdiff.config import is_text
  from jaxdiff.sampling import check_sampling

  overrides.check_checkpoint_choice()
  overrides.check_out_dir(FLAGS.out)
  values = overrides.collect(["sampling"], SHORTHANDS)
  config = overrides.apply(run_lib.read_config(FLAGS.workdir), values)
  problems = check_sampling(config, FLAGS.class_label)
  if not is_text(config):
    problems += [
      f"--{name}: {FLAGS.workdir} is not a text-conditioned run (config.text.encoder is empty)"
      for name in ("prompt", "negative_prompt")
      if FLAGS[name].value is not None
    ]
  elif any(not p.strip() for p in FLAGS.prompt or ["x"]):
    problems.append(f"--prompt={FLAGS.prompt}: an empty prompt; omit --prompt for unconditional")
  if problems:
    raise app.UsageError("; ".join(problems))
  return config


def _sample() -> None:
  import dataclasses

  import jax

  from jaxdiff.config import is_text
  from jaxdiff.io import images
  from jaxdiff.run import load_run
  from jaxdiff.sampling import class_labels

  config = _config()
  run = load_run(FLAGS.workdir, FLAGS.checkpoint_step, best=FLAGS.best)
  run = dataclasses.replace(run, config=config)
  n = config.sampling.num_samples
  text = {"prompt": FLAGS.prompt, "negative_prompt": FLAGS.negative_prompt}
  out = run.sample(
    n, seed=FLAGS.seed, class_label=FLAGS.class_label, params=FLAGS.params,
    progress=True, return_trajectory=FLAGS.gif, **({} if not is_text(config) else text),
  )  # fmt: skip
  pixels, trajectory = out if FLAGS.gif else (out, None)
  if jax.process_index() == 0:
    labels, per_image, ncols = class_labels(config, n, FLAGS.class_label), None, None
    if is_text(config):  # one row of n per prompt
      labels, ncols = None, n if FLAGS.prompt else None
      per_image = [p for p in FLAGS.prompt or [""] for _ in range(n)]
      n = len(per_image)
    written = images.save_samples(
      FLAGS.out, pixels, labels, trajectory, prompts=per_image, ncols=ncols
    )
    names = ", ".join(f.name for f in written)
    print(f"wrote {names} ({n} samples, step {run.step}) to {FLAGS.out}")


def main(argv: list[str]) -> None:
  cli.start_jax(argv)
  cli.reporting_errors(_sample)


if __name__ == "__main__":
  cli.run_main(main)
