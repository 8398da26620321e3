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
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from etils import epath
from flax import nnx

from jaxdiff import data, latent, models, parallel, prompts
from jaxdiff.config import is_latent, is_text, read_config
from jaxdiff.core.diffusion import Diffusion
from jaxdiff.io import checkpoints, files, images
from jaxdiff.io.images import from_uint8
from jaxdiff.sampling import sample_from_config
from jaxdiff.training import evaluator as evaluator_lib
from jaxdiff.training import resume, validation, writers
from jaxdiff.training.state import TrainState, abstract_state, build, create_state, restore
from jaxdiff.training.step import StepFn, jit_train_step, make_train_step

# Independent streams derived from config.seed; fold_in keeps them disjoint.
INIT, TRAIN, SAMPLE = 0, 1, 2


class NonFiniteLossError(FloatingPointError):
  pass


def stream(seed: int, which: int) -> jax.Array:
  """The key of one of the run's independent random streams (INIT, TRAIN, SAMPLE)."""
  return jax.random.fold_in(jax.random.key(seed), which)


class _StopRequested:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second SIGINT (Ctrl-C
  pressed again) interrupts at once, without the checkpoint."""

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
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)

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
  space: _Space
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


@dataclasses.dataclass
class _Space:
  """What the loop needs beyond pixels: a latent run's decoder of samples, or an autoencoder
  run's fixed images (reconstructed for the grids, encoded for the scale it stores)."""

  decode: Any = None  # latent run: scaled latents -> images
  images: np.ndarray | None = None  # autoencoder run: uint8 [N, H, W, C] training images
  text: Any = None  # text run: the training split's prompts.CaptionTable

  def conditioning(self, n: int) -> tuple[Any, Any] | None:
    """A text run's grid conditioning: the first ``n`` training captions, against the empty
    prompt."""
    return None if self.text is None else self.text.first(n)

  def stats(self, loop: _Loop, state: TrainState) -> dict | None:
    """An autoencoder checkpoint's ``stats``: the latent scale of its EMA parameters."""
    if self.images is None:
      return None
    coder = models.autoencoder.Coder(loop.graphdef)
    encode = jax.jit(lambda x: coder.encode(state.ema_params, x))
    return latent.measure_scale(encode, self.images)


def _space(config: ml_collections.ConfigDict, mesh: Any) -> tuple[_Space, Any]:
  """The loop's :class:`_Space` and, for a latent run, the source of cached latents it trains
  on (encoded now if this autoencoder checkpoint has no cache yet); None: the data's images."""
  if config.model.name == "autoencoder":
    n = config.autoencoder.scale_examples
    return _Space(images=data.read_examples(config.data, config.data.split, n)), None
  if not is_latent(config):
    return _Space(), None
  ae_config = read_config(config.latent.autoencoder_workdir)
  directory = files.as_path(config.latent.autoencoder_workdir) / "checkpoints"
  _, ae_state, _ = restore(ae_config, directory, mesh, config.latent.autoencoder_step)
  ae_graphdef = build(ae_config)[0]
  scale = config.latent.scale_factor
  encode = latent.encoder(ae_graphdef, ae_state.ema_params, scale)
  coder = models.autoencoder.Coder(ae_graphdef)
  decode = jax.jit(functools.partial(lambda p, z: coder.decode(p, z / scale), ae_state.ema_params))
  return _Space(decode=decode), latent.latent_source(config, encode, mesh)


@dataclasses.dataclass
class _Start:
  """Where a (re-)run starts: a restored checkpoint, or None for a fresh run."""

  step: int = 0
  state: TrainState | None = None
  data_state: dict | None = None
  changes: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
  unreadable: list[int] = dataclasses.field(default_factory=list)  # newer, failed to restore
  superseded: list[int] = dataclasses.field(default_factory=list)  # newer than checkpoint_step


def _stored_config(reader: checkpoints.Checkpointer, step: int, workdir: epath.Path) -> dict:
  """The config checkpoint ``step`` was trained with: stored in it, or (checkpoints of older
  jaxdiff versions) the workdir's ``config.json``."""
  stored = reader.read_config(step)
  if stored:
    return stored
  path = workdir / "config.json"
  return json.loads(path.read_text()) if path.exists() else {}


