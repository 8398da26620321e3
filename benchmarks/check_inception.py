"""Checks jaxdiff's FID InceptionV3 against pytorch-fid's own modules on random weights.

Writes a random state dict (``jaxdiff.evaluation.inception.random_state_dict``) and random
images, runs pytorch-fid's FID Inception (``fid_inception_v3``'s architecture, built without
downloading weights, loaded with ``load_state_dict(strict=True)``) in a subprocess under
``--torch_python``, and prints the largest absolute and relative differences of pool3 features
and logits. Inputs at 299x299 go straight in; other sizes are resized on each side
(``F.interpolate`` bilinear, ``align_corners=False`` vs
:func:`jaxdiff.evaluation.inception.prepare_images`).

Usage::

  python benchmarks/check_inception.py [--torch_python PY]

The torch environment needs ``torch``, ``torchvision`` and ``pytorch-fid``; the torch side
never imports JAX (it runs this same file with ``--torch_worker``, before any JAX import).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _import_pytorch_fid():
  """``pytorch_fid.inception``, tolerating a torchvision whose compiled ops cannot load.

  A CUDA build of torchvision next to a CPU-only torch fails in ``import torchvision`` while
  registering its C++ ops. The Inception modules are plain Python, so fall back to importing
  torchvision's subpackages without running its top-level ``__init__``.
  """
  try:
    import torchvision  # noqa: F401
  except (RuntimeError, OSError) as e:
    import importlib.metadata
    import importlib.util
    import types

    print(
      f"[torch] torchvision import failed ({e}); loading its models without ops", file=sys.stderr
    )
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = importlib.metadata.version("torchvision")
    sys.modules["torchvision"] = package
  from pytorch_fid import inception

  return inception


def torch_worker(weights: str, inputs: str, output: str) -> None:
  """Runs pytorch-fid's FID Inception on ``inputs`` (NHWC in [-1, 1]) and saves the results."""
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(1)  # share the machine politely; speed does not matter here
  pf = _import_pytorch_fid()
  # fid_inception_v3() minus the download: torchvision's Inception3 with the FID blocks.
  net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pf.FIDInceptionE_1(1280)
  net.Mixed_7c = pf.FIDInceptionE_2(2048)
  with np.load(weights) as data:
    state = {k: torch.from_numpy(data[k]) for k in data.files}
  # The file format omits num_batches_tracked; eval-mode BN never reads it.
  for key, value in net.state_dict().items():
    if key.endswith(".num_batches_tracked"):
      state[key] = value
  net.load_state_dict(state, strict=True)
  net.eval()

  # pytorch-fid's InceptionV3 blocks 0-3, then the classifier head of Inception3.
  layers = [
    net.Conv2d_1a_3x3,
    net.Conv2d_2a_3x3,
    net.Conv2d_2b_3x3,
    torch.nn.MaxPool2d(kernel_size=3, stride=2),
    net.Conv2d_3b_1x1,
    net.Conv2d_4a_3x3,
    torch.nn.MaxPool2d(kernel_size=3, stride=2),
    net.Mixed_5b,
    net.Mixed_5c,
    net.Mixed_5d,
    net.Mixed_6a,
    net.Mixed_6b,
    net.Mixed_6c,
    net.Mixed_6d,
    net.Mixed_6e,
    net.Mixed_7a,
    net.Mixed_7b,
    net.Mixed_7c,
    torch.nn.AdaptiveAvgPool2d(output_size=(1, 1)),
  ]
  results = {}
  with torch.no_grad(), np.load(inputs) as data:
    for name in data.files:
      x = torch.from_numpy(data[name]).permute(0, 3, 1, 2).contiguous()
      if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
      for layer in layers:
        x = layer(x)
      feats = torch.flatten(x, 1)
      results[f"{name}/features"] = feats.numpy()
      results[f"{name}/logits"] = net.fc(feats).numpy()
  shapes = [f"{k} {' '.join(map(str, v.shape))}" for k, v in net.state_dict().items()]
  results["state_dict_shapes"] = np.array(shapes)
  np.savez(output, **results)


def _diff_line(label: str, ours: np.ndarray, ref: np.ndarray) -> str:
  ours, ref = ours.astype(np.float64), ref.astype(np.float64)
  diff = np.abs(ours - ref)
  return (
    f"{label:<24} max|diff| {diff.max():.3e}  max|ref| {np.abs(ref).max():.3e}  "
    f"max|diff|/max|ref| {diff.max() / np.abs(ref).max():.3e}  "
    f"||diff||/||ref|| {np.linalg.norm(ours - ref) / np.linalg.norm(ref):.3e}"
  )


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch_python", default=sys.executable, help="interpreter with torch")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--sizes", default="299,64", help="comma-separated input sides; non-299 are resized"
  )
  parser.add_argument("--torch_worker", nargs=3, metavar=("WEIGHTS", "INPUTS", "OUTPUT"))
  args = parser.parse_args()
  if args.torch_worker:
    torch_worker(*args.torch_worker)
    return 0

  import jax

  from jaxdiff.evaluation import inception

  rng = np.random.default_rng(args.seed)
  sizes = [int(s) for s in args.sizes.split(",")]
  inputs = {
    f"size{s}": rng.uniform(-1.0, 1.0, (args.batch, s, s, 3)).astype(np.float32) for s in sizes
  }
  with tempfile.TemporaryDirectory() as tmp:
    weights, inputs_path, out = (Path(tmp) / n for n in ("w.npz", "x.npz", "torch_out.npz"))
    np.savez(weights, **inception.random_state_dict(args.seed))
    np.savez(inputs_path, **inputs)

    start = time.perf_counter()
    cmd = [args.torch_python, __file__, "--torch_worker", str(weights), str(inputs_path), str(out)]
    subprocess.run(cmd, check=True)
    print(f"torch side: {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    net = inception.feature_net(weights)
    ours = {k: jax.device_get(net.apply(x)) for k, x in inputs.items()}
    print(f"jax side: {time.perf_counter() - start:.1f}s ({net.name})")

    with np.load(out) as data:
      ref = {k: data[k] for k in data.files}

  torch_shapes = {}
  for line in ref.pop("state_dict_shapes"):
    key, *dims = str(line).split()
    if not key.endswith(".num_batches_tracked"):
      torch_shapes[key] = tuple(int(d) for d in dims)
  same_keys = torch_shapes == inception.state_dict_shapes()
  print(f"state_dict_shapes() matches the torch model's state_dict: {same_keys}")
  for name in inputs:
    for kind in ("features", "logits"):
      print(_diff_line(f"{name} {kind}", ours[name][kind], ref[f"{name}/{kind}"]))
  return 0 if same_keys else 1


if __name__ == "__main__":
  sys.exit(main())
