"""The training loop: data in, sharded steps, metrics, samples, evaluations and checkpoints out.

``train(config, workdir)`` is what ``jaxdiff train`` calls. Re-running it on the same workdir
resumes from the newest checkpoint, including the data iterator's position, and because
every step's randomness is ``fold_in(key, step)`` the resumed run logs the same losses as one
that was never interrupted. Only process 0 writes files other than checkpoints (orbax
coordinates those across processes itself).

Files in ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON object per logged step or
evaluation), ``checkpoints/`` (the newest ``training.keep_checkpoints``, plus the best by
``eval.best_metric``), ``samples/step_XXXXXXX.png``, ``loss.png`` and ``eval.png`` (redrawn at
every log), ``tensorboard/`` and ``wandb_id`` when those are on (see ``writers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import tqdm
from etils import epath
from flax import nnx

from jaxdiff import data, models, parallel
from jaxdiff.core.diffusion import Diffusion
from jaxdiff.io import checkpoints, files, images
from jaxdiff.sampling import check_sampling, sample_from_config
from jaxdiff.training import evaluator as evaluator_lib
from jaxdiff.training import writers
from jaxdiff.training.state import TrainState, abstract_state, build, create_state
from jaxdiff.training.step import StepFn, jit_train_step, make_train_step

# Independent streams derived from config.seed; fold_in keeps them disjoint.
INIT, TRAIN, SAMPLE = 0, 1, 2


class NonFiniteLossError(FloatingPointError):
  pass


def stream(seed: int, which: int) -> jax.Array:
  """The key of one of the run's independent random streams (INIT, TRAIN, SAMPLE)."""
  return jax.random.fold_in(jax.random.key(seed), which)


class _StopRequested:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Loop:
  """What the loop holds between steps."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Any
  graphdef: nnx.GraphDef
  diffusion: Diffusion
  step_fn: StepFn
  iterator: Any
  ckpt: checkpoints.Checkpointer
  log: writers.Writer
  evaluator: evaluator_lib.LoopEvaluator | None
  last_saved: int | None = None
  pending: tuple[int, Any] | None = None  # (step, metrics) not yet checked on the host

  def check(self, step: int, metrics: Any) -> dict[str, float]:
    """Host values of ``metrics``; a non-finite loss, gradient or parameter norm stops the run."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: host[k] for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(host[k])}
    if bad:  # the state after this step is poisoned: never checkpoint it
      self.ckpt.wait()
      where = f"step {self.last_saved}" if self.last_saved is not None else "none was written"
      raise NonFiniteLossError(
        f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; stopped."
        f" Last good checkpoint: {where} in {self.ckpt.directory}"
      )
    return host

  def flush(self) -> dict[str, float] | None:
    """Checks the pending step's metrics (before anything uses or saves its state)."""
    pending, self.pending = self.pending, None
    return None if pending is None else self.check(*pending)


