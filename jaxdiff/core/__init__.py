"""The maths of diffusion as pure functions of arrays: jax, numpy and flax.struct only.

The model enters only as ``model_fn(x_t, t) -> output``.

- :mod:`~jaxdiff.core.schedules`: beta schedules, float64.
- :mod:`~jaxdiff.core.diffusion`: the ``Diffusion`` pytree, q(x_t|x_0), the posterior,
  p(x_{t-1}|x_t), respacing.
- :mod:`~jaxdiff.core.likelihood`: KL terms, the discretized decoder, the bound in bits/dim.
- :mod:`~jaxdiff.core.losses`: training losses, given t and the noise.
- :mod:`~jaxdiff.core.timesteps`: the one place t and the training noise are drawn.
- :mod:`~jaxdiff.core.zero_snr`: zero-terminal-SNR rescaling and trailing steps.
- :mod:`~jaxdiff.core.process`: the noise process (``ddpm``, ``flow``) behind one interface.
"""

from jaxdiff.core import diffusion, likelihood, losses, process, schedules, timesteps, zero_snr

__all__ = ["diffusion", "likelihood", "losses", "process", "schedules", "timesteps", "zero_snr"]
