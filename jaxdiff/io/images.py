"""Images in and out: model space [-1, 1] to 8-bit pixels, grids, PNG and GIF files.

Model images are NHWC floats in [-1, 1] with pixel value ``k`` at ``k / 127.5 - 1``
(see STYLE.md), so :func:`to_uint8` inverts that exactly on the 8-bit grid.

Example::

  pixels = to_uint8(samples)                 # [N, H, W, C] uint8
  x = from_uint8(pixels)                     # back to [-1, 1], float32
  save_png(make_grid(pixels), "samples.png")
  save_gif([make_grid(to_uint8(x)) for x in trajectory], "chain.gif")
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from jaxdiff.io import files


def to_uint8(x) -> np.ndarray:
  """``round((x + 1) * 127.5)`` clipped to 0..255, as uint8; NaNs become 0.

  Args:
    x: array-like in [-1, 1] (values outside are clipped), any shape.

  Returns:
    uint8 NumPy array of the same shape.
  """
  x = np.nan_to_num(np.asarray(x, np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def model_space(images: np.ndarray) -> np.ndarray:
  """What a source holds, in model space: 8-bit pixels through :func:`from_uint8`; floats
  (already model-space images, or a latent run's latents) as float32."""
  images = np.asarray(images)
  return from_uint8(images) if images.dtype == np.uint8 else images.astype(np.float32)


def from_uint8(x) -> np.ndarray:
  """8-bit pixels to model space: exactly ``x / 127.5 - 1`` in float32 (the inverse of
  :func:`to_uint8` on the 8-bit grid).

  Args:
    x: uint8 (or integer-valued) array-like, any shape.

  Returns:
    float32 NumPy array of the same shape, in [-1, 1].
  """
  return np.asarray(x).astype(np.float32) / np.float32(127.5) - np.float32(1)


def make_grid(
  images: np.ndarray, ncols: int | None = None, padding: int = 2, pad_value: int = 0
) -> np.ndarray:
  """Tiles ``[N, H, W, C]`` images row by row into one ``[rows*(H+p)+p, cols*(W+p)+p, C]`` image.

  Args:
    images: ``[N, H, W, C]`` (or ``[N, H, W]``) uint8 or float images.
    ncols: images per row (default: ceil(sqrt(N)), a near-square grid).
    padding: pixels between images and around the border.
    pad_value: the value of the padding pixels.

  Returns:
    The grid, with the dtype and channel count of ``images``.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"make_grid needs [N, H, W, C] images with N >= 1, got {images.shape}")
  n, h, w, c = images.shape
  ncols = min(ncols or math.ceil(math.sqrt(n)), n)
  nrows = math.ceil(n / ncols)
  grid = np.full(
    (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
    pad_value,
    images.dtype,
  )
  for i in range(n):
    r, col = divmod(i, ncols)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def _pil(image: np.ndarray):
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8 pixels (use to_uint8), got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
    raise ValueError(f"expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}")
  return Image.fromarray(image)


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
  """Writes one uint8 ``[H, W, C]`` image (C = 1, 3 or 4) to ``path`` (local, creating its
  folder, or ``gs://``), atomically (``files.atomic_path``)."""
  pil = _pil(image)
  with files.atomic_path(path) as tmp:
    pil.save(tmp, format="PNG")


def save_gif(
  frames: Sequence[np.ndarray] | np.ndarray,
  path: str | os.PathLike,
  *,
  duration_ms: int = 80,
  hold_last_ms: int = 1000,
  loop: int = 0,
) -> None:
  """Writes uint8 ``[H, W, C]`` frames as an animated GIF.

  Args:
    frames: the frames, e.g. grids of a sampling trajectory (x_T first).
    path: output file (local, its folder created, or ``gs://``), written atomically.
    duration_ms: display time of each frame.
    hold_last_ms: display time of the last frame (the final samples).
    loop: number of loops; 0 loops forever.
  """
  images = [_pil(f) for f in frames]
  if not images:
    raise ValueError("save_gif needs at least one frame")
  durations = [duration_ms] * (len(images) - 1) + [max(hold_last_ms, duration_ms)]
  with files.atomic_path(path) as tmp:
    images[0].save(
      tmp,
      format="GIF",
      save_all=True,
      append_images=images[1:],
      duration=durations,
      loop=loop,
      optimize=False,
    )


MAX_GIF_FRAMES = 100


def save_samples(
  out_dir: str | os.PathLike,
  pixels: np.ndarray,
  labels: np.ndarray | None = None,
  trajectory: np.ndarray | None = None,
  *,
  prompts: list[str] | None = None,
  ncols: int | None = None,
) -> list[epath.Path]:
  """Writes a sampling result the way ``jaxdiff sample`` does; returns the files written.

  ``OUT/samples.png`` (a grid, ``ncols`` wide), ``OUT/samples.npz`` (``images``: uint8
  ``[N, H, W, C]``, and ``labels`` / each image's ``prompts`` if given) and, with a
  ``trajectory`` (uint8 ``[S + 1, N, H, W, C]``, x_T first),
  ``OUT/trajectory.gif``: at most ``MAX_GIF_FRAMES`` evenly spaced grids, x_T first and the
  samples last. ``out_dir`` may be local (created) or ``gs://``; each file is written atomically.
  """
  out = files.make_dirs(out_dir)
  save_png(make_grid(pixels, ncols), out / "samples.png")
  arrays = {"images": pixels} if labels is None else {"images": pixels, "labels": labels}
  if prompts is not None:
    arrays["prompts"] = np.asarray(prompts, dtype=str)
  with files.atomic_path(out / "samples.npz") as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)
  written = [out / "samples.png", out / "samples.npz"]
  if trajectory is not None:
    idx = np.unique(np.linspace(0, len(trajectory) - 1, MAX_GIF_FRAMES).round().astype(int))
    save_gif([make_grid(trajectory[i], ncols) for i in idx], out / "trajectory.gif")
    written.append(out / "trajectory.gif")
  return written