def _find_start(
  config: ml_collections.ConfigDict,
  workdir: epath.Path,
  abstract: TrainState,
  shardings: Any,
  checkpoint_step: int | None,
) -> _Start:
  """Reads (only) what the workdir holds: the checkpoint to resume from, after checking that
  the config may resume it. Writes nothing, so a refusal leaves the run as it was."""
  directory = workdir / "checkpoints"
  steps: list[int] = []
  if directory.is_dir():
    reader = checkpoints.Checkpointer(directory, read_only=True)
    steps = reader.all_steps()
    if not steps:
      reader.close()
  if not steps:
    if checkpoint_step is not None:
      raise FileNotFoundError(f"--checkpoint_step={checkpoint_step}: no checkpoint in {directory}")
    return _Start()
  try:
    newest = steps[-1] if checkpoint_step is None else checkpoint_step
    if newest not in steps:
      raise FileNotFoundError(
        f"--checkpoint_step={checkpoint_step}: no checkpoint {checkpoint_step} in {directory};"
        f" available: {steps}"
      )
    diff = resume.check(_stored_config(reader, newest, workdir), config, workdir)
    step, state, data_state, skipped = reader.restore_newest_good(
      abstract, shardings, checkpoint_step
    )
  finally:
    reader.close()
  unreadable = [s for s, _ in skipped]
  superseded = [s for s in steps if s > step and s not in unreadable]
  return _Start(step, state, data_state, diff, unreadable, superseded)


def _write_start(config: ml_collections.ConfigDict, workdir: epath.Path, start: _Start) -> None:
  """Process 0's writes once every check has passed: set aside the checkpoints after the one
  resumed from, ``config.json``, and the history entry."""
  directory = workdir / "checkpoints"
  for steps, why in ((start.unreadable, "unreadable"), (start.superseded, "superseded")):
    for path in checkpoints.set_aside(directory, steps, why):
      print(f"set aside checkpoint {path.name.split('.')[0]} as {path}", flush=True)
  writers.write_config(config, workdir)
  fields = {"step": start.step, **resume.environment()}
  if start.state is None:
    resume.record(workdir, "start", **fields)
    return
  if start.changes:
    fields["changes"] = {k: list(v) for k, v in start.changes.items()}
  if start.unreadable or start.superseded:
    fields["set_aside"] = {"unreadable": start.unreadable, "superseded": start.superseded}
  resume.record(workdir, "resume", **fields)
  changed = f"; changed: {resume.describe_changes(start.changes)}" if start.changes else ""
  print(f"resumed from {directory} at step {start.step}{changed}", flush=True)


