"""Diffusion in an autoencoder's latent space (Rombach et al. 2022): the scale, the run's latent
geometry, and the encoded training set.

A latent run names a trained autoencoder run in ``latent.autoencoder_workdir``. When it starts,
:func:`resolve` reads that run and fills in the latent fields of the config (``latent.size``,
``latent.channels``, ``latent.scale_factor``, the checkpoint step and its ``digest``), which are
then stored in the latent run's ``config.json``: from there on the denoiser is built for latents
``[size, size, channels]``, a resume against another autoencoder checkpoint is refused, and
``load_run`` finds the autoencoder that decodes the samples.

**The scale.** LDM divides latents by their standard deviation over training images (the
0.18215 of Stable Diffusion), so that the diffusion's unit-variance noise fits them. An
autoencoder run measures ``1 / std`` at every checkpoint with :func:`measure_scale` on the first
``autoencoder.scale_examples`` training images and stores it with the checkpoint (``stats``).

**The cache.** :func:`latent_source` encodes the training split once, sharded over the devices,
into ``CACHE/DIGEST-MODE-DATASET-SPLIT.{npy,labels.npy,json}`` (``latent.cache_dir``, by default
``AUTOENCODER_WORKDIR/latents``): scaled latents of the posterior mean, or with
``latent.sample`` a draw seeded per example (``fold_in(key(seed), index)``: the same on any
device count). The name carries the checkpoint's digest, so a changed autoencoder never reads a
stale cache. The files are read back memory-mapped as an ``ArraySource`` through the same grain
pipeline as images.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxdiff import data, parallel
from jaxdiff.config import is_latent, read_config
from jaxdiff.io import checkpoints, files
from jaxdiff.io.images import from_uint8
from jaxdiff.models import autoencoder as autoencoder_lib

# The latent fields resolve() fills in from the autoencoder run.
RESOLVED = ("autoencoder_step", "size", "channels", "scale_factor", "digest")
# The data fields an autoencoder and the latent runs on it must share.
SHARED_DATA = ("name", "image_size", "channels")


def measure_scale(
  encode: Callable[[np.ndarray], Any], images: np.ndarray, batch_size: int = 256
) -> dict[str, float]:
  """``{"scale_factor": 1 / std, "std", "mean", "num_examples"}`` of the (unscaled) latents
  ``encode`` gives the uint8 ``images [N, H, W, C]``: the std over every latent value, as LDM
  measures it. Encodes in chunks of ``batch_size``, the last one padded to full size (one
  compiled shape)."""
  chunks = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    chunks.append(np.asarray(jax.device_get(encode(from_uint8(padded))))[: len(chunk)])
  z = np.concatenate(chunks).astype(np.float64)
  std = float(z.std())
  return {"scale_factor": 1.0 / std, "std": std, "mean": float(z.mean()), "num_examples": len(z)}


def read_autoencoder(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, int]:
  """The autoencoder run's config and the checkpoint step a latent run uses (
  ``latent.autoencoder_step``, or its newest).

  Raises:
    FileNotFoundError, ValueError: no such run, not an autoencoder run, or no such checkpoint.
  """
  workdir = files.as_path(config.latent.autoencoder_workdir)
  ae_config = read_config(workdir)
  if ae_config.model.name != "autoencoder":
    raise ValueError(
      f"latent.autoencoder_workdir={str(workdir)!r}: a run of model.name="
      f"{ae_config.model.name!r}, not an autoencoder run (model.name='autoencoder')"
    )
  reader = checkpoints.Checkpointer(workdir / "checkpoints", read_only=True)
  try:
    steps = reader.all_steps()
  finally:
    reader.close()
  step = config.latent.autoencoder_step
  if not steps or (step is not None and step not in steps):
    what = f"no checkpoint {step}" if step is not None else "no checkpoint"
    raise FileNotFoundError(
      f"latent.autoencoder_workdir={str(workdir)!r}: {what} in {workdir / 'checkpoints'}"
      f"{f'; available: {steps}' if steps else ': train the autoencoder first'}"
    )
  return ae_config, steps[-1] if step is None else step


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Why ``config`` cannot run on its autoencoder, one line each; empty for a pixel run."""
  if not is_latent(config):
    return []
  try:
    resolve(config)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError) as e:
    return [str(e)]
  lines = []
  for key in ("clip_denoised",):
    for section in ("sampling", "eval"):
      if config[section][key]:
        lines.append(
          f"{section}.{key}=True: latents are not confined to [-1, 1]; set it to False in a"
          " latent run"
        )
  if config.data.random_flip:
    lines.append(
      "data.random_flip=True: a latent run reads cached latents, and a flipped latent is not"
      " the latent of a flipped image; set it to False"
    )
  if config.eval.every > 0:
    lines.append(
      f"eval.every={config.eval.every}: evaluation inside training is not supported for a latent"
      " run yet; use `jaxdiff evaluate` on its checkpoints (FD of decoded samples)"
    )
  return lines


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a latent run's ``config`` with the latent fields read from its autoencoder
  (``RESOLVED``); ``config`` itself for a pixel run.

  Raises:
    FileNotFoundError: no autoencoder run or checkpoint there.
    ValueError: not an autoencoder run, its data differ, a latent field set to another value
      than the autoencoder's, or a checkpoint without a stored scale factor.
  """
  if not is_latent(config):
    return config
  ae_config, step = read_autoencoder(config)
  where = f"the autoencoder run {config.latent.autoencoder_workdir}"
  for key in SHARED_DATA:
    if ae_config.data[key] != config.data[key]:
      raise ValueError(
        f"data.{key}={config.data[key]!r}: {where} was trained on data.{key}="
        f"{ae_config.data[key]!r}; a latent run must use the same data"
      )
  reader = checkpoints.Checkpointer(
    files.as_path(config.latent.autoencoder_workdir) / "checkpoints", read_only=True
  )
  try:
    stats = reader.read_json(step, "stats") or {}
    digest = reader.digest(step)
  finally:
    reader.close()
  if "scale_factor" not in stats:
    raise ValueError(f"checkpoint {step} of {where} stores no latent scale factor")
  side = autoencoder_lib.latent_side(
    ae_config.autoencoder.padded_size or ae_config.data.image_size, tuple(ae_config.model.ch_mult)
  )
  found = {
    "autoencoder_step": step,
    "size": side,
    "channels": ae_config.autoencoder.latent_channels,
    "scale_factor": float(stats["scale_factor"]),
    "digest": digest,
  }
  for key in ("size", "channels"):
    if config.latent[key] is not None and config.latent[key] != found[key]:
      raise ValueError(
        f"latent.{key}={config.latent[key]!r}: {where} makes {side}x{side}x{found['channels']}"
        " latents; leave it unset (it is read from the autoencoder)"
      )
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    for key, value in found.items():
      resolved.latent[key] = value
  return resolved


def cache_path(config: ml_collections.ConfigDict, split: str) -> Any:
  """The cache's base path (add ``.npy``, ``.labels.npy``, ``.json``) for a resolved config."""
  latent = config.latent
  root = latent.cache_dir or files.as_path(latent.autoencoder_workdir) / "latents"
  mode = f"sample{config.seed}" if latent.sample else "mean"
  name = f"{latent.digest[:16]}-{mode}-{files.slug(config.data.name)}-{files.slug(split)}"
  return files.as_path(root) / name


