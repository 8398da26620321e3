"""The training loop: data in, sharded steps, metrics, samples and checkpoints out.

``train(config, workdir)`` is what ``train.py`` calls. Re-running it on the
same workdir resumes from the newest checkpoint, including the data
iterator's position, and because every step's randomness is
``fold_in(key, step)`` the resumed run logs the same losses as one that was
never interrupted. Only process 0 writes files other than checkpoints (orbax
coordinates those across processes itself).

Files in ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step), ``checkpoints/``, ``samples/step_XXXXXXX.png``, ``loss.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from jaxdiff import checkpointing, data, models, parallel, training

# Independent streams derived from config.seed; fold_in keeps them disjoint.
_INIT, _TRAIN, _SAMPLE = 0, 1, 2


class NonFiniteLossError(FloatingPointError):
  pass


def _stream(seed: int, which: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), which)


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


class MetricsLog:
  """``metrics.jsonl``: one JSON object per logged step, appended and flushed.

  With ``tensorboard_dir``, the same scalars also go to TensorBoard (flax's
  writer, which needs TensorFlow: ``pip install 'jaxdiff[tensorboard]'``).
  """

  def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
    self.path, self.enabled = path, enabled
    self._tb = None
    if enabled and tensorboard_dir is not None:
      try:
        from flax.metrics import tensorboard
      except ImportError as e:
        raise ImportError(
          f"training.tensorboard=True needs TensorFlow ({e}); install it with"
          " pip install 'jaxdiff[tensorboard]', or set --config.training.tensorboard=False"
        ) from None
      self._tb = tensorboard.SummaryWriter(str(tensorboard_dir))

  def truncate_after(self, step: int) -> None:
    """Drops entries past ``step``: a resumed run re-logs them from the checkpoint on."""
    if not (self.enabled and self.path.exists()):
      return
    lines = self.path.read_text().splitlines()
    keep = [line for line in lines if line and json.loads(line)["step"] <= step]
    self.path.write_text("".join(line + "\n" for line in keep))

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in record.items():
        if name != "step":
          self._tb.scalar(name, value, record["step"])
      self._tb.flush()

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line]


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


def model_apply(graphdef: Any) -> Callable[..., jax.Array]:
  """``apply(params, x, t, y=None)``: make it once per graphdef and wrap it as
  ``jax.tree_util.Partial(apply, params)``, so that samplers see the parameters as jit
  arguments (new parameters reuse the compiled code instead of baking in constants)."""

  def apply(params: Any, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
    return nnx.merge(graphdef, params)(x, t, y)

  return apply


PARAMS = ("ema", "raw")


def load_model(
  workdir: str | Path, step: int | None = None, mesh: Any = None, *, params: str = "ema"
) -> tuple[ml_collections.ConfigDict, jax.tree_util.Partial, int]:
  """A run's config, ``model_fn(x, t, y=None)`` holding its parameters, and their step.

  Args:
    workdir: the training run's directory (``config.json``, ``checkpoints/``).
    step: which checkpoint (default: the newest).
    mesh: restore the parameters replicated over this mesh (default: all devices).
    params: "ema" (the EMA parameters, what samples and evaluations use) or "raw" (the
      optimiser's current parameters).
  """
  if params not in PARAMS:
    raise ValueError(f"params={params!r}; allowed: {', '.join(PARAMS)}")
  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: is {workdir} a training run's workdir?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  mesh = parallel.make_mesh() if mesh is None else mesh
  graphdef, _, optimizer, _ = training.build(config)
  abstract = training.abstract_state(config, optimizer)
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  try:
    available = ckpt.all_steps()
    if not available:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (train.py)")
    if step is not None and step not in available:
      raise FileNotFoundError(f"no checkpoint {step} in {ckpt.directory}; available: {available}")
    state, _ = ckpt.restore(abstract, parallel.state_sharding(mesh, abstract), step)
  finally:
    ckpt.close()
  step = int(state.step)
  which = "EMA" if params == "ema" else "raw"
  print(f"loaded the {which} parameters of step {step} from {ckpt.directory}", flush=True)
  weights = state.ema_params if params == "ema" else state.params
  return config, jax.tree_util.Partial(model_apply(graphdef), weights), step


def load_ema(
  workdir: str | Path, step: int | None = None, mesh: Any = None
) -> tuple[ml_collections.ConfigDict, jax.tree_util.Partial]:
  """``load_model`` for the EMA parameters: (config, model_fn)."""
  config, model_fn, _ = load_model(workdir, step, mesh, params="ema")
  return config, model_fn


def sample_grid(
  config: ml_collections.ConfigDict,
  model_fn: Callable[..., jax.Array],
  diffusion: Any,
  key: jax.Array,
  mesh: Any,
  path: Path | None,
  num_samples: int | None = None,
) -> np.ndarray:
  """Samples per ``config.sampling`` and writes a PNG grid; returns uint8 images."""
  from jaxdiff import images, sampling

  scfg = config.sampling
  n = num_samples or scfg.num_samples
  n = -(-n // mesh.size) * mesh.size  # a multiple of the device count
  shape = (n, config.data.image_size, config.data.image_size, config.data.channels)
  labels = None
  if config.model.class_conditional:
    labels = jnp.arange(n) % config.data.num_classes
  out = sampling.sample(
    diffusion,
    model_fn,
    key,
    shape,
    sampler=scfg.sampler,
    num_steps=scfg.num_steps,
    eta=scfg.eta,
    clip_denoised=scfg.clip_denoised,
    guidance_scale=scfg.guidance_scale,
    labels=labels,
    null_label=config.data.num_classes if labels is not None else None,
    temperature=scfg.temperature,
    mesh=mesh,
  )
  imgs = images.to_uint8(parallel.to_host(out))
  if path is not None and jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_png(images.make_grid(imgs), path)
  return imgs


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
  """The loss curve (and its running mean) to a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = np.array([r["step"] for r in records])
  loss = np.array([r["loss"] for r in records])
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
  if len(loss) >= 10:
    w = max(len(loss) // 20, 5)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1 :], smooth, lw=1.5, label=f"running mean ({w})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains (or resumes training) per ``config``; returns the last logged metrics."""
  workdir = Path(workdir)
  is_main = jax.process_index() == 0
  tcfg = config.training
  if is_main:
    write_config(config, workdir)

  mesh = parallel.make_mesh()
  parallel.check_batch_size(tcfg.batch_size, mesh)
  graphdef, _, optimizer, diffusion = training.build(config)
  abstract_state = training.abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract_state, fsdp=tcfg.fsdp)

  if is_main:
    data.prepare(config.data.name, data_dir=config.data.data_dir, manual_dir=config.data.manual_dir)
  parallel.sync("prepared")
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=tcfg.keep_checkpoints)
  iterator = data.make_iterator(
    config,
    split=config.data.split,
    seed=config.seed,
    batch_size=tcfg.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  metrics_log = MetricsLog(
    workdir / "metrics.jsonl",
    enabled=is_main,
    tensorboard_dir=workdir / "tensorboard" if tcfg.tensorboard else None,
  )
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(abstract_state, shardings, latest)
    if data_state:
      iterator.set_state(data_state)
    metrics_log.truncate_after(latest)
    print(f"resumed from {ckpt.directory} at step {latest}", flush=True)
  else:
    state = training.create_state(config, optimizer, _stream(config.seed, _INIT), shardings)
  start = int(jax.device_get(state.step))

  step_fn = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  train_key, sample_key = _stream(config.seed, _TRAIN), _stream(config.seed, _SAMPLE)
  apply = model_apply(graphdef)
  total = tcfg.num_steps
  last_saved = latest
  last_record: dict[str, Any] = {}
  pending: tuple[int, Any] | None = None  # (step, metrics) not yet checked on the host
  window_start, window_steps = time.perf_counter(), 0

  def check(step: int, metrics: Any) -> dict[str, float]:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: host[k] for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(host[k])}
    if bad:  # the state after this step is poisoned: never checkpoint it
      ckpt.wait()
      where = f"step {last_saved}" if last_saved is not None else "none was written"
      raise NonFiniteLossError(
        f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; stopped."
        f" Last good checkpoint: {where} in {ckpt.directory}"
      )
    return host

  bar = tqdm.tqdm(total=total, initial=start, disable=not is_main, unit="step", dynamic_ncols=True)
  try:
    with _StopRequested() as stop:
      for step in range(start + 1, total + 1):  # `step` counts completed steps
        batch = parallel.global_batch(mesh, next(iterator))
        state, metrics = step_fn(state, batch, train_key)
        # Check the previous step's loss while this one runs: no pipeline stall.
        if pending is not None:
          check(*pending)
        pending = (step, metrics)
        window_steps += 1
        bar.update(1)

        if step % tcfg.log_every == 0 or step == total:
          host = check(*pending)
          pending = None
          now = time.perf_counter()
          img_s = window_steps * tcfg.batch_size / (now - window_start)
          window_start, window_steps = now, 0
          last_record = {"step": step, **host, "img_per_sec": img_s}
          metrics_log.write(last_record)
          bar.set_postfix(loss=f"{host['loss']:.4f}", img_s=f"{img_s:.0f}")

        if tcfg.sample_every and step % tcfg.sample_every == 0:
          sample_grid(
            config,
            jax.tree_util.Partial(apply, state.ema_params),
            diffusion,
            jax.random.fold_in(sample_key, step),
            mesh,
            workdir / "samples" / f"step_{step:07d}.png",
          )

        stopping = stop.signum is not None
        if step % tcfg.checkpoint_every == 0 or step == total or stopping:
          if pending is not None:
            check(*pending)
            pending = None
          ckpt.save(step, state, iterator.get_state())
          last_saved = step
        if stopping:
          print(f"\nsignal {stop.signum}: saved checkpoint {step}, stopping", flush=True)
          break
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()

  if is_main and (records := metrics_log.read()):
    plot_losses(records, workdir / "loss.png")
  return last_record


