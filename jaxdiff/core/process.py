"""The noise process a run trains and samples with, behind one small interface.

``diffusion.process`` names it. ``ddpm`` is the discrete chain of :mod:`jaxdiff.core.diffusion`
(its object is the :class:`~jaxdiff.core.diffusion.Diffusion` pytree, unchanged); ``flow`` is
flow matching / rectified flow (:mod:`jaxdiff.core.continuous.flow`; its object is
:class:`FlowMatching`); ``vdm`` and ``edm`` are named by the contract and refused until they
are implemented. What the train step, the samplers and the checks ask of a process, each a
function here that dispatches on the object, so a new process is one class and one branch each:

- :func:`from_config`: the object of a config's ``diffusion`` section; :func:`name` its name;
- :func:`draw`: t (int indices, or continuous times in [0, 1]), loss weights and the noise;
- :func:`training_losses`: x_t from x0 and the noise, the model's target and the loss;
- :func:`discretize`: the object the sampler scans over S steps (a respaced ``Diffusion``,
  a :class:`FlowGrid`), and :func:`level_time` / :func:`model_time`: the time of step index k
  and what the model is shown for it.

Continuous time is shown to the model as ``t * TIME_SCALE``: the range of the discrete chain's
steps, so the backbones' sinusoidal embeddings (which take floats) see the same scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.core import diffusion as diffusion_lib
from jaxdiff.core import losses, timesteps
from jaxdiff.core.continuous import flow, times

PROCESSES = ("ddpm", "vdm", "edm", "flow")
IMPLEMENTED = ("ddpm", "flow")
# How training draws t (diffusion.t_sampler), per process.
T_SAMPLERS = {"ddpm": diffusion_lib.T_SAMPLERS, "flow": ("uniform", "logit_normal")}
FLOW_LOSS_TYPES = ("mse", "l1", "huber")
TIME_SCALE = 1000.0

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class FlowMatching:
  """Rectified flow: ``x_t = (1 - t) x0 + t eps``, the model regresses ``v = eps - x0``
  (Esser et al. 2024, Sec. 2-3; :mod:`jaxdiff.core.continuous.flow`). Hyperparameters only.

  Attributes:
    t_sampler: training times ``uniform`` or ``logit_normal`` (SD3 eq. 19), then shifted.
    logit_mean, logit_std: m and s of the logit-normal draw.
    shift: f of :func:`jaxdiff.core.continuous.times.shift`, applied to the training times and
      to the sampling grid (1: none; f > 1 moves both towards the noise end).
  """

  t_sampler: str = flax.struct.field(pytree_node=False, default="uniform")
  logit_mean: float = flax.struct.field(pytree_node=False, default=0.0)
  logit_std: float = flax.struct.field(pytree_node=False, default=1.0)
  shift: float = flax.struct.field(pytree_node=False, default=1.0)

  def draw_t(self, key: jax.Array, batch_size: int) -> jax.Array:
    """``[B]`` training times in [0, 1] for the global batch."""
    if self.t_sampler == "logit_normal":
      t = times.logit_normal(key, batch_size, m=self.logit_mean, s=self.logit_std)
    else:
      t = times.uniform(key, batch_size)
    return t if self.shift == 1.0 else times.shift(t, self.shift)

  def grid(self, num_steps: int) -> FlowGrid:
    """The sampling grid: ``num_steps`` steps uniform in t from 1 to 0, shifted."""
    t = np.linspace(0.0, 1.0, num_steps + 1)
    t = self.shift * t / (1.0 + (self.shift - 1.0) * t)  # times.shift, in float64
    return FlowGrid(jnp.asarray(t, jnp.float32))


@flax.struct.dataclass
class FlowGrid:
  """A flow sampler's S steps: ``times`` ``[S + 1]`` rising from 0 to 1; step index k (the
  driver runs k = S-1 down to 0) goes from ``times[k + 1]`` to ``times[k]``."""

  times: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.times.shape[0] - 1


Process = diffusion_lib.Diffusion | FlowMatching


def from_config(dcfg: Any) -> Process:
  """The process of a config's ``diffusion`` section (checked by :func:`check_config`)."""
  kind = getattr(dcfg, "process", "ddpm")
  if kind == "ddpm":
    return diffusion_lib.from_config(dcfg)
  if kind == "flow":
    return FlowMatching(
      t_sampler=dcfg.t_sampler,
      logit_mean=float(dcfg.logit_mean),
      logit_std=float(dcfg.logit_std),
      shift=float(dcfg.time_shift),
    )
  raise ValueError(f"diffusion.process={kind!r}: {_implemented()}")


def name(p: Any) -> str:
  """``ddpm`` or ``flow``: the process an object (or its sampling grid) belongs to."""
  return "flow" if isinstance(p, FlowMatching | FlowGrid) else "ddpm"


def draw(
  p: Process,
  key_t: jax.Array,
  key_noise: jax.Array,
  x0: jax.Array,
  history: timesteps.LossHistory | None = None,
) -> timesteps.Draw:
  """t, weights and standard-normal noise for ``x0`` (the global batch); the ddpm draw is
  :func:`jaxdiff.core.timesteps.draw`, unchanged."""
  if isinstance(p, FlowMatching):
    t = p.draw_t(key_t, x0.shape[0])
    ones = jnp.ones(x0.shape[:1], jnp.float32)
    return timesteps.Draw(t, ones, jax.random.normal(key_noise, x0.shape, x0.dtype))
  return timesteps.draw(key_t, key_noise, x0, p.num_timesteps, history)