def _setup(config: ml_collections.ConfigDict, workdir: epath.Path) -> tuple[_Loop, TrainState]:
  """Everything before the first step: mesh, model, data, checkpoints, the state to start from."""
  tcfg, is_main = config.training, jax.process_index() == 0
  evaluator_lib.check(config)  # before anything is written
  if problems := check_sampling(config):  # the loop's sample grids and FD draw with it
    raise ValueError("; ".join(problems))
  log = writers.make(config, workdir, enabled=is_main)  # a missing extra fails here, early
  if is_main:
    writers.write_config(config, workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(tcfg.batch_size, mesh)
  graphdef, _, optimizer, diffusion = build(config)
  abstract = abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract, fsdp=tcfg.fsdp)
  if is_main:
    data.prepare(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  parallel.sync("prepared")
  loop = _Loop(
    config=config,
    workdir=workdir,
    mesh=mesh,
    graphdef=graphdef,
    diffusion=diffusion,
    step_fn=jit_train_step(
      make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
    ),
    iterator=data.make_iterator(config, split=config.data.split, batch_size=tcfg.batch_size),
    ckpt=checkpoints.Checkpointer(
      workdir / "checkpoints",
      max_to_keep=tcfg.keep_checkpoints,
      best_metric=evaluator_lib.best_metric_key(config),
    ),
    log=log,
    evaluator=(
      evaluator_lib.LoopEvaluator(config, graphdef, diffusion, mesh)
      if config.eval.every > 0
      else None
    ),
  )
  loop.last_saved = loop.ckpt.latest_step()
  loop.log.truncate_after(loop.last_saved or 0)  # from 0: what a run killed before saving logged
  if loop.last_saved is None:
    return loop, create_state(config, optimizer, stream(config.seed, INIT), shardings)
  state, data_state = loop.ckpt.restore(abstract, shardings, loop.last_saved)
  if data_state:
    loop.iterator.set_state(data_state)
  print(f"resumed from {loop.ckpt.directory} at step {loop.last_saved}", flush=True)
  return loop, state


def _sample_grid(loop: _Loop, state: TrainState, step: int) -> None:
  """``samples/step_XXXXXXX.png``: a grid of EMA samples drawn as ``config.sampling`` says."""
  n = parallel.round_up(loop.config.sampling.num_samples, loop.mesh.size)
  model_fn = models.bind(loop.graphdef, state.ema_params)
  key = jax.random.fold_in(stream(loop.config.seed, SAMPLE), step)
  samples = sample_from_config(loop.config, loop.diffusion, model_fn, key, n, mesh=loop.mesh)
  if jax.process_index() == 0:
    grid = images.make_grid(images.to_uint8(samples))
    images.save_png(grid, loop.workdir / "samples" / f"step_{step:07d}.png")
    loop.log.write_images(step, {"samples": grid})


def _after_step(loop: _Loop, state: TrainState, step: int, throughput: _Throughput) -> dict | None:
  """Logging, sample grids and evaluation due at ``step``; returns the logged record, if any."""
  tcfg = loop.config.training
  record = None
  if step % tcfg.log_every == 0 or step == tcfg.num_steps:
    host = loop.flush()
    record = {"step": step, **host, "img_per_sec": throughput.rate()}
    loop.log.write_scalars(step, record)
  if tcfg.sample_every and step % tcfg.sample_every == 0:
    _sample_grid(loop, state, step)
  return record


def _evaluate(loop: _Loop, state: TrainState, step: int) -> dict[str, float] | None:
  if loop.evaluator is None or not loop.evaluator.due(step):
    return None
  loop.flush()  # a poisoned state is not worth evaluating
  record = loop.evaluator(state.ema_params)
  loop.log.write_scalars(step, record)
  return record


class _Throughput:
  """Images per second over the steps since the last call to ``rate``."""

  def __init__(self, batch_size: int):
    self.batch_size, self.steps, self.start = batch_size, 0, time.perf_counter()

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self.steps * self.batch_size / (now - self.start)
    self.steps, self.start = 0, now
    return rate


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes training) per ``config``; returns the last logged metrics."""
  loop, state = _setup(config, files.as_path(workdir))  # gs:// stays remote
  tcfg = config.training
  start = int(jax.device_get(state.step))
  train_key, throughput, last_record = stream(config.seed, TRAIN), _Throughput(tcfg.batch_size), {}
  is_main = jax.process_index() == 0
  bar = tqdm.tqdm(
    total=tcfg.num_steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True
  )
  try:
    with _StopRequested() as stop:
      for step in range(start + 1, tcfg.num_steps + 1):  # `step` counts completed steps
        batch = parallel.global_batch(loop.mesh, next(loop.iterator))
        state, metrics = loop.step_fn(state, batch, train_key)
        loop.flush()  # the previous step's, while this one runs: no pipeline stall
        loop.pending = (step, metrics)
        throughput.steps += 1
        bar.update(1)
        if record := _after_step(loop, state, step, throughput):
          last_record = record
          bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_sec']:.0f}")
        evaluation = _evaluate(loop, state, step)
        stopping = stop.signum is not None
        if step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps or stopping or evaluation:
          loop.flush()
          loop.ckpt.save(step, state, loop.iterator.get_state(), metrics=evaluation)
          loop.last_saved = step
        if stopping:
          print(f"\nsignal {stop.signum}: saved checkpoint {step}, stopping", flush=True)
          break
  finally:
    bar.close()
    loop.ckpt.wait()
    loop.ckpt.close()
    loop.log.close()  # after the checkpoint, which matters more
  return last_record
