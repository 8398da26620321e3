"""The one scan driver: any registered sampler, from x_T to x_0, jitted and sharded.

:func:`make_sampler` looks the sampler up in the registry, builds its
``init`` / ``step`` pair from the options it takes, and returns the pure
``fn(d, model_fn, key, x_T, labels=None)`` that scans ``step`` over the S steps
of ``d``. :func:`sample` respaces, draws x_T and calls a cached jitted ``fn``;
:func:`sample_in_chunks` draws many samples in fixed-size chunks. With ``progress`` the scan
reports every step to the host (:mod:`.progress`), so one bar advances per step even
when a chunk is a single compiled call.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxdiff.core import process as process_lib
from jaxdiff.core.diffusion import Diffusion
from jaxdiff.parallel import DATA_AXIS, auto_mesh, constrain, to_host
from jaxdiff.sampling import progress as progress_lib
from jaxdiff.sampling.base import Chain, ModelFn, Sampler
from jaxdiff.sampling.guidance import check_guidance, guided_model_output
from jaxdiff.sampling.registry import (
  SIGMA_GRID,
  SamplerDef,
  check_process,
  check_temperature,
  get_sampler,
)
from jaxdiff.sampling.sde import check_predictor
from jaxdiff.sampling.spacing import sampler_timesteps

SamplerFn = Callable[..., Any]


def _chain(
  d: Diffusion,
  model_fn: ModelFn,
  key: jax.Array,
  x_T: jax.Array,
  labels: Any,
  uncond: Any,
  guidance: dict[str, Any],
  mesh: Mesh | None,
) -> Chain:
  """What every step of one call sees: the guided model at an index (or a process time), and
  sharded noise."""
  B = x_T.shape[0]

  def model_at(x: jax.Array, t: jax.Array) -> jax.Array:
    s = process_lib.model_time(d, t)
    out = guided_model_output(model_fn, x, s, labels, uncond=uncond, **guidance)
    return out.astype(x.dtype)  # the sampler maths stay in x's dtype

  def model(x: jax.Array, t_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = jnp.full((B,), t_index, jnp.int32)
    return model_at(x, process_lib.level_time(d, t)), t

  def noise(k: jax.Array) -> jax.Array:
    return constrain(jax.random.normal(k, x_T.shape, x_T.dtype), mesh)

  return Chain(d, model, noise, key, model_at)


def _scan(
  sampler: Sampler,
  chain: Chain,
  x_T: jax.Array,
  return_trajectory: bool,
  mesh: Mesh | None,
  report_steps: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Scans ``carry = step(carry, i, t, chain)`` over i = 0..S-1, t = S-1..0; with
  ``report_steps`` every step calls the host once (:func:`.progress.report_step`)."""
  S = chain.d.num_timesteps

  def body(carry: Any, inputs: tuple[jax.Array, jax.Array]) -> tuple[Any, jax.Array | None]:
    i, t = inputs
    if report_steps:  # traced only when asked: without it the program has no callback
      progress_lib.report_step()
    carry = sampler.step(carry, i, t, chain)
    carry = carry._replace(x=constrain(carry.x, mesh))
    return carry, (carry.x if return_trajectory else None)

  steps = (jnp.arange(S), jnp.arange(S - 1, -1, -1))
  carry, traj = jax.lax.scan(body, sampler.init(constrain(x_T, mesh), chain), steps)
  if not return_trajectory:
    return carry.x
  traj = jnp.concatenate([x_T[None], traj])  # [S + 1, B, H, W, C], x_T first
  return carry.x, constrain(traj, mesh, batch_axis=1)


# make_sampler's keywords that go to the factory of a sampler that lists them.
_SHARED_OPTIONS = ("eta", "clip_denoised", "temperature", "snr", "n_corrector_steps", "predictor")


def _build(definition: SamplerDef, name: str, options: dict[str, Any]) -> Sampler:
  """The factory called with the options it takes; an option it does not take is an error
  unless it is one of :func:`make_sampler`'s own keywords (which every sampler accepts)."""
  extra = sorted(set(options) - set(_SHARED_OPTIONS) - set(definition.options))
  if extra:
    raise ValueError(
      f"sampler {name!r} takes no option {', '.join(extra)}; its options:"
      f" {', '.join(definition.options) or 'none'}"
    )
  return definition.factory(**{k: v for k, v in options.items() if k in definition.options})


