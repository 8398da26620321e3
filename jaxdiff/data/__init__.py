"""Data: sources, the training pipeline, and one ordered, masked reader of a whole split.

- :mod:`~jaxdiff.data.preparation`: preparing a tfds dataset as array_record (``prepare``).
- :mod:`~jaxdiff.data.sources`: random-access sources of uint8 images and labels.
- :mod:`~jaxdiff.data.pipeline`: the shuffled, checkpointable training pipeline.
- :mod:`~jaxdiff.data.split`: the reader every evaluator uses.
"""

from jaxdiff.data.pipeline import make_dataset, make_iterator
from jaxdiff.data.preparation import DatasetNotPreparedError, prepare
from jaxdiff.data.sources import (
  IMAGE_EXTENSIONS,
  ArraySource,
  BadImageError,
  ImageFolderSource,
  TfdsSource,
  dataset_info,
  make_source,
  read_records,
)
from jaxdiff.data.split import SplitReader, read_examples, split_reader

__all__ = [
  "IMAGE_EXTENSIONS",
  "ArraySource",
  "BadImageError",
  "DatasetNotPreparedError",
  "ImageFolderSource",
  "SplitReader",
  "TfdsSource",
  "dataset_info",
  "make_dataset",
  "make_iterator",
  "make_source",
  "prepare",
  "read_examples",
  "read_records",
  "split_reader",
]
