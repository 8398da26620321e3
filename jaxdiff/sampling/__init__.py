"""Samplers: from noise x_T to images x_0 with a trained denoiser.

Every sampler shares one contract. The model enters only as
``model_fn(x_t, t) -> output`` (or ``model_fn(x_t, t, y)`` with class labels),
where ``t`` is ``[B]`` original-schedule steps (:func:`jaxdiff.core.diffusion.model_timesteps`,
so a respaced diffusion still shows the model the steps it was trained on), and
the output is whatever the diffusion's ``mean_type`` / ``var_type`` say it is;
:func:`jaxdiff.core.diffusion.p_mean_variance` turns it into ``pred_x0`` / ``pred_eps``.

The registry (:data:`REGISTRY`, names in :data:`SAMPLERS`):

- ``ddpm``: ancestral sampling, Ho et al. 2020, Algorithm 2 (S model calls);
- ``ddim``: Song, Meng & Ermon 2021, eq. 12 with sigma from eq. 16 times eta (S);
- ``dpm++2m``: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (S);
- ``euler_maruyama``: the reverse VP-SDE, Song et al. 2021 (score SDE), eq. 6 (S);
- ``pc``: Langevin corrector + ancestral / Euler-Maruyama predictor, score SDE
  Algorithm 5 (S * (1 + n_corrector_steps));
- ``euler`` and ``heun``: the flow process's ODE, ``dx/dt = v(x, t)`` from t = 1 to 0
  (S and 2S model calls); on EDM's or a ddpm chain's sigma grid, the probability-flow ODE
  ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022, Alg. 1; :mod:`.sigma`);
- ``edm_stochastic``: Karras et al. 2022, Alg. 2 (churn ``s_churn``, ``s_tmin``, ``s_tmax``,
  ``s_noise``; 2S - 1 model calls), for edm and ddpm.

A sampler implements one or more noise processes (``SamplerDef.processes``, listed by
:func:`samplers_for`): :func:`sample` refuses a sampler of another process.

Each is a factory returning an ``init`` / ``step`` pair (:class:`Sampler`) over a
named carry; one driver runs it as one ``jax.lax.scan`` over the S steps of the
(respaced) diffusion, so under ``jax.jit`` it compiles once per shape and S.
Step ``i`` (``i = 0`` is the first, noisiest step) draws its noise from
``jax.random.fold_in(key, i)`` in the global view, so with a mesh the samples
do not depend on the number of devices. A new sampler is one module and one
:data:`REGISTRY` entry (or :func:`register_sampler`); see :mod:`.registry`.

Example:

  >>> import jax
  >>> from jaxdiff import sampling
  >>> from jaxdiff.core import diffusion, schedules
  >>> d = diffusion.make_diffusion(schedules.get_betas("linear", 1000))
  >>> model_fn = lambda x, t: 0.1 * x  # stands in for a trained eps-prediction network
  >>> key = jax.random.key(0)
  >>> x0 = sampling.sample(d, model_fn, key, (4, 8, 8, 1), sampler="ddim", num_steps=10)
  >>> x0.shape
  (4, 8, 8, 1)

With a trained network, pass ``jax.tree_util.Partial(apply_fn, params)`` so that
the parameters are jit arguments, and take the options from the run's config
with ``sampling.sample(d, model_fn, key, shape, **sampling.sampler_kwargs(config))``.
For a loop you jit yourself, :func:`make_sampler` returns the pure function
``fn(d, model_fn, key, x_T, labels=None)``; :func:`sample_in_chunks` draws many
samples in fixed-size chunks with one compiled function. ``progress=True`` (on any of
them) compiles a host callback into the scan that reports every step, for a bar
with an ETA even when one chunk is one call; :mod:`.progress` says how, and what it costs.
"""

from jaxdiff.sampling.base import Chain, Sampler, State
from jaxdiff.sampling.config import check as check_sampling
from jaxdiff.sampling.config import class_labels, sample_from_config, sampler_kwargs
from jaxdiff.sampling.ddim import ddim_sampler, ddim_step
from jaxdiff.sampling.ddpm import ddpm_sampler, ddpm_step
from jaxdiff.sampling.dpmpp import DPMState, dpmpp_2m_sampler, dpmpp_2m_step
from jaxdiff.sampling.driver import make_sampler, sample, sample_in_chunks
from jaxdiff.sampling.guidance import guided_model_output
from jaxdiff.sampling.registry import (
  REGISTRY,
  SAMPLERS,
  SamplerDef,
  get_sampler,
  injects_noise,
  register_sampler,
  samplers_for,
)
from jaxdiff.sampling.sde import (
  PREDICTORS,
  ancestral_step,
  euler_maruyama_sampler,
  euler_maruyama_step,
  langevin_step,
  pc_sampler,
)
from jaxdiff.sampling.sigma import euler_sampler, heun_sampler, stochastic_sampler
from jaxdiff.sampling.spacing import SPACINGS, sampler_timesteps

__all__ = [
  "Chain",
  "DPMState",
  "PREDICTORS",
  "REGISTRY",
  "SAMPLERS",
  "SPACINGS",
  "Sampler",
  "SamplerDef",
  "State",
  "ancestral_step",
  "class_labels",
  "ddim_sampler",
  "ddim_step",
  "ddpm_sampler",
  "ddpm_step",
  "dpmpp_2m_sampler",
  "dpmpp_2m_step",
  "euler_maruyama_sampler",
  "euler_sampler",
  "euler_maruyama_step",
  "get_sampler",
  "guided_model_output",
  "heun_sampler",
  "injects_noise",
  "langevin_step",
  "make_sampler",
  "pc_sampler",
  "register_sampler",
  "sample",
  "sample_in_chunks",
  "samplers_for",
  "stochastic_sampler",
  "check_sampling",
  "sample_from_config",
  "sampler_kwargs",
  "sampler_timesteps",
]
