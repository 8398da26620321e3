"""VDM's learned noise schedule: a monotone network gamma(t) with learned endpoints.

gamma(t) is the negative logSNR of a variance-preserving process (``sigma_t^2 =
sigmoid(gamma(t))``; :mod:`jaxdiff.core.continuous.vp`). A learned schedule must be strictly
increasing in t; VDM (Kingma et al. 2021) builds it from dense layers with non-negative weights
and monotone activations, then rescales it to run between two learned endpoints. Each module maps
``t`` (any shape, values in [0, 1]) elementwise to gamma of the same shape, so
``jaxdiff.core.continuous.vdm.gamma_and_derivative`` can form gamma'(t) with ``jax.jvp``::

  schedule = LearnedGamma(rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(schedule)
  gamma_fn = lambda t: nnx.merge(graphdef, params)(t)    # inside the loss, differentiable

The fixed schedule needs no parameters and is a plain function,
``jaxdiff.core.continuous.vp.gamma_linear`` (VDM's ``NoiseSchedule_FixedLinear``): either serves
as ``gamma_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = nnx.initializers.Initializer

# VDM's initial endpoints (the official CIFAR-10 config), as in jaxdiff.core.continuous.vp: the
# models layer does not import core.
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0


class MonotoneDense(nnx.Module):
  """``y = x |W| + b``: a dense layer that is non-decreasing in every input (VDM's
  ``DenseMonotone``). The stored kernel may take any sign; its absolute value is used."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    kernel_init: Initializer,
    bias_init: Initializer | None = None,
    rngs: nnx.Rngs,
  ):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), jnp.float32))
    bias = None if bias_init is None else bias_init(rngs.params(), (out_features,), jnp.float32)
    self.bias = nnx.data(None if bias is None else nnx.Param(bias))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ jnp.abs(self.kernel[...])
    return y if self.bias is None else y + self.bias[...]


