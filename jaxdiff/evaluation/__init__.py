"""Evaluation: feature networks, statistics, bits/dim and sample quality.

Each evaluator is a function of a model function (or a sampler function), data and options
that *returns* a record; ``report`` writes records to files. The training loop calls the same
functions on the model it holds.

- :mod:`~jaxdiff.evaluation.featurenet`: the ``FeatureNet`` leaf interface.
- :mod:`~jaxdiff.evaluation.classifier`, :mod:`~jaxdiff.evaluation.inception`: the networks.
- :mod:`~jaxdiff.evaluation.features`: the registry, ``feature_net(kind, path, data_config)``.
- :mod:`~jaxdiff.evaluation.stats`: feature statistics, Fréchet distance, Inception score.
- :mod:`~jaxdiff.evaluation.extract`: ``compute_features`` over devices and processes.
- :mod:`~jaxdiff.evaluation.reference`: a split's statistics, cached.
- :mod:`~jaxdiff.evaluation.bpd`: ``bits_per_dim`` (ddpm's bound), ``vdm_bits_per_dim``;
  :mod:`~jaxdiff.evaluation.ode_bpd`: ``ode_bits_per_dim`` (any process, by its
  probability-flow ODE); :mod:`~jaxdiff.evaluation.quality`: ``sample_quality``;
  :mod:`~jaxdiff.evaluation.reconstruction`: an autoencoder's ``reconstruction_quality``;
  :mod:`~jaxdiff.evaluation.report`: ``write_bpd``, ``write_likelihood``, ``write_fid``,
  ``write_recon``.
"""

from jaxdiff.evaluation import classifier, inception
from jaxdiff.evaluation.bpd import bits_per_dim, vdm_bits_per_dim
from jaxdiff.evaluation.extract import compute_features
from jaxdiff.evaluation.featurenet import FeatureNet, file_digest
from jaxdiff.evaluation.features import (
  FEATURE_KINDS,
  cache_dir,
  check_kind,
  default_classifier_path,
  feature_net,
)
from jaxdiff.evaluation.ode_bpd import ode_bits_per_dim
from jaxdiff.evaluation.quality import sample_quality
from jaxdiff.evaluation.reconstruction import psnr, reconstruction_quality
from jaxdiff.evaluation.reference import reference_cache_path, reference_stats
from jaxdiff.evaluation.report import (
  json_record,
  write_bpd,
  write_fid,
  write_likelihood,
  write_recon,
)
from jaxdiff.evaluation.stats import (
  FeatureAccumulator,
  FeatureStats,
  feature_stats,
  frechet_distance,
  inception_score,
  load_stats,
  save_stats,
)

__all__ = [
  "FEATURE_KINDS",
  "FeatureAccumulator",
  "FeatureNet",
  "FeatureStats",
  "bits_per_dim",
  "cache_dir",
  "check_kind",
  "classifier",
  "compute_features",
  "default_classifier_path",
  "feature_net",
  "feature_stats",
  "file_digest",
  "frechet_distance",
  "inception",
  "inception_score",
  "json_record",
  "load_stats",
  "ode_bits_per_dim",
  "reference_cache_path",
  "reference_stats",
  "psnr",
  "reconstruction_quality",
  "sample_quality",
  "save_stats",
  "vdm_bits_per_dim",
  "write_bpd",
  "write_fid",
  "write_likelihood",
  "write_recon",
]
