"""The noise process a run trains and samples with, behind one small interface.

``diffusion.process`` names it. ``ddpm`` is the discrete chain of :mod:`jaxdiff.core.diffusion`
(its object is the :class:`~jaxdiff.core.diffusion.Diffusion` pytree, unchanged); ``flow`` is
flow matching / rectified flow (:mod:`jaxdiff.core.continuous.flow`; its object is
:class:`FlowMatching`); ``edm`` is Karras et al. 2022's preconditioned denoiser
(:mod:`jaxdiff.core.continuous.edm`; :class:`EDM`, with t the noise level sigma); ``vdm`` is
Kingma et al. 2021's (:class:`VDM`, in :mod:`jaxdiff.core.vdm_process`; gamma(t)
lives in the model's parameters). What the train step, the samplers
and the checks ask of a process, each a function here that dispatches on the object, so a new
process is one class and one branch each:

- :func:`kind` / :func:`t_sampler`: a ``diffusion`` section's process and training-time draw;
- :func:`from_config`: the object of a config's ``diffusion`` section; :func:`name` its name;
- :func:`draw`: t (int indices, continuous times in [0, 1], or EDM's sigma), loss weights and
  the noise;
- :func:`training_losses`: x_t from x0 and the noise, the model's target and the loss;
- :func:`discretize`: the object the sampler scans over S steps (a respaced ``Diffusion``,
  a :class:`FlowGrid`, a :class:`SigmaGrid`, or a ddpm chain's :class:`VPSigmaGrid` for the
  sigma samplers), :func:`denoise` / :func:`sigma_start` on a sigma grid, and
  :func:`level_time` / :func:`model_time`: the time of step index k and what the model is shown
  for it;
- :func:`sigma_view`: the process as ``x = y + sigma n`` with a denoiser, for the
  probability-flow ODE likelihood.

Continuous time is shown to the model as ``t * TIME_SCALE``: the range of the discrete chain's
steps, so the backbones' sinusoidal embeddings (which take floats) see the same scale; EDM's
c_noise likewise, by :meth:`EDM.network_time`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks
from jaxdiff.core import diffusion as diffusion_lib
from jaxdiff.core import losses, timesteps, vdm_process
from jaxdiff.core.continuous import edm, flow, ode, times, vp
from jaxdiff.core.continuous.conversions import bcast

PROCESSES = ("ddpm", "vdm", "edm", "flow")
# How training draws t (diffusion.t_sampler), per process.
T_SAMPLERS = {
  "ddpm": diffusion_lib.T_SAMPLERS,
  "flow": ("uniform", "logit_normal"),
  "edm": ("log_normal",),  # ln sigma ~ N(p_mean, p_std^2)
  "vdm": vdm_process.T_SAMPLERS,
}
# What diffusion.t_sampler = "" (the default) means, per process: each its paper's own draw.
DEFAULT_T_SAMPLERS = {
  "ddpm": "uniform",
  "flow": "uniform",
  "edm": "log_normal",
  "vdm": "low_discrepancy",
}
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


@flax.struct.dataclass
class EDM:
  """EDM (Karras et al. 2022): ``x = y + sigma n``; the backbone F is wrapped as the denoiser
  ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` (eq. 7, Table 1), trained at log-normal
  sigma with the weight lambda(sigma) (:mod:`jaxdiff.core.continuous.edm`). Hyperparameters only.

  Attributes:
    sigma_data: the data's standard deviation; 0.5, EDM's choice, suits data in [-1, 1].
    p_mean, p_std: the training levels, ``ln sigma ~ N(p_mean, p_std^2)``.
    sigma_min, sigma_max, rho: the sampling grid (eq. 5); sigma_min and sigma_max also fix the
      time the backbone is shown (:meth:`network_time`).
  """

  sigma_data: float = flax.struct.field(pytree_node=False, default=edm.SIGMA_DATA)
  p_mean: float = flax.struct.field(pytree_node=False, default=times.P_MEAN)
  p_std: float = flax.struct.field(pytree_node=False, default=times.P_STD)
  sigma_min: float = flax.struct.field(pytree_node=False, default=edm.SIGMA_MIN)
  sigma_max: float = flax.struct.field(pytree_node=False, default=edm.SIGMA_MAX)
  rho: float = flax.struct.field(pytree_node=False, default=edm.RHO)

  def network_time(self, c_noise: jax.Array) -> jax.Array:
    """What the backbone is shown for EDM's ``c_noise = ln(sigma) / 4``: the affine map
    ``TIME_SCALE (4 c_noise - ln sigma_min) / ln(sigma_max / sigma_min)``, which takes the
    sampling range [sigma_min, sigma_max] onto [0, TIME_SCALE].

    The backbones embed time sinusoidally with frequencies made for the discrete chain's steps
    0..T-1; raw c_noise (about -1.6..1.1) would use only the slowest few of them. Any affine map
    of ln sigma carries the same information, and this one also keeps ddpm's sense (more noise,
    larger t). Training levels beyond the range (log-normal tails) go a little outside
    [0, TIME_SCALE], which the embedding of floats takes as it is.
    """
    span = np.log(self.sigma_max / self.sigma_min)
    return TIME_SCALE * (4.0 * c_noise - np.log(self.sigma_min)) / span

  def draw_t(self, key: jax.Array, batch_size: int) -> jax.Array:
    """``[B]`` training levels sigma, ``ln sigma ~ N(p_mean, p_std^2)`` (EDM, Table 1)."""
    return times.edm_sigma(key, batch_size, p_mean=self.p_mean, p_std=self.p_std)

  def denoiser(self, model_fn: ModelFn) -> edm.DenoiseFn:
    """``D(x, sigma)`` of a backbone ``model_fn(x, time)`` shown :meth:`network_time`."""

    def network(x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
      return model_fn(x_in, self.network_time(c_noise))

    return lambda x, sigma: edm.denoise(network, x, sigma, sigma_data=self.sigma_data)

  def grid(self, num_steps: int) -> SigmaGrid:
    """The sampling grid: ``num_steps`` steps from sigma_max to sigma_min on the rho grid, then 0
    (:func:`jaxdiff.core.continuous.edm.sigma_steps`)."""
    sigmas = edm.sigma_steps(
      num_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho
    )
    return SigmaGrid(jnp.flip(sigmas), self)


@flax.struct.dataclass
class SigmaGrid:
  """An EDM sampler's S steps: ``sigmas`` ``[S + 1]`` rising from 0 to sigma_max (the order of a
  :class:`FlowGrid`'s times); step index k goes from ``sigmas[k + 1]`` to ``sigmas[k]``. The
  process time is sigma itself."""

  sigmas: jax.Array
  process: EDM = flax.struct.field(pytree_node=False, default=EDM())

  @property
  def num_timesteps(self) -> int:
    return self.sigmas.shape[0] - 1


@flax.struct.dataclass
class VPSigmaGrid:
  """The ddpm chain run on EDM's sigma grid (Karras et al. 2022, eq. 4 with ``s(t) = alpha_t``):
  level t has ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` and ``x_sigma = x_t /
  sqrt(alpha_bar_t)``. Built by :func:`vp_sigma_grid`.

  A sigma between two levels is shown to the discrete-time model as a fractional step,
  interpolated linearly in ln sigma between the neighbouring levels' original steps
  (:func:`vp_model_time`), and the model's input is ``alpha x_sigma`` with ``alpha = 1 /
  sqrt(1 + sigma^2)``: the state and the time the model sees agree at every sigma, exactly so at
  the levels. (EDM snaps its grid to the levels instead, for a model that has only seen
  integers; the backbones here embed float times, and snapping would bend the rho grid into
  repeated levels near sigma_min when S is large.)

  Attributes:
    sigmas: ``[S + 1]`` rising from 0 to the chain's largest finite sigma; as :class:`SigmaGrid`.
    level_log_sigmas: ``[L]`` ln sigma_t of the chain's levels (those with alpha_bar > 0),
      rising.
    level_steps: ``[L]`` their original-schedule steps (float), what the model is shown.
    mean_type: what the model predicts (``eps``, ``x0``, ``v``).
    learned_variance: the model's output carries variance channels too (they are dropped).
  """

  sigmas: jax.Array
  level_log_sigmas: jax.Array
  level_steps: jax.Array
  mean_type: str = flax.struct.field(pytree_node=False, default="eps")
  learned_variance: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def num_timesteps(self) -> int:
    return self.sigmas.shape[0] - 1


def vp_sigma_grid(d: diffusion_lib.Diffusion, num_steps: int | None, *, rho: float = edm.RHO):
  """The ddpm chain ``d`` (respaced or not) on a rho grid of ``num_steps`` steps between its
  smallest and largest finite sigma (a zero-terminal-SNR chain's last level, sigma = inf, is
  left out), for the sigma samplers; see :class:`VPSigmaGrid`."""
  if num_steps is None or num_steps < 1:
    raise ValueError(f"num_steps={num_steps}: a sigma sampler needs a number of steps >= 1")
  ab = np.asarray(d.alphas_cumprod, np.float64)
  keep = ab > 0
  if keep.sum() < 2:
    raise ValueError(f"the chain has {int(keep.sum())} level(s) with alpha_bar > 0; need 2")
  # 1 - alpha_bar as the chain formed it in float64: near t = 0 it is ~1e-4.
  one_minus = np.asarray(d.one_minus_alphas_cumprod, np.float64)[keep]
  log_sigmas = 0.5 * (np.log(one_minus) - np.log(ab[keep]))
  sigmas = edm.sigma_steps(
    int(num_steps),
    sigma_min=float(np.exp(log_sigmas[0])),
    sigma_max=float(np.exp(log_sigmas[-1])),
    rho=rho,
  )
  steps = np.asarray(d.timestep_map, np.float64)[keep]
  return VPSigmaGrid(
    jnp.flip(sigmas),
    jnp.asarray(log_sigmas, jnp.float32),
    jnp.asarray(steps, jnp.float32),
    mean_type=d.mean_type,
    learned_variance=d.learned_variance,
  )


def vp_model_time(g: VPSigmaGrid, sigma: jax.Array) -> jax.Array:
  """The fractional original-schedule step of level sigma: linear in ln sigma between the
  neighbouring levels (:class:`VPSigmaGrid`), clamped to the first and last level."""
  return jnp.interp(jnp.log(sigma), g.level_log_sigmas, g.level_steps)


def vp_denoise(g: VPSigmaGrid, model_fn: ModelFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
  """``D(x_sigma; sigma)``, the x0 estimate of a ddpm model on the sigma grid: the model is
  called at ``x_t = alpha x_sigma`` (``alpha = 1 / sqrt(1 + sigma^2)``) and process time sigma,
  and its prediction turned into x0 (Karras et al. 2022, eq. 4 and App. C.3.1): ``x0 = x_sigma -
  sigma eps`` for eps, itself for x0, ``alpha^2 x_sigma - alpha sigma v`` for v (``v = alpha eps
  - sigma_t x0``, ``sigma_t = alpha sigma``)."""
  alpha, sigma_t = edm.vp_from_sigma(sigma)
  a, s = bcast(alpha, x.ndim), bcast(sigma, x.ndim)
  out = model_fn(a * x, sigma)
  if g.learned_variance:
    out = out[..., : out.shape[-1] // 2]
  if g.mean_type == "eps":
    return x - s * out
  if g.mean_type == "x0":
    return out
  return a * a * x - a * s * out


def sigma_start(g: SigmaGrid | VPSigmaGrid, x_T: jax.Array) -> jax.Array:
  """The sigma samplers' start at the grid's largest sigma from ``x_T ~ N(0, I)``: ``sigma_max
  x_T`` for EDM (its prior), ``x_T / alpha = sqrt(1 + sigma_max^2) x_T`` for ddpm (the VP state
  x_T, as the chain's own samplers start, seen at sigma_max)."""
  sigma_max = g.sigmas[-1]
  if isinstance(g, SigmaGrid):
    return sigma_max * x_T
  return jnp.sqrt(1.0 + jnp.square(sigma_max)) * x_T


def denoise(
  g: SigmaGrid | VPSigmaGrid, model_fn: ModelFn, x: jax.Array, sigma: jax.Array
) -> jax.Array:
  """``D(x; sigma)`` on a sigma grid, for the sigma samplers: ``model_fn(x_in, sigma [B])`` is
  the (guided) model at process time sigma (the driver's ``Chain.model_at``), called on the
  state the process feeds it (EDM: ``c_in x``; ddpm: ``alpha x``).

  Args:
    g: the grid.
    model_fn: ``model_fn(x_in, sigma) -> output``, sigma ``[B]``.
    x: ``[B, H, W, C]`` at level sigma.
    sigma: a scalar or ``[B]`` level > 0.
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  if isinstance(g, VPSigmaGrid):
    return vp_denoise(g, model_fn, x, sigma)
  network = lambda x_in, c_noise: model_fn(x_in, sigma)  # noqa: E731  # time: model_time(g, sigma)
  return edm.denoise(network, x, sigma, sigma_data=g.process.sigma_data)


# The flow's ODE runs from t = FLOW_T_RANGE[0] to [1] for its likelihood (sigma = t / (1 - t)
# from 0.002, EDM's sigma_min, to 999; at t = 1 sigma is infinite).
FLOW_T_RANGE = (0.002 / 1.002, 0.999)


def sigma_view(p: Any, model_fn: ModelFn) -> ode.SigmaView:
  """Any process as ``x = y + sigma n`` with a denoiser ``D(x; sigma)`` (Karras et al. 2022,
  eq. 4: ``x_sigma = x_t / alpha_t``, ``sigma = sigma_t / alpha_t``), over the noise levels the
  process trains on, with the prior ``N(0, Var[y] + sigma_max^2)`` (Var[y] = 1 as the VP prior
  assumes, sigma_data^2 for EDM): what the probability-flow ODE likelihood needs
  (:func:`jaxdiff.core.continuous.ode.sigma_log_likelihood`).

  - ddpm: the chain's levels (:func:`vp_denoise`, fractional steps between them);
  - edm: its preconditioned denoiser from sigma_min to sigma_max;
  - flow: ``t = sigma / (1 + sigma)``, ``x_t = x_sigma / (1 + sigma)``, ``x0 = x_t - t v``, for t
    in :data:`FLOW_T_RANGE`;
  - vdm: ``gamma = 2 ln sigma`` of the model's schedule, inverted by bisection (it increases),
    ``x0 = x_sigma - sigma eps``, for t in [0, 1].

  Args:
    p: the process (not a sampling grid).
    model_fn: the model as training calls it, ``model_fn(x_t, time) -> output`` (a vdm model
      bound by ``jaxdiff.models.bind``, which carries its schedule).
  """
  if isinstance(p, EDM):
    return ode.SigmaView(p.denoiser(model_fn), p.sigma_min, p.sigma_max,
                         p.sigma_max**2 + p.sigma_data**2)  # fmt: skip
  if isinstance(p, FlowMatching):
    lo, hi = (t / (1.0 - t) for t in FLOW_T_RANGE)

    def flow_denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
      t = sigma / (1.0 + sigma)
      x_t = x / bcast(1.0 + sigma, x.ndim)
      return flow.x0_from_velocity(x_t, model_fn(x_t, t * TIME_SCALE), t)

    return ode.SigmaView(flow_denoise, lo, hi, 1.0 + hi**2)
  if isinstance(p, VDM):
    return _vdm_sigma_view(p, model_fn)
  g = vp_sigma_grid(p, 1)
  lo, hi = (float(np.exp(g.level_log_sigmas[k])) for k in (0, -1))
  model_at = lambda x_in, sigma: model_fn(x_in, vp_model_time(g, sigma))  # noqa: E731
  return ode.SigmaView(lambda x, sigma: vp_denoise(g, model_at, x, sigma), lo, hi, 1.0 + hi**2)


def _vdm_sigma_view(p: VDM, model_fn: ModelFn) -> ode.SigmaView:
  gamma_fn = vdm_process.model_schedule(model_fn) or p.fixed_gamma
  ends = np.asarray(gamma_fn(jnp.array([0.0, 1.0], jnp.float32)), np.float64)
  lo, hi = (float(np.exp(g / 2)) for g in ends)

  def time_of(sigma: jax.Array) -> jax.Array:  # gamma(t) = 2 ln sigma, by bisection in [0, 1]
    target = 2.0 * jnp.log(sigma)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
      a, b = bounds
      mid = 0.5 * (a + b)
      below = gamma_fn(mid) < target
      return jnp.where(below, mid, a), jnp.where(below, b, mid)

    a, b = jax.lax.fori_loop(0, 30, halve, (jnp.zeros_like(sigma), jnp.ones_like(sigma)))
    return 0.5 * (a + b)

  def vdm_denoise(x: jax.Array, sigma: jax.Array) -> jax.Array:
    alpha = vp.vp_from_gamma(2.0 * jnp.log(sigma)).alpha
    eps = model_fn(bcast(alpha, x.ndim) * x, time_of(sigma) * TIME_SCALE)
    return x - bcast(sigma, x.ndim) * eps

  return ode.SigmaView(vdm_denoise, lo, hi, 1.0 + hi**2)


Process = diffusion_lib.Diffusion | FlowMatching | EDM | vdm_process.VDM
VDM, VDMGrid = vdm_process.VDM, vdm_process.VDMGrid  # diffusion.process = "vdm"


def kind(dcfg: Any) -> str:
  """``diffusion.process`` of a ``diffusion`` section (``ddpm`` where the field is missing: a
  hand-built section, or a config from before the field existed)."""
  return getattr(dcfg, "process", "ddpm")


def t_sampler(dcfg: Any) -> str:
  """How a ``diffusion`` section draws training times: ``diffusion.t_sampler``, or its process's
  own (:data:`DEFAULT_T_SAMPLERS`) when that is ``""``."""
  return dcfg.t_sampler or DEFAULT_T_SAMPLERS.get(kind(dcfg), "uniform")


def from_config(dcfg: Any) -> Process:
  """The process of a config's ``diffusion`` section (checked by :func:`check_config`)."""
  kind_ = kind(dcfg)
  if kind_ == "ddpm":
    return diffusion_lib.from_config(dcfg)
  if kind_ == "flow":
    return FlowMatching(
      t_sampler=t_sampler(dcfg),
      logit_mean=float(dcfg.logit_mean),
      logit_std=float(dcfg.logit_std),
      shift=float(dcfg.time_shift),
    )
  if kind_ == "vdm":
    return vdm_process.from_config(dcfg, t_sampler=t_sampler(dcfg))
  if kind_ == "edm":
    return EDM(
      sigma_data=float(dcfg.sigma_data),
      p_mean=float(dcfg.p_mean),
      p_std=float(dcfg.p_std),
      sigma_min=float(dcfg.sigma_min),
      sigma_max=float(dcfg.sigma_max),
      rho=float(dcfg.rho),
    )
  raise ValueError(f"diffusion.process={kind_!r}: must be one of {', '.join(PROCESSES)}")


def name(p: Any) -> str:
  """``ddpm``, ``flow`` or ``edm``: the process an object (or its sampling grid) belongs to (a
  :class:`VPSigmaGrid` is the ddpm chain's)."""
  if isinstance(p, FlowMatching | FlowGrid):
    return "flow"
  if isinstance(p, VDM | VDMGrid):
    return "vdm"
  return "edm" if isinstance(p, EDM | SigmaGrid) else "ddpm"


def draw(
  p: Process,
  key_t: jax.Array,
  key_noise: jax.Array,
  x0: jax.Array,
  history: timesteps.LossHistory | None = None,
) -> timesteps.Draw:
  """t, weights and standard-normal noise for ``x0`` (the global batch); the ddpm draw is
  :func:`jaxdiff.core.timesteps.draw`, unchanged."""
  if isinstance(p, FlowMatching | VDM | EDM):  # each draws its own times (EDM: sigma)
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
  gamma_fn: Callable[[jax.Array], jax.Array] | None = None,
  **ddpm_options: Any,
) -> dict[str, jax.Array]:
  """Per-example losses ``[B]`` at ``t``: :func:`jaxdiff.core.losses.training_losses` for ddpm
  (``ddpm_options``: ``min_snr_gamma``, ``decoder``), :func:`flow_losses` for flow,
  :func:`edm_losses` for edm (``t`` is sigma there)."""
  if isinstance(p, FlowMatching):
    return flow_losses(model_fn, x0, t, noise, loss_type=loss_type)
  if isinstance(p, VDM):  # gamma_fn: the model's schedule (vdm_process.vdm_losses)
    if gamma_fn is None:
      raise ValueError("the vdm process's loss needs gamma_fn, the model's noise schedule")
    return vdm_process.vdm_losses(p, model_fn, gamma_fn, x0, t, noise)
  if isinstance(p, EDM):
    return edm_losses(p, model_fn, x0, t, noise)
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


