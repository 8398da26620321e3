"""Continuous-time diffusion maths as pure functions of arrays: jax, numpy and flax.struct only.

t is continuous in [0, 1] (t = 0 data, t = 1 noise) or, for EDM, a noise level sigma; images
are NHWC. The model enters only as a function of arrays (``eps_fn``, ``model_fn``,
``denoise_fn``, ``velocity_fn``, ``drift_fn``, ``gamma_fn``), never as a module.

- :mod:`~.conversions`: eps / x0 / v / score predictions of ``x_t = alpha x0 + sigma eps``.
- :mod:`~.vp`: variance-preserving schedules alpha(t), sigma(t), logSNR: linear-beta SDE,
  cosine, from VDM's gamma(t).
- :mod:`~.vdm`: VDM's continuous and T-step diffusion losses, prior and reconstruction terms.
- :mod:`~.edm`: EDM's preconditioning, loss weight, sigma grid, Heun steps, VP <-> sigma.
- :mod:`~.flow`: flow matching / rectified flow paths, targets and ODE steps.
- :mod:`~.times`: the one place continuous training times (and EDM's sigmas) are drawn.
- :mod:`~.ode`: log-likelihood through the probability-flow ODE.
"""

from jaxdiff.core.continuous import conversions, edm, flow, ode, times, vdm, vp

__all__ = ["conversions", "edm", "flow", "ode", "times", "vdm", "vp"]
