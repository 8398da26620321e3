"""``--dry_run``: one screen about a run without touching data: sizes, shapes, memory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxdiff import models, parallel
from jaxdiff.core import process as process_lib
from jaxdiff.training.state import abstract_state, build
from jaxdiff.training.step import jit_train_step, make_train_step
from jaxdiff.training.validation import validate


def dry_run(config: ml_collections.ConfigDict) -> str:
  """One screen about the run without touching data: sizes, shapes, memory."""
  mesh = parallel.make_mesh()
  validate(config, mesh.size)
  tcfg, dcfg = config.training, config.data
  local_batch = parallel.check_batch_size(tcfg.batch_size, mesh)
  graphdef, abstract_params, optimizer, diffusion = build(config)
  abstract = abstract_state(config, optimizer)
  shardings = parallel.state_sharding(mesh, abstract, fsdp=tcfg.fsdp)
  shape = (tcfg.batch_size, dcfg.image_size, dcfg.image_size, dcfg.channels)
  batch = {
    "image": jax.ShapeDtypeStruct(shape, jnp.float32),
    "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32),
  }
  out_shape = jax.eval_shape(
    lambda p: models.Apply(graphdef)(p, jnp.zeros((1,) + shape[1:]), jnp.zeros((1,), jnp.int32)),
    abstract_params,
  ).shape[1:]
  step_fn = jit_train_step(make_train_step(config, graphdef, optimizer, diffusion), mesh, shardings)
  lines = [
    f"model: {config.model.name}   diffusion: {_process_line(config.diffusion, diffusion)}",
    f"parameters: {models.count_params(abstract_params):,}",
  ]
  table = models.param_table(abstract_params, depth=1)
  width = max((len(name) for name, _ in table), default=10)
  lines += [f"  {name:<{width}}  {count:>12,}" for name, count in table]
  lines += [
    f"input:  x_t {list(shape)} float32, t [{tcfg.batch_size}] "
    f"{'int32' if config.diffusion.process == 'ddpm' else 'float32'}",
    f"output: {[tcfg.batch_size, *out_shape]} float32",
    f"devices: {mesh.size} ({jax.devices()[0].platform}), processes: {jax.process_count()}",
    f"batch: global {tcfg.batch_size}, per process {local_batch}, "
    f"per device {tcfg.batch_size // mesh.size}, grad accumulation {tcfg.grad_accum_steps}",
    f"state: {parallel.tree_bytes(abstract) / 2**20:,.1f} MiB "
    f"({'FSDP-sharded' if tcfg.fsdp else 'replicated'})",
  ]
  try:
    compiled = step_fn.lower(abstract, batch, jax.random.key(0)).compile()
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


def _process_line(dcfg: Any, diffusion: Any) -> str:
  t_sampler = process_lib.t_sampler(dcfg)
  if dcfg.process == "flow":
    return f"flow, t {t_sampler} shifted by {dcfg.time_shift:g}, loss={dcfg.loss_type}"
  if dcfg.process == "vdm":
    loss = f"T={dcfg.vdm_timesteps} steps" if dcfg.vdm_timesteps else "continuous time"
    fourier = ", Fourier features" if dcfg.fourier_features else ""
    return (
      f"vdm, {dcfg.vdm_schedule} gamma from {dcfg.gamma_min:g}..{dcfg.gamma_max:g}, t"
      f" {t_sampler}, loss in {loss}{fourier}"
    )
  if dcfg.process == "edm":
    return (
      f"edm, ln sigma ~ N({dcfg.p_mean:g}, {dcfg.p_std:g}^2), sigma_data={dcfg.sigma_data:g},"
      f" sampling sigma {dcfg.sigma_min:g}..{dcfg.sigma_max:g} rho={dcfg.rho:g}"
    )
  zero_snr = ", zero terminal SNR" if diffusion.zero_terminal_snr else ""
  return (
    f"T={diffusion.num_timesteps} {dcfg.schedule}{zero_snr}, mean={diffusion.mean_type},"
    f" var={diffusion.var_type}, loss={dcfg.loss_type}"
  )