def edm_losses(
  p: EDM, model_fn: ModelFn, x0: jax.Array, sigma: jax.Array, noise: jax.Array
) -> dict[str, jax.Array]:
  """EDM's loss ``lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2`` averaged over dimensions
  (Karras et al. 2022, eq. 2 weighted as eq. 8;
  :func:`jaxdiff.core.continuous.edm.training_loss`), D the preconditioned backbone
  (:meth:`EDM.denoiser`). lambda = 1 / c_out^2 makes it the plain mse of F against its
  unit-variance target, so ``simple`` and ``loss`` are the same number.

  Returns:
    dict with ``loss`` = ``simple`` ``[B]`` and ``t`` = sigma ``[B]``.
  """
  loss = edm.training_loss(p.denoiser(model_fn), x0, sigma, noise, sigma_data=p.sigma_data)
  return {"t": sigma, "simple": loss, "loss": loss}


# ----------------------------------------------------------------------------- sampling


def discretize(
  p: Any,
  num_steps: int | None,
  steps: Callable[[Any, int | None], list[int]],
  *,
  sigma: bool = False,
) -> Any:
  """What a sampler scans over: a flow's :class:`FlowGrid` or an EDM :class:`SigmaGrid` of
  ``num_steps`` steps, or a ``Diffusion`` respaced to the indices ``steps(d, num_steps)`` (the
  sampler's spacing), or with ``sigma`` (a sigma sampler) its :func:`vp_sigma_grid`."""
  if isinstance(p, FlowGrid | SigmaGrid | VPSigmaGrid | VDMGrid):  # already a grid
    if num_steps not in (None, p.num_timesteps):
      raise ValueError(f"num_steps={num_steps}: this grid has {p.num_timesteps} steps")
    return p
  if isinstance(p, FlowMatching | VDM | EDM):
    if num_steps is None or num_steps < 1:
      raise ValueError(f"num_steps={num_steps}: the {name(p)} process needs a number of steps >= 1")
    return p.grid(int(num_steps))
  if sigma:
    return vp_sigma_grid(p, num_steps)
  kept = steps(p, num_steps)
  return p if len(kept) == p.num_timesteps else diffusion_lib.respace(p, kept)