class LearnedGamma(nnx.Module):
  """VDM's learned schedule (``NoiseSchedule_NNet`` of the official code), with learned endpoints.

  The unscaled network is ``g(t) = l1(t) + l3(phi(l2(2 t - 1))) / n_features`` with monotone
  dense layers l1: 1 -> 1, l2: 1 -> n_features, l3: n_features -> 1 and ``phi(h) = 2 (sigmoid(h)
  - 1/2)``; all three increase with t, so g does. It is rescaled to

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0)),

  so ``gamma(0) = gamma_0`` and ``gamma(1) = gamma_1`` (to float32 rounding), with the
  endpoints learned parameters (Kingma et al. 2021: the endpoints alone set the prior and
  reconstruction terms, and the shape in between only the variance of the diffusion loss).
  Initialisation follows the official code: l1's kernel ``gamma_max - gamma_min``, l2 and l3
  standard normal (l2 with a zero bias), endpoints ``gamma_min = -13.3``, ``gamma_max = 5``.
  Unlike the official code, l1 and l3 have no bias: the rescaling subtracts g(0), so a bias
  there could never receive a gradient.

  Strictly increasing as long as ``gamma_1 > gamma_0`` and l1's kernel or any l2/l3 path is
  non-zero; the endpoints are free parameters, so their order is the trainer's to keep.
  """

  def __init__(
    self,
    *,
    gamma_min: float = GAMMA_MIN,
    gamma_max: float = GAMMA_MAX,
    n_features: int = 1024,
    rngs: nnx.Rngs,
  ):
    const = nnx.initializers.constant
    normal = nnx.initializers.normal(1.0)
    self.n_features = n_features
    self.l1 = MonotoneDense(1, 1, kernel_init=const(gamma_max - gamma_min), rngs=rngs)
    self.l2 = MonotoneDense(
      1, n_features, kernel_init=normal, bias_init=nnx.initializers.zeros_init(), rngs=rngs
    )
    self.l3 = MonotoneDense(n_features, 1, kernel_init=normal, rngs=rngs)
    self.gamma_0 = nnx.Param(jnp.asarray(gamma_min, jnp.float32))
    self.gamma_1 = nnx.Param(jnp.asarray(gamma_max, jnp.float32))

  def unscaled(self, t: jax.Array) -> jax.Array:
    """``g(t)`` for ``t`` ``[N]``: the monotone network before rescaling, ``[N]``."""
    t = t[:, None]  # [N, 1]
    h = self.l1(t)
    nonlinear = 2.0 * (jax.nn.sigmoid(self.l2(2.0 * t - 1.0)) - 0.5)  # [N, n_features]
    return (h + self.l3(nonlinear) / self.n_features)[:, 0]

  def __call__(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    # One pass over [t..., 0, 1]: the endpoints of g come with the points themselves.
    g = self.unscaled(jnp.concatenate([t.reshape(-1), jnp.array([0.0, 1.0], jnp.float32)]))
    g_t, g_0, g_1 = g[:-2], g[-2], g[-1]
    frac = (g_t - g_0) / (g_1 - g_0)
    # The weighted form gives gamma_0 exactly at t = 0 and gamma_1 to an ulp of frac at t = 1
    # (XLA divides by multiplying with a reciprocal, so x / x may be 1 - 2^-24).
    return ((1.0 - frac) * self.gamma_0[...] + frac * self.gamma_1[...]).reshape(t.shape)


class FixedLinearGamma(nnx.Module):
  """VDM's fixed schedule ``gamma(t) = gamma_min + (gamma_max - gamma_min) t`` as a module
  without parameters (``NoiseSchedule_FixedLinear``; the same line as
  ``jaxdiff.core.continuous.vp.gamma_linear``), so a fixed-schedule run has the same model."""

  def __init__(self, *, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX):
    self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.gamma_min + (self.gamma_max - self.gamma_min) * jnp.asarray(t, jnp.float32)


def fourier_features(z: jax.Array, n_min: int = 7, n_max: int = 9) -> jax.Array:
  """``[sin(2^n pi z), cos(2^n pi z)]`` for ``n = n_min .. n_max - 1``: ``[..., C]`` to
  ``[..., 2 (n_max - n_min) C]``. Kingma et al. 2021, App. C (Fourier features, n = 7, 8; the
  official code's ``Base2FourierFeatures(start=6, stop=8)`` writes the same frequencies as
  ``2^n 2 pi``): the fastest has a period of 1/128, about one 8-bit step of data in [-1, 1], so
  they expose the fine detail of z to the network."""
  freqs = (2.0 ** jnp.arange(n_min, n_max, dtype=jnp.float32) * jnp.pi).astype(z.dtype)  # [F]
  h = (z[..., None] * freqs).reshape(*z.shape[:-1], -1)  # [..., C F]
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


FOURIER_RANGE = (7, 9)  # n_min, n_max: n = 7, 8, the paper's


class ScheduledDenoiser(nnx.Module):
  """A denoiser and its noise schedule in one module: ``diffusion.process = "vdm"``'s model.

  Called as the denoiser is, ``model(z_t, t, y, *, key=None)`` (the eps prediction), with
  ``fourier``: VDM's Fourier features of z_t concatenated to its channels first (the
  denoiser then takes ``C (1 + 2 (n_max - n_min))`` input channels). :meth:`gamma` is the
  schedule, a :class:`LearnedGamma` or :class:`FixedLinearGamma`. Holding the schedule here puts
  its parameters among the model's, so the optimizer, EMA, shardings and checkpoints treat them as
  any other; the train step and the samplers reach it through ``jaxdiff.models.Apply.gamma``.
  """

  def __init__(self, denoiser: nnx.Module, schedule: nnx.Module, *, fourier: bool = False):
    self.denoiser, self.schedule, self.fourier = denoiser, schedule, bool(fourier)

  def __call__(self, x: jax.Array, t: jax.Array, y=None, *, key: jax.Array | None = None):
    if self.fourier:
      x = jnp.concatenate([x, fourier_features(x, *FOURIER_RANGE)], axis=-1)
    return self.denoiser(x, t, y, key=key)

  def gamma(self, t: jax.Array) -> jax.Array:
    """gamma(t), the negative logSNR, for times ``t`` of any shape (elementwise)."""
    return self.schedule(t)
