"""Bits/dim of 8-bit images by the probability-flow ODE, for any noise process (Song et al.
2021, Sec. 4.3 and App. D.2).

Every process is, in its own scaled coordinates, ``x = y + sigma n`` with a denoiser ``D(x;
sigma)`` (Karras et al. 2022, eq. 4); :func:`jaxdiff.core.continuous.ode.sigma_log_likelihood`
solves its ODE in ``ln sigma`` from the process's smallest sigma to its largest, with a
Hutchinson (Rademacher) trace estimate, in one compiled loop. This module feeds it the images of
a split, uniformly dequantised, batch-sharded over all devices and processes, and turns nats into
bits per dimension:

- pixel ``p`` in 0..255 becomes ``x = (p + u - 1/2) / 127.5 - 1`` with ``u ~ U[0, 1)``: the bins
  of width 1/127.5 centred on the values the model was trained on. Then ``-log2 P(p) <= -E_u
  log2 p(x) + D log2 127.5`` (the dequantisation bound of Theis et al. 2016, Sec. 3.1), so the
  result is an upper bound on the model's discrete bits/dim, up to the solver's error, as
  Song et al.'s ``offset = 7`` is for their bins;
- example i's u and probe come from ``fold_in(key(seed), i)``: the result depends on neither the
  batch size nor the device count.

Example::

  view = process.sigma_view(diffusion, model_fn)      # D, sigma range, prior variance
  record = ode_bits_per_dim(view, images, batch_size=128, num_steps=64)
  record["bpd"], record["bpd_stderr"], record["per_example_bpd"]
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh

from jaxdiff import parallel
from jaxdiff.core.continuous import ode
from jaxdiff.evaluation import bpd

PIXEL_SCALE = 127.5  # x = p / 127.5 - 1: the data scaling of jaxdiff.io.images


def dequantize(pixels: jax.Array, u: jax.Array) -> jax.Array:
  """``(p + u - 1/2) / 127.5 - 1``: uint8 pixels and uniform ``u`` in [0, 1) to model inputs."""
  return (pixels.astype(jnp.float32) + u - 0.5) / PIXEL_SCALE - 1.0


def nats_to_bits_per_dim(log_p: jax.Array, num_dims: int) -> jax.Array:
  """``-log p / (D ln 2) + log2 127.5``: bits per pixel value of the dequantised density."""
  return -log_p / (num_dims * math.log(2.0)) + math.log2(PIXEL_SCALE)


def solver_problems(
  method: str, num_steps: int, rtol: float, atol: float, max_steps: int, divergence: str
) -> list[str]:
  """What is wrong with these solver settings (the ones the method reads), one line each."""
  problems = []
  if method not in ode.METHODS:
    problems.append(f"method={method!r}: allowed {', '.join(ode.METHODS)}")
  if divergence not in ode.DIVERGENCES:
    problems.append(f"divergence={divergence!r}: allowed {', '.join(ode.DIVERGENCES)}")
  if method in ode.FIXED_METHODS and not num_steps >= 1:
    problems.append(f"num_steps={num_steps}: need >= 1 solver steps")
  if method == "dopri5":
    for name, value in (("rtol", rtol), ("atol", atol)):
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        problems.append(f"{name}={value}: a tolerance > 0")
    if not (isinstance(max_steps, int) and max_steps >= 1):
      problems.append(f"max_steps={max_steps}: an int >= 1")
  return problems


def _check_solved(solved: np.ndarray, max_steps: int) -> None:
  if not solved.all():
    raise RuntimeError(
      f"dopri5 reached sigma_max for {int(solved.sum())} of {len(solved)} images within"
      f" max_steps={max_steps} attempted steps (first unsolved: image"
      f" {int(np.argmin(solved))}); allow more steps or loosen rtol/atol"
    )


def _batch_bpd(view: ode.SigmaView, options: dict[str, Any], pixels, keys) -> tuple:
  """``[B]`` bits/dim of a batch of uint8 images, each with its own u and probe, and the
  solver's ``[B]`` evaluations and ``[B]`` solved flags."""
  shape, dtype = pixels.shape[1:], jnp.float32

  def draws(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_u, k_probe = jax.random.split(key)
    return jax.random.uniform(k_u, shape, dtype), ode.rademacher(k_probe, shape, dtype)

  u, probe = jax.vmap(draws)(keys)
  x = dequantize(pixels, u)
  out = ode.sigma_log_likelihood(
    view.denoise,
    x,
    sigma_min=view.sigma_min,
    sigma_max=view.sigma_max,
    prior_var=view.prior_var,
    probe=probe,
    **options,
  )
  return nats_to_bits_per_dim(out["log_p"], math.prod(shape)), out["nfe"], out["solved"]


def ode_bits_per_dim(
  view: ode.SigmaView,
  images: np.ndarray,
  *,
  batch_size: int,
  seed: int = 0,
  num_steps: int = 64,
  method: str = "rk4",
  divergence: str = "hutchinson",
  rtol: float = 1e-5,
  atol: float = 1e-5,
  max_steps: int = 1000,
  mesh: Mesh | None = None,
  progress: bool = False,
) -> dict[str, Any]:
  """Bits/dim of ``images`` under the probability-flow ODE of ``view``.

  Args:
    view: the model as a denoiser over a sigma range (``jaxdiff.core.process.sigma_view``).
    images: uint8 ``[N, H, W, C]``, the same on every process.
    batch_size: global examples per batch, a positive multiple of the mesh's devices.
    seed: the dequantisation and probe seed.
    num_steps: fixed solver steps, even in ln sigma (4 model calls each with ``rk4``, 2 with
      ``heun``; each a forward and a Jacobian-vector product); unused by ``dopri5``.
    method: ``rk4``, ``heun`` or ``dopri5`` (adaptive steps to ``rtol``/``atol``, at most
      ``max_steps`` attempted; an image that needs more is an error).
    divergence: ``hutchinson`` (one Rademacher probe per example) or ``exact`` (one JVP per
      dimension: small images only).
    mesh: defaults to ``parallel.make_mesh()``.
    progress: a tqdm bar over the batches (process 0).

  Returns:
    ``{"metric": "ode_bpd", "bpd", "bpd_stderr", "num_examples", "method", "divergence",
    "num_steps" (fixed) or "rtol", "atol", "max_steps" (dopri5), "nfe_mean", "nfe_max" (model
    evaluations per image), "sigma_min", "sigma_max", "seed", "seconds", "per_example_bpd"
    [N]}``.
  """
  start = time.perf_counter()
  if problems := solver_problems(method, num_steps, rtol, atol, max_steps, divergence):
    raise ValueError("; ".join(problems))
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 [N, H, W, C] (8-bit pixels), got {images.dtype}")
  mesh = parallel.make_mesh() if mesh is None else mesh
  batches = bpd.ExampleBatches(images, batch_size=batch_size, mesh=mesh, seed=seed, pixels=True)
  if method == "dopri5":
    options = dict(method=method, rtol=float(rtol), atol=float(atol), max_steps=int(max_steps))
  else:
    options = dict(method=method, num_steps=int(num_steps))
  options["divergence"] = divergence
  batch_bpd = jax.jit(functools.partial(_batch_bpd, view, options))
  n = batches.n
  bits, nfe, solved = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
  quiet = not progress or jax.process_index() != 0
  solver = f"{method}, rtol {rtol:g}" if method == "dopri5" else f"{num_steps} {method} steps"
  desc = f"ODE bits/dim ({n} examples, {solver})"
  with tqdm.tqdm(total=len(batches), disable=quiet, unit="batch", desc=desc) as bar:
    for lo, hi, x, keys in batches:
      got = parallel.to_host(batch_bpd(x, keys))
      bits[lo:hi], nfe[lo:hi], solved[lo:hi] = (a[: hi - lo] for a in got)
      bar.update(1)
      bar.set_postfix(bpd=f"{bits[:hi].mean():.4f}", nfe=int(nfe[:hi].max()))
  _check_solved(solved, max_steps)
  stderr = float(bits.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  return {
    "metric": "ode_bpd",
    "bpd": float(bits.mean()),
    "bpd_stderr": stderr,
    "num_examples": n,
    **options,
    "nfe_mean": float(nfe.mean()),
    "nfe_max": int(nfe.max()),
    "sigma_min": float(view.sigma_min),
    "sigma_max": float(view.sigma_max),
    "seed": seed,
    "seconds": round(time.perf_counter() - start, 1),
    "per_example_bpd": bits,
  }