def dry_run(config: ml_collections.ConfigDict) -> str:
  """One screen about the run without touching data: sizes, shapes, memory."""
  mesh = parallel.make_mesh()
  tcfg, dcfg = config.training, config.data
  local_batch = parallel.check_batch_size(tcfg.batch_size, mesh)
  graphdef, abstract_params, optimizer, diffusion = training.build(config)
  abstract_state = training.abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract_state, fsdp=tcfg.fsdp)
  shape = (tcfg.batch_size, dcfg.image_size, dcfg.image_size, dcfg.channels)
  batch = {
    "image": jax.ShapeDtypeStruct(shape, jnp.float32),
    "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32),
  }
  out_shape = jax.eval_shape(
    lambda p: training.make_model_fn(graphdef, p, None)(
      jnp.zeros((1,) + shape[1:]), jnp.zeros((1,), jnp.int32)
    ),
    abstract_params,
  ).shape[1:]
  step_fn = training.jit_train_step(
    training.make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings
  )
  lines = [
    f"model: {config.model.name}   diffusion: T={diffusion.num_timesteps} "
    f"{config.diffusion.schedule}, mean={diffusion.mean_type}, var={diffusion.var_type}, "
    f"loss={config.diffusion.loss_type}",
    f"parameters: {models.count_params(abstract_params):,}",
  ]
  table = models.param_table(abstract_params, depth=1)
  width = max((len(name) for name, _ in table), default=10)
  lines += [f"  {name:<{width}}  {count:>12,}" for name, count in table]
  lines += [
    f"input:  x_t {list(shape)} float32, t [{tcfg.batch_size}] int32",
    f"output: {[tcfg.batch_size, *out_shape]} float32",
    f"devices: {mesh.size} ({jax.devices()[0].platform}), processes: {jax.process_count()}",
    f"batch: global {tcfg.batch_size}, per process {local_batch}, "
    f"per device {tcfg.batch_size // mesh.size}, grad accumulation {tcfg.grad_accum_steps}",
    f"state: {parallel.tree_bytes(abstract_state) / 2**20:,.1f} MiB "
    f"({'FSDP-sharded' if tcfg.fsdp else 'replicated'})",
  ]
  try:
    compiled = step_fn.lower(abstract_state, batch, jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    per_device = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    lines.append(
      f"memory per step per device (XLA estimate): {per_device / 2**20:,.1f} MiB "
      f"(temporaries {mem.temp_size_in_bytes / 2**20:,.1f} MiB)"
    )
  except Exception as e:  # memory analysis is backend-dependent
    lines.append(f"memory per step: unavailable ({type(e).__name__}: {e})")
  return "\n".join(lines)