def training_losses(
  p: Process,
  model_fn: ModelFn,
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  *,
  loss_type: str = "mse",
  **ddpm_options: Any,
) -> dict[str, jax.Array]:
  """Per-example losses ``[B]`` at ``t``: :func:`jaxdiff.core.losses.training_losses` for ddpm
  (``ddpm_options``: ``min_snr_gamma``, ``decoder``), :func:`flow_losses` for flow."""
  if isinstance(p, FlowMatching):
    return flow_losses(model_fn, x0, t, noise, loss_type=loss_type)
  return losses.training_losses(p, model_fn, x0, t, noise, loss_type=loss_type, **ddpm_options)


def flow_losses(
  model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array, *, loss_type: str = "mse"
) -> dict[str, jax.Array]:
  """The conditional flow matching loss ``||v_theta(x_t, t) - (eps - x0)||^2`` (Lipman et al.
  2023, eq. 9, on the rectified-flow path of Esser et al. 2024, Sec. 2), averaged over dimensions,
  with the model shown ``t * TIME_SCALE``; ``l1`` and ``huber`` on the same error.

  Returns:
    dict with ``loss`` = ``simple`` ``[B]`` and ``t``.
  """
  x_t = flow.interpolate(x0, noise, t)
  err = model_fn(x_t, t * TIME_SCALE) - flow.velocity_target(x0, noise)
  simple = losses.simple_loss(err, loss_type)
  return {"t": t, "simple": simple, "loss": simple}


# ----------------------------------------------------------------------------- sampling


def discretize(p: Any, num_steps: int | None, steps: Callable[[Any, int | None], list[int]]) -> Any:
  """What a sampler scans over: a flow's :class:`FlowGrid` of ``num_steps`` steps, or a
  ``Diffusion`` respaced to the indices ``steps(d, num_steps)`` (the sampler's spacing)."""
  if isinstance(p, FlowGrid):
    if num_steps not in (None, p.num_timesteps):
      raise ValueError(f"num_steps={num_steps}: this flow grid has {p.num_timesteps} steps")
    return p
  if isinstance(p, FlowMatching):
    if num_steps is None or num_steps < 1:
      raise ValueError(f"num_steps={num_steps}: the flow process needs a number of steps >= 1")
    return p.grid(int(num_steps))
  kept = steps(p, num_steps)
  return p if len(kept) == p.num_timesteps else diffusion_lib.respace(p, kept)


def level_time(d: Any, t_index: jax.Array) -> jax.Array:
  """The process time of step index ``t_index`` ``[B]``: the index itself for ddpm, the time
  the step starts from (``times[k + 1]``) for flow."""
  return d.times[t_index + 1] if isinstance(d, FlowGrid) else t_index


def model_time(d: Any, t: jax.Array) -> jax.Array:
  """What the model is shown at process time ``t``: the original-schedule step for ddpm,
  ``t * TIME_SCALE`` for flow."""
  if isinstance(d, FlowGrid):
    return t * TIME_SCALE
  return diffusion_lib.model_timesteps(d, t)


# ----------------------------------------------------------------------------- checks


def _implemented() -> str:
  return f"not implemented yet (issue 15); implemented: {', '.join(IMPLEMENTED)}"


def check_config(dcfg: Any) -> list[str]:
  """Every problem with a ``diffusion`` section for its process, one line each; the ddpm
  fields are :func:`jaxdiff.core.diffusion.check_config`'s."""
  kind = getattr(dcfg, "process", "ddpm")
  if kind not in PROCESSES:
    return [f"diffusion.process={kind!r}: must be one of {', '.join(PROCESSES)}"]
  if kind not in IMPLEMENTED:
    return [f"diffusion.process={kind!r}: {_implemented()}"]
  if kind == "ddpm":
    return diffusion_lib.check_config(dcfg)
  return _flow_problems(dcfg)


def _flow_problems(dcfg: Any) -> list[str]:
  problems = []

  def need(ok: bool, field: str, allowed: str) -> None:
    if not ok:
      problems.append(f"diffusion.{field}={getattr(dcfg, field)!r}: {allowed}")

  def number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x)

  flow_only = "for process 'flow'"
  need(dcfg.t_sampler in T_SAMPLERS["flow"], "t_sampler",
       f"must be one of {', '.join(T_SAMPLERS['flow'])} {flow_only}")  # fmt: skip
  need(number(dcfg.logit_mean), "logit_mean", "must be a finite number")
  need(number(dcfg.logit_std) and dcfg.logit_std > 0, "logit_std", "must be a number > 0")
  need(number(dcfg.time_shift) and dcfg.time_shift > 0, "time_shift",
       "must be a number > 0 (1: no shift)")  # fmt: skip
  losses_ = ", ".join(FLOW_LOSS_TYPES)
  need(dcfg.loss_type in FLOW_LOSS_TYPES, "loss_type",
       f"must be one of {losses_} {flow_only} (it has no bound yet)")  # fmt: skip
  need(dcfg.var_type in ("fixed_small", "fixed_large"), "var_type",
       f"must be fixed_small or fixed_large {flow_only} (no variance output)")  # fmt: skip
  need(dcfg.min_snr_gamma == 0, "min_snr_gamma", f"must be 0 {flow_only} (a ddpm weighting)")
  need(dcfg.zero_terminal_snr is False, "zero_terminal_snr",
       f"must be False {flow_only} (a ddpm rescaling; a flow ends at pure noise)")  # fmt: skip
  return problems
