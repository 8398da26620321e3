"""The defaults as a config file (``--config configs/default.py``); see ``jaxdiff.config``."""

from jaxdiff.config import get_config  # noqa: F401
