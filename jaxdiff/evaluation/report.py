"""Writing evaluation records: JSON, the bound's terms as CSV and a plot, a sample grid.

The evaluators return records and write nothing; these write them, each file atomically (a
reader sees the old file or the whole new one). Call them on one process only. The caller adds
its context to the record first (the file names use it): ``split``, ``step`` and ``params``
for bits/dim; ``sampler``, ``steps``, ``step`` and ``params`` for sample quality::

  record = {"metric": "bpd", "workdir": w, "step": 1300, "params": "ema", "split": "test",
            **bits_per_dim(...)}
  paths = write_bpd("runs/fm/eval", record)   # bpd_test_n1000_step1300_ema.{json,csv,png}
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from jaxdiff.io import files, images

# Entries of the evaluator records that are arrays, not JSON.
ARRAY_ENTRIES = ("terms", "per_example_bpd", "preview")


def json_record(record: dict[str, Any]) -> dict[str, Any]:
  """``record`` without its array entries: what the JSON file and a log line hold."""
  return {k: v for k, v in record.items() if k not in ARRAY_ENTRIES}


def _write_json(path: epath.Path, record: dict[str, Any]) -> None:
  with files.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(json_record(record)) + "\n")


def _write_terms_csv(path: epath.Path, terms: dict[str, np.ndarray]) -> None:
  names = list(terms)
  rows = ["t," + ",".join(names)]
  for t in range(len(terms["vb"])):
    rows.append(f"{t}," + ",".join(f"{terms[k][t]:.8g}" for k in names))
  with files.atomic_path(path) as tmp:
    tmp.write_text("\n".join(rows) + "\n")


def plot_terms(terms: dict[str, np.ndarray], record: dict[str, Any]) -> Figure:
  """The bound's terms ``L_t`` over t (log scale), with the decoder and prior marked."""
  vb, se = terms["vb"], terms["vb_stderr"]
  t = np.arange(len(vb))
  fig = Figure(figsize=(6.4, 3.6), dpi=120)
  ax = fig.subplots()
  ax.plot(t[1:], vb[1:], lw=1.2, label="KL terms $L_{t}$, t ≥ 1")
  ax.fill_between(t[1:], np.maximum(vb[1:] - 2 * se[1:], 1e-12), vb[1:] + 2 * se[1:], alpha=0.3)
  ax.scatter([0], [vb[0]], color="C3", zorder=3, label=f"decoder $L_0$ = {vb[0]:.3f}")
  ax.set_yscale("log")
  ax.set_xlabel("timestep index t")
  ax.set_ylabel("bits/dim")
  ax.set_title(
    f"bound {record['bpd']:.3f} ± {record['bpd_stderr']:.3f} "
    f"{'bits/latent dim' if record.get('metric') == 'latent_bpd' else 'bits/dim'} "
    f"(prior {record['prior_bpd']:.1e}), step {record.get('step')} {record.get('params', '')}",
    fontsize=9,
  )
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _save_figure(fig: Figure, path: epath.Path) -> None:
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")


def write_bpd(out_dir: str | os.PathLike, record: dict[str, Any]) -> list[str]:
  """Writes ``bpd_{split}_n{N}_step{S}_{params}.json`` / ``.csv`` (the per-timestep terms) /
  ``.png`` (their plot) into ``out_dir``; returns the three paths (also in the JSON's
  ``files``).

  Args:
    out_dir: the folder (created if needed), or a ``gs://`` URI.
    record: a ``bits_per_dim`` record with ``split``, ``step`` and ``params`` added.
  """
  out_dir = files.as_path(out_dir)
  stem = f"{record.get('metric', 'bpd')}_{files.slug(record['split'])}_n{record['num_examples']}"
  stem += f"_step{record['step']}_{record['params']}"
  paths = [out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "png")]
  written = [str(p) for p in paths]
  _write_json(paths[0], {**record, "files": written})
  _write_terms_csv(paths[1], record["terms"])
  _save_figure(plot_terms(record["terms"], record), paths[2])
  return written


def write_likelihood(out_dir: str | os.PathLike, record: dict[str, Any]) -> list[str]:
  """Writes a likelihood record with no per-timestep terms (``vdm_bits_per_dim``'s bound,
  ``ode_bits_per_dim``; ``split``, ``step``, ``params`` added) as
  ``{metric}_{split}_n{N}_step{S}_{params}.json`` into ``out_dir``: no CSV or plot. Returns
  ``[path]``."""
  out_dir = files.as_path(out_dir)
  stem = f"{record['metric']}_{files.slug(record['split'])}_n{record['num_examples']}"
  path = out_dir / f"{stem}_step{record['step']}_{record['params']}.json"
  _write_json(path, {**record, "files": [str(path)]})
  return [str(path)]


def write_fid(out_dir: str | os.PathLike, record: dict[str, Any]) -> list[str]:
  """Writes ``{metric}_{sampler}{steps}_n{N}_step{S}_{params}_{features}.json`` and ``.png`` (a
  grid of the record's ``preview`` samples) into ``out_dir``; returns the two paths (also in
  the JSON's ``files``).

  Args:
    out_dir: the folder (created if needed), or a ``gs://`` URI.
    record: a ``sample_quality`` record with ``sampler``, ``steps``, ``step`` and ``params``
      added, and ``metric`` ("fid" for Inception features, "fd" for others; default "fid").
  """
  return _write_with_grid(
    out_dir,
    f"{record.get('metric', 'fid')}_{record['sampler']}{record['steps']}_n{record['num_samples']}"
    f"_step{record['step']}_{record['params']}_{record['features']}",
    record,
  )


def write_recon(out_dir: str | os.PathLike, record: dict[str, Any]) -> list[str]:
  """Writes ``recon_{split}_n{N}_step{S}_{params}_{features}.json`` and ``.png`` (originals
  above their reconstructions) into ``out_dir``; returns the two paths."""
  return _write_with_grid(
    out_dir,
    f"recon_{record['split']}_n{record['num_examples']}_step{record['step']}_{record['params']}"
    f"_{record['features']}",
    record,
  )


def _write_with_grid(out_dir: str | os.PathLike, name: str, record: dict[str, Any]) -> list[str]:
  """``{name}.json`` (the record, naming both files) and ``{name}.png`` (its ``preview``)."""
  stem = files.slug(name)
  paths = [files.as_path(out_dir) / f"{stem}.{ext}" for ext in ("json", "png")]
  written = [str(p) for p in paths]
  _write_json(paths[0], {**record, "files": written})
  images.save_png(images.make_grid(record["preview"]), paths[1])
  return written
