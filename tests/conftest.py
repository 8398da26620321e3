"""Test setup: simulate 8 CPU devices before JAX initialises its backend."""

import os

# Must run before the first JAX computation; conftest is imported before any test module.
os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests compile many small, often identical programs (the same train step for
# several configs and meshes): a persistent cache turns repeats into loads.
_CACHE = os.environ.get(
  "JAXDIFF_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
  """48 random 8x8 grey PNGs in two class folders: a dataset that needs no download."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for i in range(48):
    folder = root / f"class{i % 2}"
    folder.mkdir(exist_ok=True)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
  return root