def latent_source(
  config: ml_collections.ConfigDict, encode: Callable, mesh: Mesh, split: str | None = None
) -> data.ArraySource:
  """The training split's scaled latents as a source (encoded now if not cached yet).

  Args:
    config: a resolved latent run's config.
    encode: ``encode(images, keys_or_None) -> scaled latents``, jitted (``Run.encode``-like,
      with per-example keys ``[B]`` or None for the posterior mean).
    mesh: the devices to encode on; the batch is sharded over them.
    split: default ``config.data.split``.
  """
  split = split or config.data.split
  base = cache_path(config, split)
  meta = files.as_path(f"{base}.json")
  if not meta.exists():
    _encode_split(config, encode, mesh, split, base)
  parallel.sync("latent cache")
  latents = np.load(f"{base}.npy", mmap_mode="r")
  labels = np.load(f"{base}.labels.npy")
  return data.ArraySource(latents, labels)


def _encode_split(config, encode: Callable, mesh: Mesh, split: str, base: Any) -> None:
  """Encodes ``split`` in order, sharded, and (process 0) writes the cache atomically, the JSON
  last: a cache without its JSON is never read."""
  reader = data.split_reader(
    config.data, split, batch_size=config.latent.encode_batch_size, multiple=mesh.size
  )
  root = jax.random.key(config.seed)
  chunks, labels = [], []
  for batch in reader:
    glob = parallel.global_batch(mesh, {"image": batch["image"], "index": batch["index"]})
    keys = (
      jax.vmap(lambda i: jax.random.fold_in(root, i))(glob["index"])
      if config.latent.sample
      else None
    )
    z = parallel.to_host(encode(glob["image"], keys))
    mask = parallel.to_host(parallel.global_batch(mesh, {"m": batch["mask"]})["m"])
    chunks.append(z[mask])
    labels.append(parallel.to_host(parallel.global_batch(mesh, {"y": batch["label"]})["y"])[mask])
  if jax.process_index() != 0:
    return
  latents = np.concatenate(chunks).astype(np.float32)
  with files.atomic_path(f"{base}.npy") as tmp, open(tmp, "wb") as f:
    np.save(f, latents)
  with files.atomic_path(f"{base}.labels.npy") as tmp, open(tmp, "wb") as f:
    np.save(f, np.concatenate(labels).astype(np.int32))
  info = {
    "autoencoder_workdir": str(config.latent.autoencoder_workdir),
    "autoencoder_step": config.latent.autoencoder_step,
    "digest": config.latent.digest,
    "scale_factor": config.latent.scale_factor,
    "mode": "sample" if config.latent.sample else "mean",
    "seed": config.seed,
    "dataset": config.data.name,
    "split": split,
    "shape": list(latents.shape),
    "std": float(latents.std()),
  }
  with files.atomic_path(f"{base}.json") as tmp:
    tmp.write_text(json.dumps(info, indent=2))


def encoder(graphdef: Any, params: Any, scale_factor: float) -> Callable:
  """``encode(images, keys) -> scaled latents``, jitted: the posterior mean when ``keys`` is
  None, else one posterior draw per example, each with its own key ``keys [B]``."""
  coder = autoencoder_lib.Coder(graphdef)

  @jax.jit
  def encode(images, keys):
    mean, logvar = coder.moments(params, images)
    if keys is not None:
      eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
      mean = mean + jnp.exp(0.5 * logvar) * eps
    return mean * scale_factor

  return encode
