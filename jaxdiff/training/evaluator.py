"""Evaluation inside training: the loop scores the model it holds, without reading a checkpoint.

Every ``eval.every`` steps, with the EMA parameters:

* ``eval_bpd`` (± ``eval_bpd_stderr``): the full variational bound on the first
  ``eval.bpd_examples`` images of ``eval.split``, read once when training starts, with the
  same per-example noise each time, so successive evaluations are paired;
* ``eval_fd`` / ``eval_is``: Fréchet distance and Inception-style score of
  ``eval.fd_samples`` samples drawn as ``config.sampling`` says, against the reference
  statistics of ``eval.split`` (computed once, cached).

The same evaluator functions serve ``jaxdiff evaluate``; here they return records that
the loop logs with the step and stores with that step's checkpoint, which is how orbax keeps
the best one (``eval.best_metric``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdiff import data, evaluation, models
from jaxdiff.checks import Problems, is_int
from jaxdiff.core import process as process_lib
from jaxdiff.core.diffusion import Diffusion
from jaxdiff.io import files
from jaxdiff.sampling import sample_from_config

BEST_METRICS = ("bpd", "fd")


def best_metric_key(config: ml_collections.ConfigDict) -> str | None:
  """The logged key the best checkpoint is chosen by (lower is better), or None.

  Runs written before ``eval.best_metric`` existed have none.
  """
  metric = config.eval.get("best_metric")
  return f"eval_{metric}" if metric else None


# Each field's own rule: (ok(value), what is allowed). `jaxdiff evaluate` checks the ones its
# metric reads (field_problems); the loop checks them all, then how they combine (problems).
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
  "split": (lambda v: isinstance(v, str) and bool(v), "must name a split, e.g. 'test'"),
  "num_examples": (lambda v: is_int(v, 0), "must be an int >= 0 (0: the whole split)"),
  "num_samples": (lambda v: is_int(v, 2), "must be an int >= 2 (a covariance needs 2)"),
  "batch_size": (lambda v: is_int(v, 1), "must be an int >= 1"),
  "features": (
    lambda v: v in evaluation.FEATURE_KINDS,
    f"must be one of {', '.join(evaluation.FEATURE_KINDS)}",
  ),
  # Remote files are the storage's to vouch for: asking may be slow or need credentials.
  "features_path": (
    lambda v: not v or files.is_uri(v) or files.as_path(v).is_file(),
    "must be '' (the cached classifier) or an existing file",
  ),
  "every": (lambda v: is_int(v, 0), "must be an int >= 0 (0: no evaluation while training)"),
  "bpd_examples": (lambda v: is_int(v, 0), "must be an int >= 0 (0: no bits/dim)"),
  "ode_steps": (lambda v: is_int(v, 1), "must be an int >= 1"),
  "fd_samples": (
    lambda v: is_int(v, 0) and v != 1,
    "must be 0 (no FD) or an int >= 2: a covariance needs at least 2 samples",
  ),
  "best_metric": (
    lambda v: not v or v in BEST_METRICS,
    f"must be '' or one of {', '.join(BEST_METRICS)}",
  ),
}


def field_problems(config: ml_collections.ConfigDict, names: Iterable[str]) -> list[str]:
  """The problems of the named ``eval`` fields each on its own, one line each naming the field,
  its value and what is allowed."""
  lines = Problems("eval", config.eval)
  for name in names:
    ok, allowed = _FIELD_RULES[name]
    lines.need(ok(config.eval[name]), name, allowed)
  return list(lines)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem with the ``eval`` section, one line each naming the field, its value and what
  is allowed; empty when both ``jaxdiff evaluate`` and the loop can honour it."""
  ecfg, lines = config.eval, field_problems(config, _FIELD_RULES)
  if ecfg.every > 0 and ecfg.bpd_examples <= 0 and ecfg.fd_samples <= 0:
    lines.append(
      f"eval.every={ecfg.every} but nothing to evaluate: set eval.bpd_examples > 0 and/or"
      " eval.fd_samples >= 2"
    )
  needs = {"bpd": ecfg.bpd_examples, "fd": ecfg.fd_samples}
  if ecfg.best_metric in needs and (ecfg.every <= 0 or needs[ecfg.best_metric] <= 0):
    field = "bpd_examples" if ecfg.best_metric == "bpd" else "fd_samples"
    lines.append(f"eval.best_metric={ecfg.best_metric!r} needs eval.every > 0 and eval.{field} > 0")
  return lines


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for an ``eval`` section the loop cannot honour (see :func:`problems`)."""
  lines = problems(config)
  if lines:
    raise ValueError("; ".join(lines))


class LoopEvaluator:
  """Set up once before the first step (test images, feature net, reference statistics)."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    diffusion: Diffusion,
    mesh: Mesh,
  ):
    check(config)
    self.config, self.graphdef, self.diffusion, self.mesh = config, graphdef, diffusion, mesh
    ecfg = config.eval
    self.images = None
    if ecfg.bpd_examples > 0:
      self.images = data.read_examples(config.data, ecfg.split, ecfg.bpd_examples)
    self.feature_net = self.reference = None
    if ecfg.fd_samples > 0:
      cache = ecfg.cache_dir or None
      self.feature_net = evaluation.feature_net(
        ecfg.features, ecfg.features_path or None, config.data, cache
      )
      self.reference, _ = evaluation.reference_stats(
        self.feature_net,
        config.data,
        split=ecfg.split,
        cache_dir=evaluation.cache_dir(cache),
        batch_size=ecfg.batch_size,
        mesh=mesh,
        progress=False,
      )

  def due(self, step: int) -> bool:
    return self.config.eval.every > 0 and step % self.config.eval.every == 0

  def __call__(self, params: Any) -> dict[str, float]:
    """The evaluation record of ``params`` (keys ``eval_*``)."""
    ecfg, model_fn = self.config.eval, models.bind(self.graphdef, params)
    record: dict[str, float] = {}
    if self.images is not None:
      bpd = self._bits_per_dim(model_fn)
      record.update(eval_bpd=bpd["bpd"], eval_bpd_stderr=bpd["bpd_stderr"])
    if self.feature_net is not None:
      quality = evaluation.sample_quality(
        self._sample_fn(model_fn),
        self.feature_net,
        self.reference,
        num_samples=ecfg.fd_samples,
        seed=self.config.seed,  # the same noise at every evaluation: successive FDs are paired
        batch_size=ecfg.batch_size,
        mesh=self.mesh,
      )
      record.update(eval_fd=quality["fd"], eval_is=quality["is_mean"])
    return record

  def _bits_per_dim(self, model_fn: Any) -> dict[str, Any]:
    """The process's own bound (ddpm's T terms, VDM's), or for a process without one (flow,
    edm) the probability-flow ODE's bits/dim (``eval.ode_steps`` RK4 steps)."""
    ecfg, seed, d = self.config.eval, self.config.seed, self.diffusion
    common = dict(seed=seed, batch_size=ecfg.batch_size, mesh=self.mesh)
    if isinstance(d, process_lib.VDM):
      return evaluation.vdm_bits_per_dim(d, model_fn, self.images, **common)
    if isinstance(d, Diffusion):
      return evaluation.bits_per_dim(
        d, model_fn, self.images, clip_denoised=ecfg.clip_denoised, **common
      )
    view = process_lib.sigma_view(d, model_fn)
    return evaluation.ode_bits_per_dim(view, self.images, num_steps=ecfg.ode_steps, **common)

  def _sample_fn(self, model_fn: Any) -> Callable[[jax.Array, int], np.ndarray]:
    def sample_fn(key: jax.Array, n: int) -> np.ndarray:
      return sample_from_config(self.config, self.diffusion, model_fn, key, n, mesh=self.mesh)

    return sample_fn
