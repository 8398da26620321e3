"""Image helpers: exact 8-bit round trips, grid layout, PNG and GIF files."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff.io import images


def test_to_uint8_inverts_the_model_scaling_exactly():
  k = np.arange(256)
  np.testing.assert_array_equal(images.to_uint8(k / 127.5 - 1.0), k)
  np.testing.assert_array_equal(images.to_uint8(np.float32(k / 127.5 - 1.0)), k)
  got = images.to_uint8(np.array([-3.0, -1.0, 1.0, 2.5, np.nan, np.inf, -np.inf]))
  np.testing.assert_array_equal(got, [0, 0, 255, 255, 0, 255, 0])
  assert got.dtype == np.uint8
  # Nearest level: 0.0 is 127.5 exactly; round half to even gives 128.
  np.testing.assert_array_equal(images.to_uint8([0.0, 0.003, -0.003]), [128, 128, 127])


def test_make_grid_places_images_row_by_row():
  x = np.stack([np.full((2, 3, 1), i + 1, np.uint8) for i in range(5)])  # [5, 2, 3, 1]
  grid = images.make_grid(x, padding=1)  # ceil(sqrt(5)) = 3 columns, 2 rows
  assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
  for i in range(5):
    r, c = divmod(i, 3)
    np.testing.assert_array_equal(grid[1 + 3 * r : 3 + 3 * r, 1 + 4 * c : 4 + 4 * c], i + 1)
  assert grid[0].max() == 0 and grid[:, 0].max() == 0  # border
  np.testing.assert_array_equal(grid[4:6, 9:12], 0)  # the empty sixth cell
  assert images.make_grid(x, ncols=5, padding=0).shape == (2, 15, 1)
  assert images.make_grid(x[..., 0], ncols=1, padding=0).shape == (10, 3, 1)
  with pytest.raises(ValueError, match=r"needs \[N, H, W, C\] images"):
    images.make_grid(np.zeros((0, 2, 2, 1)))


@pytest.mark.parametrize("channels", [1, 3])
def test_save_png_round_trips(tmp_path, channels):
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
  path = tmp_path / "sub" / "x.png"
  images.save_png(img, path)
  back = np.asarray(Image.open(path))
  np.testing.assert_array_equal(back.reshape(img.shape), img)
  with pytest.raises(ValueError, match="expected uint8"):
    images.save_png(img.astype(np.float32), path)


def test_save_gif_writes_every_frame(tmp_path):
  frames = [np.full((4, 6, 1), v, np.uint8) for v in (0, 100, 255)]
  path = tmp_path / "chain.gif"
  images.save_gif(frames, path, duration_ms=50, hold_last_ms=500)
  gif = Image.open(path)
  assert gif.n_frames == 3
  seen = []
  for i in range(3):
    gif.seek(i)
    seen.append(np.asarray(gif.convert("L")))
  np.testing.assert_array_equal([s[0, 0] for s in seen], [0, 100, 255])
  gif.seek(2)
  assert gif.info["duration"] == 500
  rgb = [np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8) for i in range(2)]
  images.save_gif(rgb, tmp_path / "rgb.gif")
  assert Image.open(tmp_path / "rgb.gif").n_frames == 2
