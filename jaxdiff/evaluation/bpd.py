"""The full variational bound of a model on N images, in bits/dim (Ho et al. 2020, eq. 5).

Decoder ``L_0`` + all ``T - 1`` KL terms + the prior ``L_T`` for every example, with
``clip_denoised=True`` as in the reference evaluations. The examples are read with the split
reader (``jaxdiff.data.SplitReader``), batch-sharded over all devices and processes; the T terms
run as ``lax.scan`` chunks of ``t_chunk`` timesteps (one compile) so the progress bar moves.
Example i's noise comes from ``fold_in(fold_in(key(seed), i), t)``: the result depends on
neither the batch size, the chunking nor the device count.

Example::

  images = data.read_examples(config.data, "test", 1000)      # uint8 [N, H, W, C]
  record = bits_per_dim(d, model_fn, images, batch_size=128)
  record["bpd"], record["bpd_stderr"], record["terms"]["vb"]   # [T] per-timestep terms
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh

from jaxdiff import data, parallel
from jaxdiff.core import likelihood
from jaxdiff.core import process as process_lib
from jaxdiff.core.diffusion import Diffusion

# Module-level jits: the model's parameters, the schedule and the data are arguments, so every
# evaluation of the same shapes (other checkpoints, EMA or raw) reuses the compiled code.
_chunk_terms = jax.jit(likelihood.calc_bpd_terms, static_argnames=("clip_denoised", "decoder"))
_prior_bpd = jax.jit(likelihood.prior_bpd)


@jax.jit
def _example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


class ExampleBatches:
  """The N examples of a likelihood evaluation, checked and read in sharded global batches.

  Iterating gives ``(lo, hi, images, keys)`` per batch: examples ``lo:hi`` of the N (the batch
  is padded past ``hi`` to a multiple of the devices), the global batch, and example i's key
  ``fold_in(key(seed), i)`` (``[B]``), so what an example draws depends on neither the batch
  size nor the device count. Shared by :func:`bits_per_dim`, :func:`vdm_bits_per_dim` and
  :func:`jaxdiff.evaluation.ode_bpd.ode_bits_per_dim`.

  Raises:
    ValueError: a batch size that does not split over the mesh's devices, or images that are
      not ``[N, H, W, C]`` with N >= 1.
  """

  def __init__(
    self, images: np.ndarray, *, batch_size: int, mesh: Mesh, seed: int, pixels: bool = False
  ):
    parallel.check_batch_size(batch_size, mesh, what="batch_size")
    self.images = np.asarray(images)
    if self.images.ndim != 4 or len(self.images) == 0:
      raise ValueError(f"images must be [N, H, W, C] with N >= 1, got shape {self.images.shape}")
    self.mesh, self.seed, self.n = mesh, seed, len(self.images)
    self.reader = data.SplitReader(
      data.ArraySource(self.images), batch_size=batch_size, multiple=mesh.size, prefetch=0,
      pixels=pixels,
    )  # fmt: skip

  def __len__(self) -> int:
    return len(self.reader)

  def __iter__(self) -> Iterator[tuple[int, int, jax.Array, jax.Array]]:
    size = self.reader.batch_size
    for b, batch in enumerate(self.reader):
      local = {"image": batch["image"], "index": batch["index"].astype(np.int32)}
      x = parallel.global_batch(self.mesh, local)
      keys = _example_keys(jax.random.key(self.seed), x["index"])
      yield b * size, min((b + 1) * size, self.n), x["image"], keys


@dataclasses.dataclass
class _Sums:
  """Running sums over examples of the per-timestep terms ``[T]``, and per-example totals."""

  vb: np.ndarray
  vb_sq: np.ndarray
  xstart_mse: np.ndarray
  mse: np.ndarray
  total: np.ndarray  # [N] the bound of each example
  decoder: np.ndarray  # [N]
  prior: np.ndarray  # [N]

  @classmethod
  def zeros(cls, num_timesteps: int, num_examples: int) -> _Sums:
    t, n = (np.zeros(num_timesteps) for _ in range(4)), (np.zeros(num_examples) for _ in range(3))
    return cls(*t, *n)


def _add_chunk(sums: _Sums, terms: dict[str, np.ndarray], ts: np.ndarray, lo: int, hi: int):
  """Adds the host ``terms`` ``[B, K]`` of examples ``lo:hi`` at timesteps ``ts``."""
  vb = terms["vb"][: hi - lo, : len(ts)].astype(np.float64)  # [b, K]
  sums.total[lo:hi] += vb.sum(axis=1)
  if ts[0] == 0:
    sums.decoder[lo:hi] = vb[:, 0]
  sums.vb[ts] += vb.sum(axis=0)
  sums.vb_sq[ts] += np.square(vb).sum(axis=0)
  sums.xstart_mse[ts] += terms["xstart_mse"][: hi - lo, : len(ts)].sum(axis=0)
  sums.mse[ts] += terms["mse"][: hi - lo, : len(ts)].sum(axis=0)


def _add_batch(
  sums: _Sums,
  d: Diffusion,
  model_fn: Callable[..., jax.Array],
  x0: jax.Array,
  keys: jax.Array,
  chunks: list[np.ndarray],
  clip_denoised: bool,
  lo: int,
  hi: int,
  done: Callable[[int], Any],
  decoder: str = "discretized",
) -> None:
  """Adds the prior and every chunk of terms of the global batch ``x0`` (examples ``lo:hi``)."""
  prior = parallel.to_host(_prior_bpd(d, x0))[: hi - lo]
  sums.prior[lo:hi] = prior
  sums.total[lo:hi] = prior
  k = len(chunks[0])
  for ts in chunks:
    padded = jnp.asarray(parallel.pad_to(ts, k))
    terms = _chunk_terms(
      d, model_fn, x0, keys, padded, clip_denoised=clip_denoised, decoder=decoder
    )
    _add_chunk(sums, parallel.to_host(terms), ts, lo, hi)
    done(1)


def _stderr(x: np.ndarray) -> float:
  return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _record(sums: _Sums, n: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The bound's summary and its per-timestep terms (means and standard errors over examples)."""
  vb_mean = sums.vb / n
  vb_var = np.maximum(sums.vb_sq / n - vb_mean**2, 0.0) * (n / max(n - 1, 1))
  summary = {
    "bpd": float(sums.total.mean()),
    "bpd_stderr": _stderr(sums.total),
    "prior_bpd": float(sums.prior.mean()),
    "decoder_bpd": float(sums.decoder.mean()),
    "kl_bpd": float((sums.total - sums.prior - sums.decoder).mean()),
  }
  terms = {
    "vb": vb_mean,
    "vb_stderr": np.sqrt(vb_var / n),
    "xstart_mse": sums.xstart_mse / n,
    "mse": sums.mse / n,
  }
  return summary, terms