def make_sampler(
  sampler: str = "ddim",
  *,
  eta: float = 0.0,
  clip_denoised: bool = True,
  guidance_scale: float = 1.0,
  null_label: int | None = None,
  temperature: float = 1.0,
  return_trajectory: bool = False,
  mesh: Mesh | None = None,
  snr: float = 0.16,
  n_corrector_steps: int = 1,
  predictor: str = "ancestral",
  progress: bool = False,
  **options: Any,
) -> SamplerFn:
  """A pure sampling function with the hyperparameters closed over (optax style).

  The returned ``fn(d, model_fn, key, x_T, labels=None, uncond=None)`` runs the whole chain
  as one ``lax.scan`` over the S steps of ``d``; it is meant to be jitted by the
  caller (:func:`sample` does that and caches the result). ``d`` and, if it is a
  ``jax.tree_util.Partial``, ``model_fn``'s bound arguments (the parameters)
  are data, so a new schedule of the same length or new parameters reuse the
  compiled code.

  Args:
    sampler: one of :data:`SAMPLERS` (the registry's names).
    eta: DDIM's eta (0 deterministic, 1 the DDPM posterior).
    clip_denoised: clip every x_0 estimate to [-1, 1].
    guidance_scale: classifier-free guidance scale g (1: none).
    null_label: the "no class" label, needed when ``guidance_scale != 1``.
    temperature: scales all injected noise (x_T is not scaled); for a sampler that injects
      none (:func:`~jaxdiff.sampling.registry.injects_noise`) only 1.0 is allowed.
    return_trajectory: also return ``[S + 1, B, H, W, C]``, x_T first.
    mesh: a mesh with a ``data`` axis to shard the batch over, or None.
    snr: ``pc``'s Langevin signal-to-noise ratio.
    n_corrector_steps: ``pc``'s Langevin steps per level.
    predictor: ``pc``'s predictor, ``ancestral`` or ``euler_maruyama``.
    progress: report every step to the listeners of :func:`.progress.listen` (a host
      callback in the scan, ~20-70 us a step on CPU; False compiles none).
    **options: options of a registered sampler that are not keywords above.

  Returns:
    ``fn(d, model_fn, key, x_T, labels=None, uncond=None) -> x_0`` or ``(x_0, trajectory)``
    (``labels`` and ``uncond`` as for :func:`guided_model_output`).

  Raises:
    ValueError: for an unknown sampler or predictor, a bad option value, or an
      option the sampler does not take; ``fn``, when traced, for guidance without labels or
      without a null label or ``uncond``.
  """
  definition = get_sampler(sampler)
  check_predictor(predictor)
  if eta < 0 or temperature < 0 or snr <= 0 or n_corrector_steps < 0:
    raise ValueError(
      f"need eta >= 0, temperature >= 0, snr > 0 and n_corrector_steps >= 0; got eta={eta},"
      f" temperature={temperature}, snr={snr}, n_corrector_steps={n_corrector_steps}"
    )
  shared = dict(eta=eta, clip_denoised=clip_denoised, temperature=temperature, snr=snr)
  shared.update(n_corrector_steps=n_corrector_steps, predictor=predictor)
  problem = check_temperature(sampler, temperature, {**shared, **options})
  if problem:
    raise ValueError(problem)
  algo = _build(definition, sampler, {**shared, **options})
  mesh = None if mesh is None else auto_mesh(mesh)
  guidance = {"guidance_scale": guidance_scale, "null_label": null_label}

  def fn(d: Diffusion, model_fn: ModelFn, key: jax.Array, x_T: jax.Array, labels=None, uncond=None):
    check_guidance(guidance_scale, labels, null_label, uncond)
    labels, uncond = (
      jax.tree.map(lambda a: constrain(jnp.asarray(a), mesh), y) for y in (labels, uncond)
    )
    if isinstance(d, process_lib.VDMGrid):  # gamma on the grid, from the model's parameters
      d = process_lib.vdm_process.with_schedule(d, model_fn)
    chain = _chain(d, model_fn, key, x_T, labels, uncond, guidance, mesh)
    return _scan(algo, chain, x_T, return_trajectory, mesh, report_steps=progress)

  return fn


