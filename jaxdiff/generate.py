"""Sampling a trained run: EMA parameters in, a PNG grid, an .npz and a GIF out.

``generate`` is what ``sample.py`` calls. Options left as None come from the run's
``config.sampling``. Output (process 0 writes): ``OUT/samples.png`` (a grid),
``OUT/samples.npz`` (``images``: uint8 ``[N, H, W, C]``, and ``labels`` for a
class-conditional model) and with ``gif=True`` ``OUT/trajectory.gif`` (the chain
x_T -> x_0 of every sample, as grids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdiff import diffusion, images, parallel, sampling, trainer

MAX_GIF_FRAMES = 100


def generate(
  workdir: str | Path,
  out: str | Path,
  *,
  num_samples: int = 64,
  sampler: str | None = None,
  steps: int | None = None,
  seed: int = 0,
  eta: float | None = None,
  temperature: float | None = None,
  guidance_scale: float | None = None,
  class_label: int | None = None,
  batch_size: int | None = None,
  checkpoint_step: int | None = None,
  gif: bool = False,
  progress: bool = True,
) -> dict[str, Any]:
  """Samples ``num_samples`` images from a run's EMA parameters and writes them to ``out``.

  Returns:
    dict with ``images`` (uint8 ``[N, H, W, C]``), ``labels`` (or None) and ``files``.

  Raises:
    FileNotFoundError: ``workdir`` is not a run, or has no (such) checkpoint.
    ValueError: an option the model cannot honour (labels or guidance on an
      unconditional model, a label out of range, a bad sampler or step count).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  mesh = parallel.make_mesh()
  config, model_fn = trainer.load_ema(workdir, checkpoint_step, mesh)
  scfg = config.sampling

  def pick(value: Any, default: Any) -> Any:
    return default if value is None else value

  n = num_samples
  guidance_scale = pick(guidance_scale, scfg.guidance_scale)
  labels, null_label = None, None
  if config.model.class_conditional:
    num_classes = config.data.num_classes
    if class_label is not None and not 0 <= class_label < num_classes:
      raise ValueError(f"class_label={class_label} must be in 0..{num_classes - 1}")
    labels = np.full(n, class_label) if class_label is not None else np.arange(n) % num_classes
    null_label = num_classes
  elif class_label is not None or guidance_scale != 1.0:
    raise ValueError(
      f"class_label={class_label} / guidance_scale={guidance_scale} need a class-conditional"
      " model, and this run's config has model.class_conditional=False; drop them"
    )
  # Every chunk is split over the devices: round the chunk up to a multiple of them.
  batch = min(pick(batch_size, scfg.batch_size), n)
  batch = -(-batch // mesh.size) * mesh.size

  result = sampling.sample_in_chunks(
    diffusion.from_config(config.diffusion),
    model_fn,
    jax.random.key(seed),
    n,
    (config.data.image_size, config.data.image_size, config.data.channels),
    batch_size=batch,
    labels=labels,
    return_trajectory=gif,
    progress=progress,
    sampler=pick(sampler, scfg.sampler),
    num_steps=pick(steps, scfg.num_steps),
    eta=pick(eta, scfg.eta),
    clip_denoised=scfg.clip_denoised,
    guidance_scale=guidance_scale,
    null_label=null_label,
    temperature=pick(temperature, scfg.temperature),
    mesh=mesh,
  )
  samples, trajectory = result if gif else (result, None)
  pixels = images.to_uint8(samples)
  files: list[Path] = []
  if jax.process_index() == 0:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images.save_png(images.make_grid(pixels), out / "samples.png")
    arrays = {"images": pixels} if labels is None else {"images": pixels, "labels": labels}
    np.savez(out / "samples.npz", **arrays)
    files += [out / "samples.png", out / "samples.npz"]
    if trajectory is not None:
      # Evenly spaced frames, x_T first and the samples last.
      idx = np.unique(np.linspace(0, len(trajectory) - 1, MAX_GIF_FRAMES).round().astype(int))
      frames = [images.make_grid(images.to_uint8(trajectory[i])) for i in idx]
      images.save_gif(frames, out / "trajectory.gif")
      files.append(out / "trajectory.gif")
  return {"images": pixels, "labels": labels, "files": files}
