"""What a text-conditioned run obeys: the prompted class, and the prompted attribute.

  python benchmarks/study_text.py --workdir runs/fm_text --out benchmarks/results/fashion_mnist_text

On a Fashion-MNIST text run (``configs/fashion_mnist_text.py``) this writes, into ``--out``:

1. ``prompts.png``: one row of samples for each of ten prompts (``PROMPTS``), some worded as the
   training captions never are.
2. Class: ``--per_class`` samples of "a {class name}" for every class, at each guidance scale in
   ``--guidance``; jaxdiff's Fashion-MNIST classifier (89.7% test accuracy) says which class
   each sample shows, and the record is the fraction that are the prompted class.
3. Attributes: for each attribute the captions name (fill: small / large, width: narrow /
   wide, brightness: dark / light) and each class, ``--per_class`` samples of "a {low word}
   {name}", "a {name}" and "a {high word} {name}" at ``--attribute_guidance``; each sample's
   attribute is measured as the captions measured the training images
   (``jaxdiff.data.captions.measure``) and placed against the training split's cut points of
   the prompted class. The record is the fraction below the low cut and above the high cut:
   a third each when the prompt makes no difference.

Every draw uses ``--sampler`` / ``--steps`` (DPM-Solver++(2M), 20) and seed ``--seed``;
``results.json`` holds it all and ``results.md`` the tables for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
  "a dark pullover",
  "a light, wide coat",
  "a pair of trousers",  # "pair of": never in a caption
  "an ankle boot",
  "a sweater that is bright",
  "a small handbag",
  "a dress drawn in white",  # unseen wording
  "a running shoe",
  "a sandal for the beach",  # unseen wording
  "a shadowy t-shirt",  # "shadowy": never in a caption
]


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--per_class", type=int, default=50)
  p.add_argument("--per_prompt", type=int, default=8)
  p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
  p.add_argument("--attribute_guidance", type=float, default=3.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sampler", default="dpm++2m")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--cache_dir", default=None)
  return p.parse_args(argv)


def _sampling(args) -> dict:
  return {"seed": args.seed, "sampler": args.sampler, "steps": args.steps}


def _phrase(adjective: str, name: str) -> str:
  from jaxdiff.data import captions

  bare = f"{adjective} {name}".strip()
  return f"{captions.article(bare)} {bare}".strip()


def _classify(net, images: np.ndarray) -> np.ndarray:
  from jaxdiff import evaluation
  from jaxdiff.io.images import from_uint8

  _, logits = evaluation.compute_features(net, from_uint8(images), batch_size=256)
  return np.argmax(logits, axis=-1)


def _class_accuracy(run, net, names, args) -> list[dict]:
  prompts = [_phrase("", n[0]) for n in names]
  rows = []
  for g in args.guidance:
    start = time.perf_counter()
    images = run.sample(args.per_class, prompt=prompts, guidance_scale=g, **_sampling(args))
    predicted = _classify(net, images).reshape(len(names), args.per_class)
    right = predicted == np.arange(len(names))[:, None]
    rows.append(
      {
        "guidance": g,
        "accuracy": float(right.mean()),
        "stderr": float(right.std() / np.sqrt(right.size)),
        "per_class": [float(r) for r in right.mean(axis=1)],
        "seconds": round(time.perf_counter() - start, 1),
      }
    )
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _attribute_obedience(run, names, cuts, args) -> list[dict]:
  from jaxdiff.data import captions

  rows = []
  k = len(names)
  for attribute, (low, high) in captions.ATTRIBUTE_WORDS.items():
    prompts = [_phrase(word, n[0]) for word in (low, "", high) for n in names]
    images = run.sample(
      args.per_class, prompt=prompts, guidance_scale=args.attribute_guidance, **_sampling(args)
    )
    values = captions.measure(images)[attribute].reshape(3, k, args.per_class)
    c = np.asarray(cuts[attribute])  # [K, 2] per class
    row = {"attribute": attribute, "low": low, "high": high}
    for i, word in enumerate((low, "(none)", high)):
      below = values[i] < c[:, :1]
      above = values[i] > c[:, 1:]
      row[word] = {"below_low_cut": float(below.mean()), "above_high_cut": float(above.mean()),
                   "mean": float(values[i].mean())}  # fmt: skip
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def _tables(study: dict) -> str:
  lines = ["| guidance | class accuracy | ± s.e. |", "|---:|---:|---:|"]
  for r in study["class"]:
    lines.append(f"| {r['guidance']:g} | {100 * r['accuracy']:.1f}% | {100 * r['stderr']:.1f} |")
  lines += ["", "| attribute | prompt | below the class's low cut | above its high cut |",
            "|---|---|---:|---:|"]  # fmt: skip
  for r in study["attributes"]:
    for word in (r["low"], "(none)", r["high"]):
      v = r[word]
      lines.append(
        f"| {r['attribute']} | {word} | {100 * v['below_low_cut']:.0f}% |"
        f" {100 * v['above_high_cut']:.0f}% |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  args = _parse(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  from jaxdiff import evaluation, prompts
  from jaxdiff.data import captions
  from jaxdiff.io import images as images_lib
  from jaxdiff.run import load_run

  run = load_run(args.workdir)
  config = run.config
  names = captions.synonyms(config.data.name)
  path = evaluation.default_classifier_path(config.data, args.cache_dir)
  net = evaluation.feature_net("classifier", path, config.data, args.cache_dir)
  train_images, train_labels = prompts.images_and_labels(config.data, config.data.split)
  cuts = captions.thresholds(train_images, train_labels, config.data.num_classes)

  grid = run.sample(args.per_prompt, prompt=PROMPTS, **_sampling(args))
  images_lib.save_png(images_lib.make_grid(grid, args.per_prompt), out / "prompts.png")
  study = {
    "workdir": args.workdir,
    "step": run.step,
    "sampler": f"{args.sampler} {args.steps}",
    "prompts": PROMPTS,
    "grid_guidance": config.sampling.guidance_scale,
    "per_class": args.per_class,
    "features": net.name,
    "class": _class_accuracy(run, net, names, args),
    "attribute_guidance": args.attribute_guidance,
    "attributes": _attribute_obedience(run, names, cuts, args),
  }
  (out / "results.json").write_text(json.dumps(study, indent=1) + "\n")
  (out / "results.md").write_text(_tables(study))
  print(_tables(study))


if __name__ == "__main__":
  main()
