"""Devices, meshes and shardings: the same code on 1 CPU, a GPU node or a TPU pod.

jaxdiff uses one mesh axis, ``data``. The global batch is split along it; the
train state is either replicated or, with FSDP, each large array is split
along one of its dimensions (XLA's SPMD partitioner inserts the all-gathers
and reduce-scatters). Every random draw happens in the global view under
``jit``, so results do not depend on how many devices there are.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Calls ``jax.distributed.initialize()`` when the environment asks for it.

  ``JAX_COORDINATOR_ADDRESS`` (host:port) with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` configure it explicitly; ``JAXDIFF_DISTRIBUTED=1`` lets
  JAX detect the cluster itself (Cloud TPU pods, SLURM, Open MPI, ...). On CPU
  the processes talk through gloo. Must run before anything touches a device.
  """
  if jax.distributed.is_initialized():
    return
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    jax.distributed.initialize(
      coordinator_address=address,
      num_processes=_env_int("JAX_NUM_PROCESSES"),
      process_id=_env_int("JAX_PROCESS_ID"),
    )
  elif os.environ.get("JAXDIFF_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def use_all_cpu_cores() -> None:
  """One CPU device per core (``JAXDIFF_CPU_DEVICES`` overrides), unless XLA_FLAGS says otherwise.

  XLA's CPU backend keeps about one core busy per device, so on a CPU-only
  machine splitting the batch over one device per core is what uses the
  whole machine. Harmless on GPU and TPU hosts: it only shapes the CPU backend.
  Must run before the backend starts.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  n = _env_int("JAXDIFF_CPU_DEVICES") or os.cpu_count() or 1
  jax.config.update("jax_num_cpu_devices", n)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over all (or the first ``num_devices``) devices, axis ``data``."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
  # Auto axes: XLA propagates the batch sharding through the model, so the
  # model code needs no sharding annotations.
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int = 2**14) -> P:
  """Splits the largest dimension divisible by ``axis_size``; small arrays stay whole."""
  if axis_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_sharding(mesh: Mesh, state: Any, *, fsdp: bool = False) -> Any:
  """Shardings for a pytree of arrays (or ShapeDtypeStructs): replicated, or FSDP."""
  size = mesh.shape[DATA_AXIS]
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), state)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size)), state)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n`` (batches to the device count)."""
  return -(-n // multiple) * multiple


def pad_to(x: np.ndarray, n: int) -> np.ndarray:
  """Pads the leading axis to ``n`` by repeating the last element (the padding is discarded)."""
  if len(x) >= n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "training.batch_size") -> int:
  """The per-process batch; the global batch must be positive and split evenly over devices."""
  n_dev, n_proc = mesh.size, jax.process_count()
  if global_batch < 1 or global_batch % n_dev:
    raise ValueError(
      f"{what}={global_batch} is not a positive multiple of the {n_dev} devices of the"
      f" mesh; use a multiple of {n_dev}"
    )
  return global_batch // n_proc


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded on ``data``."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
  }


def put_global(mesh: Mesh, x: np.ndarray) -> jax.Array:
  """A host array held whole by every process, as a global array sharded on the batch axis."""
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and names with Auto axes, as ``with_sharding_constraint`` in jit needs
  (``jax.make_mesh`` defaults to Explicit axes)."""
  if all(a == AxisType.Auto for a in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def constrain(x: jax.Array, mesh: Mesh | None, batch_axis: int = 0) -> jax.Array:
  """Inside jit: ``x`` split on ``batch_axis`` over the mesh's ``data`` axis (no-op without one)."""
  if mesh is None:
    return x
  spec = [None] * x.ndim
  spec[batch_axis] = DATA_AXIS
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def sync(name: str) -> None:
  """A barrier across processes (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
  """The largest of every process's ``value``: how processes agree on a flag, e.g. that one of
  them was asked to stop. One process: ``value`` itself, without touching a device. Several: a
  small all-gather, which waits for the work already queued on the devices.
  """
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int32))))


def to_host(x: Any) -> Any:
  """Fetches (possibly multi-host sharded) arrays to NumPy on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(np.asarray, x)


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