def level_time(d: Any, t_index: jax.Array) -> jax.Array:
  """The process time of step index ``t_index`` ``[B]``: the index itself for ddpm, the time
  the step starts from (``times[k + 1]``, ``sigmas[k + 1]``) on a flow or sigma grid."""
  if isinstance(d, SigmaGrid | VPSigmaGrid):
    return d.sigmas[t_index + 1]
  return d.times[t_index + 1] if isinstance(d, FlowGrid | VDMGrid) else t_index


def model_time(d: Any, t: jax.Array) -> jax.Array:
  """What the model is shown at process time ``t``: the original-schedule step for ddpm,
  ``t * TIME_SCALE`` for flow; for sigma, :meth:`EDM.network_time` of ``c_noise`` on an EDM
  grid and the fractional step :func:`vp_model_time` on a ddpm chain's."""
  if isinstance(d, FlowGrid | VDMGrid):
    return t * TIME_SCALE
  if isinstance(d, SigmaGrid):
    return d.process.network_time(edm.preconditioning(t).c_noise)
  if isinstance(d, VPSigmaGrid):
    return vp_model_time(d, t)
  return diffusion_lib.model_timesteps(d, t)


# ----------------------------------------------------------------------------- checks


def check_config(dcfg: Any) -> list[str]:
  """Every problem with a ``diffusion`` section for its process, one line each; the ddpm
  fields are :func:`jaxdiff.core.diffusion.check_config`'s."""
  kind_ = kind(dcfg)
  if kind_ not in PROCESSES:
    return [f"diffusion.process={kind_!r}: must be one of {', '.join(PROCESSES)}"]
  if kind_ == "ddpm":
    return diffusion_lib.check_config(dcfg)
  own = {"vdm": vdm_process.check_config, "edm": _edm_problems, "flow": _flow_problems}[kind_]
  return own(dcfg) + _ddpm_options_unset(dcfg, kind_)


