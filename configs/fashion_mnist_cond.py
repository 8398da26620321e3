"""Class-conditional Fashion-MNIST with classifier-free guidance (Ho & Salimans 2022).

The README's model with a label embedding; during training the label is dropped (replaced by
the "no class" id ``data.num_classes``) with probability ``model.class_dropout``, so one network
learns both the conditional and the unconditional score and sampling can mix them:
``jaxdiff sample --workdir runs/fmc --class_label 7 --guidance_scale 3 --out sneakers``.
"""

import os

from jaxdiff.config import from_file


def get_config():
  config = from_file(os.path.join(os.path.dirname(__file__), "fashion_mnist.py"))
  config.model.class_conditional = True
  config.model.class_dropout = 0.1
  config.data.num_classes = 10
  config.sampling.guidance_scale = 2.0  # 1.0 = the conditional model without guidance
  return config