def _setup(
  config: ml_collections.ConfigDict, workdir: epath.Path, checkpoint_step: int | None
) -> tuple[_Loop, TrainState] | None:
  """Everything before the first step, in an order that writes nothing until all is known to
  be well: check the config and the workdir, read the checkpoint to resume from, prepare and
  open the data, then write. None: the run is already at ``training.num_steps``."""
  tcfg, is_main = config.training, jax.process_index() == 0
  mesh = parallel.make_mesh()
  validation.validate(config, mesh.size)
  config = latent.resolve(config)  # a latent run's latent fields, from its autoencoder
  config = prompts.resolve(config)  # a text run's token width, from its encoder
  files.check_writable(workdir, "--workdir")
  writers.require_extras(config)  # a missing optional package fails here, early
  graphdef, _, optimizer, diffusion = build(config)
  abstract = abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract, fsdp=tcfg.fsdp)
  start = _find_start(config, workdir, abstract, shardings, checkpoint_step)
  if start.step >= tcfg.num_steps:
    print(f"{workdir} is at step {start.step} >= training.num_steps={tcfg.num_steps}: done")
    return None
  if is_main:
    data.prepare(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  parallel.sync("prepared")
  space, source = _space(config, mesh)
  if is_text(config):  # each distinct caption encoded once (or read from the cache)
    space.text = prompts.caption_table(config, progress=is_main)
  iterator = data.make_iterator(
    config, split=config.data.split, batch_size=tcfg.batch_size, source=source, text=space.text
  )
  if start.data_state:
    iterator.set_state(start.data_state)
  if is_main:
    _write_start(config, workdir, start)
  parallel.sync("started")
  loop = _Loop(
    config=config,
    workdir=workdir,
    mesh=mesh,
    graphdef=graphdef,
    diffusion=diffusion,
    step_fn=jit_train_step(
      make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
    ),
    iterator=iterator,
    ckpt=checkpoints.Checkpointer(
      workdir / "checkpoints",
      max_to_keep=tcfg.keep_checkpoints,
      best_metric=evaluator_lib.best_metric_key(config),
    ),
    log=writers.make(config, workdir, enabled=is_main),
    evaluator=(
      evaluator_lib.LoopEvaluator(config, graphdef, diffusion, mesh)
      if config.eval.every > 0
      else None
    ),
    space=space,
    last_saved=start.step if start.state is not None else None,
  )
  loop.log.truncate_after(start.step)  # from 0: what a run killed before saving logged
  if start.state is None:
    return loop, create_state(config, optimizer, stream(config.seed, INIT), shardings)
  return loop, start.state


def _sample_grid(loop: _Loop, state: TrainState, step: int) -> None:
  """``samples/step_XXXXXXX.png``: a grid of EMA samples drawn as ``config.sampling`` says (an
  autoencoder run: training images and their reconstructions, in alternate rows)."""
  n = parallel.round_up(loop.config.sampling.num_samples, loop.mesh.size)
  if loop.space.images is not None:
    samples = _reconstructions(loop, state, n)
  else:
    model_fn = models.bind(loop.graphdef, state.ema_params)
    key = jax.random.fold_in(stream(loop.config.seed, SAMPLE), step)
    samples = sample_from_config(
      loop.config, loop.diffusion, model_fn, key, n, mesh=loop.mesh, decode=loop.space.decode,
      conditioning=loop.space.conditioning(n),
    )  # fmt: skip
  if jax.process_index() == 0:
    grid = images.make_grid(images.to_uint8(samples))
    images.save_png(grid, loop.workdir / "samples" / f"step_{step:07d}.png")
    loop.log.write_images(step, {"samples": grid})


def _reconstructions(loop: _Loop, state: TrainState, n: int) -> np.ndarray:
  """The first ``n / 2`` fixed images, each row of 8 followed by its reconstructions."""
  images = from_uint8(loop.space.images[: max(n // 2, 1)])
  coder, params = models.autoencoder.Coder(loop.graphdef), state.ema_params
  recon = np.clip(np.asarray(coder.decode(params, coder.encode(params, images))), -1, 1)
  rows = [part for i in range(0, len(images), 8) for part in (images[i : i + 8], recon[i : i + 8])]
  return np.concatenate(rows)


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


class TrainingStopped(Exception):
  """A signal (SIGTERM, SIGINT) on any process stopped training; every process saved the same
  step first. Re-running the same command resumes there."""

  def __init__(self, signum: int, step: int, directory: epath.Path):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    super().__init__(
      f"stopped by {name} after step {step}; checkpoint {step} is saved in {directory}:"
      " run the same command to resume"
    )


def train(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  *,
  checkpoint_step: int | None = None,
) -> dict[str, Any]:
  """Trains (or resumes training) per ``config``; returns the last logged metrics.

  Args:
    config: the run's config; checked whole before anything is read or written.
    workdir: the run's folder, local or ``gs://``. If it holds checkpoints, training resumes
      from the newest one that restores (one that fails is set aside with a warning), provided
      ``config`` changes nothing they were trained with (``jaxdiff.training.resume``).
    checkpoint_step: resume from this checkpoint instead; newer ones are set aside (renamed).

  Raises:
    ConfigError: bad config fields (all of them named).
    ResumeRefusedError: ``config`` changes the model, diffusion or data of the run.
    NonFiniteLossError: a non-finite loss, gradient or parameter norm (the run stops at once).
    TrainingStopped: a SIGTERM / SIGINT stopped the run after saving a checkpoint.
  """
  workdir = files.as_path(workdir)  # gs:// stays remote
  setup = _setup(config, workdir, checkpoint_step)
  if setup is None:
    return {}
  loop, state = setup
  config = loop.config  # resolved: a latent run's latent fields filled in
  tcfg, is_main = config.training, jax.process_index() == 0
  start = int(jax.device_get(state.step))
  train_key, throughput, last_record = stream(config.seed, TRAIN), _Throughput(tcfg.batch_size), {}
  stored_config = resume.as_json(config)
  bar = tqdm.tqdm(total=tcfg.num_steps, initial=start, disable=not is_main, unit="step")
  step, stop_signal, outcome = start, 0, "failed"
  try:
    with _StopRequested() as stop:
      for step in range(start + 1, tcfg.num_steps + 1):  # `step` counts completed steps
        batch = parallel.global_batch(loop.mesh, next(loop.iterator))
        state, metrics = loop.step_fn(state, batch, train_key)
        loop.flush()  # the previous step's, while this one runs: no pipeline stall
        loop.pending, throughput.steps = (step, metrics), throughput.steps + 1
        bar.update(1)
        if record := _after_step(loop, state, step, throughput):
          last_record = record
          bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_sec']:.0f}")
        evaluation = _evaluate(loop, state, step)
        # Every process stops at the same step, whichever of them was signalled.
        stop_signal = parallel.max_over_processes(stop.signum or 0)
        if step % tcfg.checkpoint_every == 0 or step == tcfg.num_steps or stop_signal or evaluation:
          loop.flush()
          loop.ckpt.save(
            step,
            state,
            loop.iterator.get_state(),
            metrics=evaluation,
            config=stored_config,
            stats=loop.space.stats(loop, state),
          )
          loop.last_saved = step
        if stop_signal:
          break
    outcome = "stopped" if stop_signal else "finished"
  finally:
    bar.close()
    loop.ckpt.wait()
    loop.ckpt.close()
    loop.log.close()  # after the checkpoint, which matters more
    if is_main:
      end = {"step": step, "last_checkpoint": loop.last_saved}
      if stop_signal:
        end["signal"] = signal.Signals(stop_signal).name
      resume.record(loop.workdir, outcome, **end)
  if stop_signal:
    raise TrainingStopped(stop_signal, step, loop.ckpt.directory)
  return last_record
