"""The checks every config section's validation shares: one line per bad field.

A section's checker collects every problem at once (``jaxdiff train`` reports them together,
before anything is built), each line naming the field, its value and what is allowed::

  problems = Problems("diffusion", dcfg)
  problems.need(is_int(dcfg.num_timesteps, 1), "num_timesteps", "must be an int >= 1")
  return list(problems)          # ["diffusion.num_timesteps=0: must be an int >= 1"]

No dependencies but NumPy, so every layer (the maths in ``core`` too) can use it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(x: Any, low: int | None = None) -> bool:
  """An int (Python or NumPy, not a bool), at least ``low`` when given."""
  ok = isinstance(x, int | np.integer) and not isinstance(x, bool)
  return ok and (low is None or x >= low)


def is_number(x: Any) -> bool:
  """A finite int or float (Python or NumPy), not a bool."""
  ok = isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
  return ok and math.isfinite(x)


class Problems(list):
  """The problem lines of one config section, in the order they were found.

  Args:
    section: the section's dotted name (``diffusion``, ``text.transformer``).
    fields: the section, read by key or attribute (a ConfigDict or any object with the fields).
  """

  def __init__(self, section: str, fields: Any):
    super().__init__()
    self.section, self.fields = section, fields

  def need(self, ok: bool, field: str, allowed: str) -> None:
    """Adds ``section.field=value: allowed`` unless ``ok``."""
    if not ok:
      self.append(f"{self.section}.{field}={getattr(self.fields, field)!r}: {allowed}")
