"""``diffusion.process = "vdm"``: Kingma et al. 2021 (Variational Diffusion Models) as a process.

The variance-preserving ``z_t = alpha_t x + sigma_t eps`` with ``sigma_t^2 = sigmoid(gamma(t))``
(:mod:`.continuous.vp`), a model that predicts eps from ``(z_t, t * TIME_SCALE)``, and the whole
negative ELBO as the per-example loss (:func:`vdm_losses`, the maths of :mod:`.continuous.vdm`).
gamma is the model's: ``jaxdiff.models.noise_schedule.ScheduledDenoiser`` holds it (learned or
fixed) among the parameters, and the loss and the samplers take it as a function ``gamma_fn(t)``
(:func:`model_schedule` finds it on a bound model function). :class:`VDM` is the hyperparameters
only; :class:`VDMGrid` a sampler's S steps, equally spaced in t, with gamma on them.

:mod:`jaxdiff.core.process` dispatches to these (``from_config``, ``draw``, ``training_losses``,
``discretize``, ``level_time``, ``model_time``, ``check_config``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks
from jaxdiff.core.continuous import times, vdm, vp
from jaxdiff.core.continuous.conversions import bcast

T_SAMPLERS = ("low_discrepancy", "uniform")
SCHEDULES = ("learned", "fixed")
TIME_SCALE = 1000.0  # as jaxdiff.core.process.TIME_SCALE (which imports this module)

GammaFn = Callable[[jax.Array], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class VDM:
  """VDM's hyperparameters (the schedule itself lives in the model's parameters).

  Attributes:
    t_sampler: training times ``low_discrepancy`` (the official code's antithetic sampling,
      :func:`jaxdiff.core.continuous.times.low_discrepancy`) or ``uniform``.
    num_steps: T of the discrete-time loss ``L_T`` (t on the grid ``i / T``); 0: the
      continuous-time loss ``L_inf``.
    schedule: ``learned`` or ``fixed`` (read by the model; kept here for the checks).
    gamma_min, gamma_max: the fixed schedule's ends, the learned one's initial ends.
  """

  t_sampler: str = flax.struct.field(pytree_node=False, default="low_discrepancy")
  num_steps: int = flax.struct.field(pytree_node=False, default=0)
  schedule: str = flax.struct.field(pytree_node=False, default="learned")
  gamma_min: float = flax.struct.field(pytree_node=False, default=vp.GAMMA_MIN)
  gamma_max: float = flax.struct.field(pytree_node=False, default=vp.GAMMA_MAX)

  def draw_t(self, key: jax.Array, batch_size: int) -> jax.Array:
    """``[B]`` training times in [0, 1) for the global batch."""
    if self.t_sampler == "low_discrepancy":
      return times.low_discrepancy(key, batch_size)
    return times.uniform(key, batch_size)

  def fixed_gamma(self, t: jax.Array) -> jax.Array:
    """The fixed schedule's gamma(t) (:func:`jaxdiff.core.continuous.vp.gamma_linear`)."""
    return vp.gamma_linear(t, gamma_min=self.gamma_min, gamma_max=self.gamma_max)

  def grid(self, num_steps: int) -> VDMGrid:
    """``num_steps`` steps equally spaced in t from 1 to 0 (gamma to be filled in from the
    model; for a fixed schedule already filled)."""
    t = jnp.asarray(np.linspace(0.0, 1.0, num_steps + 1), jnp.float32)
    return VDMGrid(t, self.fixed_gamma(t) if self.schedule == "fixed" else None)


@flax.struct.dataclass
class VDMGrid:
  """A vdm sampler's S steps: ``times`` ``[S + 1]`` rising from 0 to 1, step index k going from
  ``times[k + 1]`` to ``times[k]``, and ``gammas`` ``[S + 1]`` the schedule there (None until
  :func:`with_schedule` evaluates the model's)."""

  times: jax.Array
  gammas: jax.Array | None = None

  @property
  def num_timesteps(self) -> int:
    return self.times.shape[0] - 1


