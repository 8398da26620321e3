"""The samplers by name: each a factory, the step spacing it defaults to, the options it takes.

Adding a sampler is one file holding its step maths and a factory
``factory(**options) -> Sampler`` (see :mod:`jaxdiff.sampling.base`), and one
line here (or a :func:`register_sampler` call from outside the package)::

  "restart": SamplerDef(restart_sampler, "sections", ("clip_denoised", "s_churn")),

:func:`~jaxdiff.sampling.make_sampler` passes the factory only the options it
lists; an option that is not one of ``make_sampler``'s keywords (``s_churn``
above) is passed through ``make_sampler(..., s_churn=...)`` and ``sample(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from jaxdiff.sampling.base import Sampler
from jaxdiff.sampling.ddim import ddim_sampler
from jaxdiff.sampling.ddpm import ddpm_sampler
from jaxdiff.sampling.dpmpp import dpmpp_2m_sampler
from jaxdiff.sampling.sde import euler_maruyama_sampler, pc_sampler
from jaxdiff.sampling.sigma import euler_sampler, heun_sampler, stochastic_sampler
from jaxdiff.sampling.vdm import vdm_ddim_sampler, vdm_sampler


class SamplerDef(NamedTuple):
  """A registered sampler.

  Attributes:
    factory: ``factory(**options) -> Sampler``, called once per set of options, outside jit.
    spacing: which steps it visits by default, one of :data:`~jaxdiff.sampling.SPACINGS`
      (a ddpm sampler's; a flow sampler steps on its process's grid), or :data:`SIGMA_GRID`:
      it steps on a sigma grid, for ddpm the chain's :func:`jaxdiff.core.process.vp_sigma_grid`.
    options: the keyword options ``factory`` takes.
    processes: the noise processes (``diffusion.process``) whose maths it implements.
  """

  factory: Callable[..., Sampler]
  spacing: str = "sections"
  options: tuple[str, ...] = ()
  processes: tuple[str, ...] = ("ddpm",)


SIGMA_GRID = "sigma"
_NOISY = ("clip_denoised", "temperature")
_CHURN = (*_NOISY, "s_churn", "s_tmin", "s_tmax", "s_noise")
_PC = (*_NOISY, "snr", "n_corrector_steps", "predictor")

REGISTRY: dict[str, SamplerDef] = {
  "ddpm": SamplerDef(ddpm_sampler, "sections", _NOISY),
  "ddim": SamplerDef(ddim_sampler, "ddim", ("eta", *_NOISY), ("ddpm", "flow")),
  "dpm++2m": SamplerDef(
    dpmpp_2m_sampler, "logsnr", ("clip_denoised",), ("ddpm", "flow", "edm", "vdm")
  ),
  "euler_maruyama": SamplerDef(euler_maruyama_sampler, "sections", _NOISY),
  "pc": SamplerDef(pc_sampler, "sections", _PC),
  # On a sigma grid (edm; ddpm through sigma(t)), and on a flow's grid in t.
  "euler": SamplerDef(euler_sampler, SIGMA_GRID, ("clip_denoised",), ("flow", "edm", "ddpm")),
  "heun": SamplerDef(heun_sampler, SIGMA_GRID, ("clip_denoised",), ("flow", "edm", "ddpm")),
  "edm_stochastic": SamplerDef(stochastic_sampler, SIGMA_GRID, _CHURN, ("edm", "ddpm")),
  # On a vdm grid in t, with the model's gamma.
  "vdm": SamplerDef(vdm_sampler, "sections", _NOISY, ("vdm",)),
  "vdm_ddim": SamplerDef(vdm_ddim_sampler, "sections", ("clip_denoised",), ("vdm",)),
}


class _Names(Sequence[str]):
  """The registered names in registration order: a live, read-only view of :data:`REGISTRY`."""

  def __getitem__(self, index: Any) -> Any:
    return tuple(REGISTRY)[index]

  def __len__(self) -> int:
    return len(REGISTRY)

  def __contains__(self, name: object) -> bool:
    return isinstance(name, str) and name in REGISTRY

  def __iter__(self) -> Iterator[str]:
    return iter(tuple(REGISTRY))  # a snapshot: registering while iterating is safe

  def __eq__(self, other: object) -> bool:
    return isinstance(other, tuple | list | _Names) and tuple(self) == tuple(other)

  __hash__ = None  # type: ignore[assignment]  # mutable, like the dict it views

  def __repr__(self) -> str:
    return repr(tuple(REGISTRY))


SAMPLERS: Sequence[str] = _Names()


def get_sampler(name: str) -> SamplerDef:
  """The registered sampler ``name``; the error lists the registry."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
  return REGISTRY[name]


def samplers_for(process: str) -> tuple[str, ...]:
  """The registered samplers of a noise process, in registration order."""
  return tuple(n for n, definition in REGISTRY.items() if process in definition.processes)


# The options that switch a sampler's injected noise on (it injects none at 0).
_NOISE_SWITCHES = ("eta", "s_churn")


def _noise_switches(definition: SamplerDef) -> list[str]:
  return [key for key in _NOISE_SWITCHES if key in definition.options]


def injects_noise(name: str, options: Mapping[str, Any]) -> bool:
  """Whether sampler ``name`` with ``options`` adds noise as it steps, so that ``temperature``
  (which scales that noise) changes anything: not an ODE solver (``euler``, ``heun``,
  ``dpm++2m``, ``vdm_ddim``), nor ``ddim`` at ``eta`` 0 or ``edm_stochastic`` at ``s_churn`` 0
  (a switch's absence from ``options`` means 0)."""
  definition = get_sampler(name)
  if "temperature" not in definition.options:
    return False
  return all(float(options.get(key, 0.0)) > 0 for key in _noise_switches(definition))


def check_temperature(name: str, temperature: float, options: Mapping[str, Any]) -> str | None:
  """What is wrong with ``temperature`` for sampler ``name`` with ``options``, or None: a value
  other than 1 is refused where it would change nothing (see :func:`injects_noise`)."""
  if temperature == 1.0 or injects_noise(name, options):
    return None
  switches = _noise_switches(get_sampler(name))
  why = f"with {switches[0]}=0 it adds no noise" if switches else "it adds no noise"
  noisy = [  # every sampler that takes a temperature, with the switch its noise needs
    n + "".join(f" with {key} > 0" for key in _noise_switches(d))
    for n, d in REGISTRY.items() if "temperature" in d.options
  ]  # fmt: skip
  return (
    f"temperature={temperature}: sampler {name!r} is deterministic here ({why}), so temperature,"
    f" which scales the noise a sampler adds, would change nothing; allowed: 1.0, or a sampler"
    f" that adds noise: {', '.join(noisy)}"
  )


def check_process(name: str, process: str) -> None:
  """Raises unless sampler ``name`` implements ``process`` (``ddpm``, ``flow``)."""
  if process not in get_sampler(name).processes:
    raise ValueError(
      f"sampler {name!r} does not sample the {process} process; its samplers:"
      f" {', '.join(samplers_for(process)) or 'none'}"
    )


def register_sampler(
  name: str,
  factory: Callable[..., Sampler],
  *,
  spacing: str = "sections",
  options: Sequence[str] = (),
  processes: Sequence[str] = ("ddpm",),
) -> SamplerDef:
  """Adds a sampler to :data:`REGISTRY` (and so to :data:`SAMPLERS`); names are not reused."""
  if name in REGISTRY:
    raise ValueError(f"sampler {name!r} is already registered")
  REGISTRY[name] = SamplerDef(factory, spacing, tuple(options), tuple(processes))
  return REGISTRY[name]