def bits_per_dim(
  d: Diffusion,
  model_fn: Callable[..., jax.Array],
  images: np.ndarray,
  *,
  seed: int = 0,
  batch_size: int,
  t_chunk: int = 100,
  clip_denoised: bool = True,
  mesh: Mesh | None = None,
  progress: bool = False,
  decoder: str = "discretized",
) -> dict[str, Any]:
  """The full variational bound of ``model_fn`` on ``images``, in bits/dim.

  Args:
    d: the diffusion.
    model_fn: ``model_fn(x_t, t) -> output``, e.g. ``models.bind(graphdef, params)``.
    images: the N examples, uint8 ``[N, H, W, C]`` (``jaxdiff.data.read_examples``), the same
      on every process.
    seed: the noise seed.
    batch_size: global examples per batch, a positive multiple of the mesh's devices.
    t_chunk: timesteps per compiled scan (the progress bar's unit; not the result's).
    clip_denoised: clip the model's x_0 estimates to [-1, 1] (True in the reference
      evaluations).
    mesh: defaults to ``parallel.make_mesh()``.
    progress: show a tqdm bar (on process 0) labelled ``bits/dim (N examples, T timesteps)``
      that advances per chunk of ``t_chunk`` timesteps of a batch, with the running bound.
    decoder: "discretized" (8-bit images, the default) or "gaussian": ``images`` are then
      continuous floats (a latent run's latents) and the result is a bound in bits per latent
      dimension, a differential one, not comparable with image bits/dim.

  Returns:
    The record ``{"metric": "bpd", "bpd", "bpd_stderr", "prior_bpd", "decoder_bpd", "kl_bpd",
    "num_examples", "num_timesteps", "seed", "clip_denoised", "seconds"}`` plus ``terms``:
    per-timestep arrays ``vb``, ``vb_stderr``, ``xstart_mse``, ``mse`` ``[T]``, and
    ``per_example_bpd`` ``[N]`` (for paired comparisons: same examples, same noise).

  Raises:
    ValueError: ``t_chunk < 1``, a batch size that does not split over the devices, or images
      that are not ``[N, H, W, C]`` with N >= 1.
  """
  start_time = time.perf_counter()
  if t_chunk < 1:
    raise ValueError(f"t_chunk={t_chunk} must be >= 1")
  clip_denoised = bool(clip_denoised)
  mesh = parallel.make_mesh() if mesh is None else mesh
  batches = ExampleBatches(images, batch_size=batch_size, mesh=mesh, seed=seed)
  n, T = batches.n, d.num_timesteps
  k = min(t_chunk, T)
  # Fixed-length chunks (the last padded with t = T - 1, its columns dropped): one compile.
  chunks = [np.arange(s, min(s + k, T)) for s in range(0, T, k)]
  sums = _Sums.zeros(T, n)
  quiet = not progress or jax.process_index() != 0
  # One tick per compiled chunk of k timesteps of one batch: batches x chunks in all.
  desc = f"bits/dim ({n} examples, {T} timesteps)"
  bar = tqdm.tqdm(total=len(batches) * len(chunks), disable=quiet, unit="t-chunk", desc=desc)
  for lo, hi, x, keys in batches:
    _add_batch(sums, d, model_fn, x, keys, chunks, clip_denoised, lo, hi, bar.update, decoder)
    bar.set_postfix(bpd=f"{sums.total[:hi].mean():.4f}")
  bar.close()
  summary, terms = _record(sums, n)
  settings = {"num_examples": n, "seed": seed, "num_timesteps": T, "clip_denoised": clip_denoised}
  if decoder != "discretized":
    settings["decoder"] = decoder
  seconds = round(time.perf_counter() - start_time, 1)
  record = {"metric": "bpd", **settings, **summary, "seconds": seconds}
  return {**record, "terms": terms, "per_example_bpd": sums.total}


