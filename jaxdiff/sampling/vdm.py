"""VDM's samplers (``diffusion.process = "vdm"``): S steps equally spaced in t from 1 to 0 on the
process's grid (:class:`jaxdiff.core.process.VDMGrid`, gamma from the model's own schedule), one
model call per step.

``vdm`` is the ancestral sampler of Kingma et al. 2021 (the official code's ``VDM.sample``):
``z_s ~ p(z_s | z_t)``, :func:`jaxdiff.core.continuous.vdm.ancestral_step`; ``vdm_ddim`` the
deterministic step :func:`~jaxdiff.core.continuous.vdm.ddim_step`. After the last step (t = 0)
the sample is ``z_0 / alpha_0`` (the mean of VDM's decoder before rounding to the 8-bit levels),
clipped to [-1, 1] with ``clip_denoised``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.core.continuous import vdm
from jaxdiff.sampling.base import Chain, Sampler, State, init_state, step_key


def _sampler(update, clip_denoised: bool) -> Sampler:
  def step(carry: State, i: jax.Array, t_index: jax.Array, chain: Chain) -> State:
    g = chain.d.gammas
    g_t, g_s = g[t_index + 1], g[t_index]
    eps_hat, _ = chain.model(carry.x, t_index)  # the guided eps at times[t_index + 1]
    z = update(carry.x, eps_hat, g_t, g_s, chain, i)
    x_0 = z * jnp.sqrt(1.0 + jnp.exp(g_s))  # z_0 / alpha_0, as 1 / alpha^2 = 1 + e^gamma
    if clip_denoised:
      x_0 = jnp.clip(x_0, -1.0, 1.0)
    return State(jnp.where(t_index == 0, x_0, z))

  return Sampler(init_state, step)


def vdm_sampler(*, clip_denoised: bool = True, temperature: float = 1.0) -> Sampler:
  """Ancestral sampling, :func:`jaxdiff.core.continuous.vdm.ancestral_step`; ``temperature``
  scales the injected noise."""

  def update(z, eps_hat, g_t, g_s, chain, i):
    noise = temperature * chain.noise(step_key(chain, i))
    return vdm.ancestral_step(z, eps_hat, g_t, g_s, noise)

  return _sampler(update, clip_denoised)


def vdm_ddim_sampler(*, clip_denoised: bool = True) -> Sampler:
  """The deterministic :func:`jaxdiff.core.continuous.vdm.ddim_step`: no noise is drawn."""
  return _sampler(lambda z, eps_hat, g_t, g_s, chain, i: vdm.ddim_step(z, eps_hat, g_t, g_s),
                  clip_denoised)  # fmt: skip