def model_schedule(model_fn: Any) -> GammaFn | None:
  """The schedule of a bound vdm model function, or None.

  ``jaxdiff.models.bind`` gives a ``jax.tree_util.Partial`` of ``Apply(graphdef)`` and the
  parameters; ``Apply.gamma(params, t)`` evaluates the model's schedule. Looked up by name (the
  core does not import the models), so any ``Partial`` whose function has a ``gamma(*args, t)``
  serves.
  """
  gamma = getattr(getattr(model_fn, "func", None), "gamma", None)
  if gamma is None:
    return None
  args = tuple(getattr(model_fn, "args", ()))
  return lambda t: gamma(*args, t)


def with_schedule(g: VDMGrid, model_fn: Any) -> VDMGrid:
  """``g`` with gamma on its times: the model's schedule if it has one (:func:`model_schedule`),
  else the grid's own (a fixed schedule's)."""
  gamma_fn = model_schedule(model_fn)
  if gamma_fn is not None:
    return g.replace(gammas=jnp.asarray(gamma_fn(g.times), jnp.float32))
  if g.gammas is None:
    raise ValueError(
      "a learned vdm schedule needs the model's parameters: pass a model function bound by"
      " jaxdiff.models.bind (its Apply.gamma evaluates the schedule), or a fixed schedule"
    )
  return g


def discrete_times(t: jax.Array, num_steps: int) -> jax.Array:
  """``t`` on the grid ``i / T``, ``i = 1..T`` (:func:`.continuous.vdm.discretize_time`, with
  a t of exactly 0 taken to ``1 / T`` so that ``s = t - 1/T`` stays in [0, 1))."""
  return jnp.maximum(vdm.discretize_time(t, num_steps), 1.0 / num_steps)