# ----------------------------------------------------------------------------- vdm


@functools.partial(jax.jit, static_argnames=("num_t",))
def _vdm_terms(p: Any, model_fn: Any, x0: jax.Array, keys: jax.Array, num_t: int):
  """``[B]`` prior and reconstruction, ``[num_t, B]`` diffusion terms (bits/dim) of ``x0``;
  repetition r of example i draws t, eps and eps_0 from ``fold_in(keys[i], r)``."""
  gamma_fn = process_lib.vdm_process.model_schedule(model_fn)

  def one(r):
    ks = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, r), 3))(keys)  # [B, 3]
    t = jax.vmap(lambda k: jax.random.uniform(k, ()))(ks[:, 0])
    eps, eps_0 = (jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(ks[:, j]) for j in (1, 2))
    return process_lib.vdm_process.vdm_losses(p, model_fn, gamma_fn, x0, t, eps, eps_0)

  terms = jax.lax.map(one, jnp.arange(num_t))  # each [num_t, B]
  return terms["prior"][0], terms["reconstruction"][0], terms["diffusion"]


def vdm_bits_per_dim(
  p: Any,
  model_fn: Callable[..., jax.Array],
  images: np.ndarray,
  *,
  seed: int = 0,
  batch_size: int,
  num_t: int = 1,
  mesh: Mesh | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """VDM's bound (Kingma et al. 2021, eq. 11) on ``images``, in bits/dim, with standard errors.

  Per example: the prior and reconstruction terms (exact given z_0's one draw) plus the mean of
  ``num_t`` one-sample estimates of the diffusion term (t uniform, :func:`jaxdiff.core.
  vdm_process.vdm_losses`; the T-step loss if the process has ``num_steps``). Example i's
  randomness is ``fold_in(fold_in(key(seed), i), r)``: the result depends on neither the batch
  size nor the device count.

  Args:
    p: the :class:`jaxdiff.core.process.VDM` process.
    model_fn: the bound model, ``jaxdiff.models.bind(graphdef, params)`` (its schedule is read
      from it).
    images: uint8 ``[N, H, W, C]``.
    seed: the noise seed.
    batch_size: global examples per batch, a positive multiple of the mesh's devices.
    num_t: diffusion-term draws per example.
    mesh: defaults to ``parallel.make_mesh()``.
    progress: a tqdm bar over the batches (process 0).

  Returns:
    ``{"metric": "bpd", "bpd", "bpd_stderr", "prior_bpd", "reconstruction_bpd",
    "diffusion_bpd", "diffusion_stderr", "num_examples", "num_t", "num_timesteps", "seed",
    "seconds", "per_example_bpd" [N]}``.
  """
  start_time = time.perf_counter()
  if num_t < 1:
    raise ValueError(f"num_t={num_t} must be >= 1")
  if process_lib.vdm_process.model_schedule(model_fn) is None:
    raise ValueError("model_fn must be a bound vdm model (jaxdiff.models.bind): its schedule")
  mesh = parallel.make_mesh() if mesh is None else mesh
  batches = ExampleBatches(images, batch_size=batch_size, mesh=mesh, seed=seed)
  n = batches.n
  prior, recon, diff = np.zeros(n), np.zeros(n), np.zeros(n)
  quiet = not progress or jax.process_index() != 0
  bar = tqdm.tqdm(total=len(batches), disable=quiet, unit="batch", desc=f"bits/dim ({n} examples)")
  for lo, hi, x, keys in batches:
    terms = parallel.to_host(_vdm_terms(p, model_fn, x, keys, num_t))
    prior[lo:hi], recon[lo:hi] = terms[0][: hi - lo], terms[1][: hi - lo]
    diff[lo:hi] = np.asarray(terms[2], np.float64)[:, : hi - lo].mean(axis=0)
    bar.update(1)
  bar.close()
  total = prior + recon + diff
  return {
    "metric": "bpd",
    "num_examples": n,
    "num_t": num_t,
    "num_timesteps": p.num_steps,
    "seed": seed,
    "bpd": float(total.mean()),
    "bpd_stderr": _stderr(total),
    "prior_bpd": float(prior.mean()),
    "reconstruction_bpd": float(recon.mean()),
    "diffusion_bpd": float(diff.mean()),
    "diffusion_stderr": _stderr(diff),
    "seconds": round(time.perf_counter() - start_time, 1),
    "per_example_bpd": total,
  }