def _ddpm_options_unset(dcfg: Any, kind_: str) -> list[str]:
  """The ddpm chain's own options, which a continuous process must leave at their defaults."""
  problems, only = checks.Problems("diffusion", dcfg), f"for process {kind_!r}"
  problems.need(dcfg.var_type in ("fixed_small", "fixed_large"), "var_type",
                f"must be fixed_small or fixed_large {only} (no variance output)")  # fmt: skip
  problems.need(dcfg.min_snr_gamma == 0, "min_snr_gamma", f"must be 0 {only} (a ddpm weighting)")
  problems.need(dcfg.zero_terminal_snr is False, "zero_terminal_snr",
                f"must be False {only} (a ddpm rescaling)")  # fmt: skip
  return list(problems)


def _flow_problems(dcfg: Any) -> list[str]:
  problems = checks.Problems("diffusion", dcfg)
  need, number = problems.need, checks.is_number

  flow_only = "for process 'flow'"
  need(dcfg.t_sampler in ("", *T_SAMPLERS["flow"]), "t_sampler",
       f"must be '' or one of {', '.join(T_SAMPLERS['flow'])} {flow_only}")  # fmt: skip
  need(number(dcfg.logit_mean), "logit_mean", "must be a finite number")
  need(number(dcfg.logit_std) and dcfg.logit_std > 0, "logit_std", "must be a number > 0")
  need(number(dcfg.time_shift) and dcfg.time_shift > 0, "time_shift",
       "must be a number > 0 (1: no shift)")  # fmt: skip
  losses_ = ", ".join(FLOW_LOSS_TYPES)
  need(dcfg.loss_type in FLOW_LOSS_TYPES, "loss_type",
       f"must be one of {losses_} {flow_only} (kl and hybrid are the ddpm chain's)")  # fmt: skip
  return list(problems)