def vdm_losses(
  p: VDM,
  model_fn: ModelFn,
  gamma_fn: GammaFn,
  x0: jax.Array,
  t: jax.Array,
  noise: jax.Array,
  noise_0: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """VDM's negative ELBO of each example, in bits/dim, and its three terms.

  Kingma et al. 2021, Sec. 4: ``-ELBO = KL(q(z_1|x) || p(z_1)) + E[-log p(x|z_0)] + L_T``,
  the prior (:func:`.continuous.vdm.prior_kl` at gamma(1)), the reconstruction under the 8-bit
  categorical decoder (:func:`.continuous.vdm.reconstruction_nll`, ``z_0 = alpha_0 x + sigma_0
  noise_0``) and the diffusion loss at t: continuous ``1/2 gamma'(t) ||eps - eps_hat||^2``
  (:func:`.continuous.vdm.diffusion_loss`) or, with ``p.num_steps = T > 0``, the T-step form
  at ``t = ceil(t T) / T`` (:func:`.continuous.vdm.diffusion_loss_discrete`). The model is
  shown ``z_t`` and ``t * TIME_SCALE``.

  Gradients: the diffusion term reaches the schedule's parameters through
  :func:`.continuous.vdm.variance_tap` / :func:`~.continuous.vdm.variance_close`, so the schedule
  descends the mean of the squared diffusion loss (App. I.2), while the endpoints gamma(0),
  gamma(1) also get the bound's gradient of the prior and reconstruction terms and the denoiser
  the bound's gradient.

  Args:
    p: the process.
    model_fn: ``model_fn(z_t, t * TIME_SCALE) -> eps_hat``.
    gamma_fn: ``gamma_fn(t) -> gamma`` elementwise (the model's schedule).
    x0: ``[B, H, W, C]`` 8-bit data in [-1, 1].
    t: ``[B]`` times in [0, 1].
    noise: ``[B, H, W, C]`` eps of ``z_t``.
    noise_0: eps of ``z_0``; default ``noise`` (each term's estimate stays unbiased, only their
      correlation changes).

  Returns:
    dict of ``[B]``: ``loss`` = ``vb`` (the bound, bits/dim), ``prior``, ``reconstruction``,
    ``diffusion`` (its terms, bits/dim), ``mse`` (``||eps - eps_hat||^2`` averaged over
    dimensions), ``t`` (the times used).
  """
  num_dims = int(np.prod(x0.shape[1:]))
  to_bpd = lambda nats: vdm.nats_to_bpd(nats, num_dims)  # noqa: E731
  ends = gamma_fn(jnp.array([0.0, 1.0], jnp.float32))
  gamma_0, gamma_1 = ends[0], ends[1]
  prior = vdm.prior_kl(x0, gamma_1)
  noise_0 = noise if noise_0 is None else noise_0
  m_0 = vp.vp_from_gamma(gamma_0)
  reconstruction = vdm.reconstruction_nll(x0, m_0.alpha * x0 + m_0.sigma * noise_0, gamma_0)

  if p.num_steps > 0:
    t = discrete_times(t, p.num_steps)
    (g_t, g_s), carrier = vdm.variance_tap((gamma_fn(t), gamma_fn(t - 1.0 / p.num_steps)))
  else:
    (g_t, dg_t), carrier = vdm.variance_tap(vdm.gamma_and_derivative(gamma_fn, t))
  m_t = vp.vp_from_gamma(g_t)
  z_t = bcast(m_t.alpha, x0.ndim) * x0 + bcast(m_t.sigma, x0.ndim) * noise
  eps_hat = model_fn(z_t, t * TIME_SCALE)
  if p.num_steps > 0:
    diffusion = vdm.diffusion_loss_discrete(noise, eps_hat, g_t, g_s, p.num_steps)
  else:
    diffusion = vdm.diffusion_loss(noise, eps_hat, dg_t)
  diffusion = vdm.variance_close(to_bpd(diffusion), carrier)
  prior, reconstruction = to_bpd(prior), to_bpd(reconstruction)
  total = prior + reconstruction + diffusion
  mse = jnp.mean(jnp.square(noise - eps_hat), axis=tuple(range(1, x0.ndim)))
  return {
    "t": t,
    "loss": total,
    "vb": total,
    "prior": prior,
    "reconstruction": reconstruction,
    "diffusion": diffusion,
    "mse": mse,
  }


def check_config(dcfg: Any) -> list[str]:
  """Every problem with a vdm ``diffusion`` section, one line each."""
  problems = checks.Problems("diffusion", dcfg)
  need, number = problems.need, checks.is_number

  vdm_only = "for process 'vdm'"
  need(dcfg.t_sampler in ("", *T_SAMPLERS), "t_sampler",
       f"must be '' or one of {', '.join(T_SAMPLERS)} {vdm_only}")  # fmt: skip
  need(dcfg.vdm_schedule in SCHEDULES, "vdm_schedule", f"must be one of {', '.join(SCHEDULES)}")
  steps = dcfg.vdm_timesteps
  need(checks.is_int(steps, 0), "vdm_timesteps",
       "must be an int >= 0 (0: the continuous-time loss)")  # fmt: skip
  need(number(dcfg.gamma_min), "gamma_min", "must be a finite number")
  ok_max = number(dcfg.gamma_max) and (
    not number(dcfg.gamma_min) or dcfg.gamma_max > dcfg.gamma_min
  )
  need(ok_max, "gamma_max", f"must be a finite number > diffusion.gamma_min={dcfg.gamma_min!r}")
  need(isinstance(dcfg.fourier_features, bool), "fourier_features", "must be a bool")
  need(dcfg.mean_type == "eps", "mean_type", f"must be 'eps' {vdm_only} (the model predicts eps)")
  return list(problems)


def from_config(dcfg: Any, *, t_sampler: str) -> VDM:
  """The :class:`VDM` of a vdm ``diffusion`` section; ``t_sampler`` as resolved by
  :func:`jaxdiff.core.process.t_sampler`."""
  return VDM(
    t_sampler=t_sampler,
    num_steps=int(dcfg.vdm_timesteps),
    schedule=dcfg.vdm_schedule,
    gamma_min=float(dcfg.gamma_min),
    gamma_max=float(dcfg.gamma_max),
  )