@functools.lru_cache(maxsize=64)
def _jitted_sampler(definition: SamplerDef, **options: Any) -> SamplerFn:
  # One jitted function per set of static options: repeated sample() calls hit
  # jit's cache instead of building (and compiling) a new function each time.
  # The definition is only part of the key: a name registered anew must miss.
  del definition
  return jax.jit(make_sampler(**options))


def _check_mesh(mesh: Mesh | None, batch: int) -> None:
  if mesh is None:
    return
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"mesh needs a {DATA_AXIS!r} axis to shard the batch; got {mesh.axis_names}")
  n = mesh.shape[DATA_AXIS]
  if batch % n:
    raise ValueError(
      f"batch size {batch} is not divisible by the {n} devices of the mesh's {DATA_AXIS!r}"
      f" axis; use a multiple of {n}"
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_x_T(key: jax.Array, shape: tuple[int, ...], mesh: Mesh | None) -> jax.Array:
  # Drawn under jit in the global view, sharded from the start (and multi-host safe).
  return constrain(jax.random.normal(key, shape), mesh)


def _start(
  key: jax.Array,
  shape: tuple[int, ...],
  x_T: jax.Array | None,
  labels: Any,
  uncond: Any,
  mesh: Mesh | None,
) -> tuple[jax.Array, Any, Any]:
  """x_T (drawn unless given); class labels as int32; every conditioning array checked to
  have the batch's leading size."""
  if x_T is None:
    x_T = _draw_x_T(key, shape, mesh)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
  labels = _conditioning(labels, "labels", shape[0])
  uncond = _conditioning(uncond, "uncond", shape[0])
  # A given x_T and the labels are resharded inside the jitted sampler, which
  # also accepts host arrays on every process of a multi-host run.
  return x_T, labels, uncond


def _conditioning(y: Any, name: str, batch: int) -> Any:
  """``y`` with int class labels as int32 (an array, or a mapping's ``label``), after checking
  that every array in it has ``batch`` rows."""
  if y is None:
    return None
  if not isinstance(y, Mapping):
    y = jnp.asarray(y, jnp.int32)
    if y.shape != (batch,):
      raise ValueError(f"{name} have shape {y.shape}, expected ({batch},)")
    return y
  y = {k: jnp.asarray(v, jnp.int32) if k == "label" else jnp.asarray(v) for k, v in y.items()}
  for k, v in y.items():
    if v.shape[:1] != (batch,):
      raise ValueError(f"{name}[{k!r}] has shape {v.shape}, expected ({batch}, ...)")
  return y


def sample(
  d: Diffusion,
  model_fn: ModelFn,
  key: jax.Array,
  shape: Sequence[int],
  *,
  sampler: str = "ddim",
  num_steps: int | None = None,
  spacing: str | None = None,
  eta: float = 0.0,
  clip_denoised: bool = True,
  guidance_scale: float = 1.0,
  labels: Any = None,
  null_label: int | None = None,
  uncond: Any = None,
  temperature: float = 1.0,
  return_trajectory: bool = False,
  x_T: jax.Array | None = None,
  mesh: Mesh | None = None,
  snr: float = 0.16,
  n_corrector_steps: int = 1,
  predictor: str = "ancestral",
  progress: bool | Callable[[], Any] = False,
  **options: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Draws samples ``[B, H, W, C]`` from the model.

  Respaces ``d`` to ``num_steps`` (:func:`sampler_timesteps`; a flow process: its grid of
  ``num_steps`` steps, :meth:`jaxdiff.core.process.FlowMatching.grid`), draws
  ``x_T ~ N(0, I)`` from ``split(key)[0]`` unless given, and runs the jitted
  sampler (compiled once per sampler options, shape and number of steps) with
  per-step keys ``fold_in(split(key)[1], i)``.

  Define ``model_fn`` once and reuse it: jit recognises it by identity. To pass
  parameters as arguments rather than compile them in as constants, give
  ``jax.tree_util.Partial(apply_fn, params)`` with ``apply_fn(params, x, t[, y])``.

  Args:
    d: the diffusion the model was trained with (or a respaced one), or a
      :class:`~jaxdiff.core.process.FlowMatching` process.
    model_fn: ``model_fn(x, t) -> output``; ``model_fn(x, t, y)`` when ``labels`` are given.
    key: PRNG key.
    shape: ``(B, H, W, C)``.
    sampler: one of :data:`SAMPLERS` that samples ``d``'s process.
    num_steps: number of steps (None: all T of ``d``; a flow needs a number).
    spacing: which steps to keep, see :func:`sampler_timesteps` (None: the sampler's default;
      ddpm only).
    eta: DDIM's eta.
    clip_denoised: clip x_0 estimates to [-1, 1].
    guidance_scale: classifier-free guidance scale (needs ``labels`` and ``null_label``).
    labels: ``[B]`` int class labels for a conditional model, or a mapping of ``[B, ...]``
      arrays (a text-conditioned model's ``tokens``, ``mask``, ``pooled``, and ``label``).
    null_label: the label meaning "no class".
    uncond: guidance's unconditional conditioning, shaped as ``labels`` (the empty or a
      negative prompt's encoding); default: ``labels`` set to ``null_label``.
    temperature: scales the injected noise.
    return_trajectory: also return the ``[S + 1, B, H, W, C]`` chain, x_T first.
    x_T: start from this noise instead of drawing it.
    mesh: shard the batch over this mesh's ``data`` axis.
    snr, n_corrector_steps, predictor: ``pc`` options (see :func:`make_sampler`).
    progress: True for a tqdm bar over the steps (process 0), or ``on_step()``, called once
      per step (from a host callback, on another thread; see :mod:`.progress`). Either
      compiles the sampler with the callback and waits for the samples, which are the same
      bits as without.
    **options: options of a registered sampler that are not keywords above (hashable).

  Returns:
    ``x_0`` ``[B, H, W, C]``, or ``(x_0, trajectory)``.

  Raises:
    ValueError: unknown sampler, ``num_steps`` outside 1..T, guidance without
      labels or null label, a mesh without ``data`` or not dividing the batch,
      or ``x_T`` / ``labels`` of the wrong shape.
  """
  shape = tuple(int(s) for s in shape)
  d = _discretize(d, sampler, num_steps, spacing)
  check_guidance(guidance_scale, labels, null_label, uncond)
  _check_mesh(mesh, shape[0])
  mesh = None if mesh is None else auto_mesh(mesh)
  key_T, key_steps = jax.random.split(key)
  x_T, labels, uncond = _start(key_T, shape, x_T, labels, uncond, mesh)
  if not isinstance(model_fn, jax.tree_util.Partial):
    model_fn = jax.tree_util.Partial(model_fn)  # a pytree: jit can take it as an argument
  fn = _jitted_sampler(
    get_sampler(sampler),
    sampler=sampler,
    eta=float(eta),
    clip_denoised=bool(clip_denoised),
    guidance_scale=float(guidance_scale),
    # Irrelevant without guidance: keep it out of the cache key.
    null_label=None if null_label is None or guidance_scale == 1.0 else int(null_label),
    temperature=float(temperature),
    return_trajectory=bool(return_trajectory),
    mesh=mesh,
    snr=float(snr),
    n_corrector_steps=int(n_corrector_steps),
    predictor=predictor,
    progress=bool(progress),
    **options,
  )
  with _reporting(progress, d.num_timesteps):
    out = fn(d, model_fn, key_steps, x_T, labels, uncond)
    return jax.block_until_ready(out) if progress else out


def _discretize(d: Any, sampler: str, num_steps: int | None, spacing: str | None) -> Any:
  """The sampler's S steps of the process: a respaced diffusion, a flow's or EDM's grid, or for a
  sigma sampler (``euler``, ``heun``, ``edm_stochastic``) the ddpm chain's sigma grid."""
  process = process_lib.name(d)
  check_process(sampler, process)
  on_sigma = get_sampler(sampler).spacing == SIGMA_GRID
  if (process != "ddpm" or on_sigma) and spacing is not None:
    grid = f"sampler {sampler!r}" if process == "ddpm" else f"a {process}"
    raise ValueError(f"spacing={spacing!r} is the ddpm chain's; {grid} steps on its own grid")
  return process_lib.discretize(
    d,
    num_steps,
    lambda d, n: sampler_timesteps(d, n, sampler=sampler, spacing=spacing),
    sigma=on_sigma and process == "ddpm",
  )


@contextlib.contextmanager
def _reporting(progress: bool | Callable[[], Any], num_steps: int) -> Iterator[None]:
  """What a sampler compiled with ``progress`` runs under: a listener, a step bar, or nothing."""
  if callable(progress):
    with progress_lib.listen(progress):
      yield
  elif progress:
    with progress_lib.step_bar(num_steps) as bar, progress_lib.listen(bar.update):
      yield
  else:
    yield


def sample_in_chunks(
  d: Diffusion,
  model_fn: ModelFn,
  key: jax.Array,
  num_samples: int,
  image_shape: Sequence[int],
  *,
  batch_size: int,
  labels: Any = None,
  uncond: Any = None,
  return_trajectory: bool = False,
  progress: bool = False,
  **kwargs: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Draws ``num_samples`` in chunks of ``batch_size`` with one compiled sampler.

  Chunk ``c`` uses ``fold_in(key, c)``; the last chunk is padded to
  ``batch_size`` (and the padding dropped) so every chunk has the same shape.
  Each chunk is fetched to host memory as it finishes, so the devices hold one
  chunk at a time.

  Args:
    d, model_fn: as for :func:`sample`.
    key: PRNG key.
    num_samples: N.
    image_shape: ``(H, W, C)``.
    batch_size: global samples per chunk (a multiple of the mesh's devices).
    labels: ``[N]`` int class labels, a mapping of ``[N, ...]`` arrays (see :func:`sample`),
      or None.
    uncond: guidance's unconditional conditioning for all N, shaped as ``labels``, or None.
    return_trajectory: also return the ``[S + 1, N, H, W, C]`` trajectories.
    progress: a tqdm bar (process 0) that advances every sampler step, over all chunks
      (steps x chunks, with an ETA); see :func:`sample`.
    **kwargs: any other :func:`sample` option (sampler, num_steps, mesh, ...).

  Returns:
    NumPy ``[N, H, W, C]`` samples, or ``(samples, trajectory)``.
  """
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
  labels = jax.tree.map(np.asarray, _conditioning(labels, "labels", num_samples))
  uncond = jax.tree.map(np.asarray, _conditioning(uncond, "uncond", num_samples))
  num_chunks = math.ceil(num_samples / batch_size)
  # sampler_timesteps keeps exactly N; a flow needs N (sample() says so if it is missing).
  num_steps = kwargs.get("num_steps") or getattr(d, "num_timesteps", 1)
  outs, trajs = [], []
  with progress_lib.step_bar(num_steps * num_chunks, enabled=progress) as bar:
    on_step = bar.update if progress else False
    for c in range(num_chunks):
      lo = c * batch_size
      n = min(batch_size, num_samples - lo)
      # Padded by repeating the chunk's rows (the padding is dropped). Not parallel.pad_to:
      # pc's Langevin step averages over the batch, so the padding's labels reach the samples.
      rows = lo + np.arange(batch_size) % n
      y, u = (jax.tree.map(lambda a: a[rows], v) for v in (labels, uncond))  # noqa: B023
      out = sample(
        d,
        model_fn,
        jax.random.fold_in(key, c),
        (batch_size, *image_shape),
        labels=y,
        uncond=u,
        return_trajectory=return_trajectory,
        progress=on_step,
        **kwargs,
      )
      # to_host: with several processes a chunk spans devices this process cannot read.
      if return_trajectory:
        out, traj = out
        trajs.append(to_host(traj)[:, :n])
      outs.append(to_host(out)[:n])
      bar.set_postfix(chunk=f"{c + 1}/{num_chunks}", refresh=False)
  samples = np.concatenate(outs)
  return (samples, np.concatenate(trajs, axis=1)) if return_trajectory else samples