def _edm_problems(dcfg: Any) -> list[str]:
  problems = checks.Problems("diffusion", dcfg)
  need, number = problems.need, checks.is_number

  edm_only = "for process 'edm'"
  need(dcfg.t_sampler in ("", *T_SAMPLERS["edm"]), "t_sampler",
       f"must be '' or one of {', '.join(T_SAMPLERS['edm'])} {edm_only}"
       " (ln sigma ~ N(p_mean, p_std^2))")  # fmt: skip
  need(number(dcfg.sigma_data) and dcfg.sigma_data > 0, "sigma_data",
       "must be a number > 0 (the data's standard deviation; 0.5 for [-1, 1])")  # fmt: skip
  need(number(dcfg.p_mean), "p_mean", "must be a finite number")
  need(number(dcfg.p_std) and dcfg.p_std > 0, "p_std", "must be a number > 0")
  need(number(dcfg.sigma_min) and dcfg.sigma_min > 0, "sigma_min", "must be a number > 0")
  lo = dcfg.sigma_min if number(dcfg.sigma_min) and dcfg.sigma_min > 0 else 0
  need(number(dcfg.sigma_max) and dcfg.sigma_max > lo, "sigma_max",
       f"must be a number > diffusion.sigma_min ({dcfg.sigma_min!r})")  # fmt: skip
  need(number(dcfg.rho) and dcfg.rho > 0, "rho", "must be a number > 0 (EDM: 7)")
  need(dcfg.loss_type == "mse", "loss_type",
       f"must be mse {edm_only} (the lambda(sigma)-weighted L2)")  # fmt: skip
  return list(problems)
