"""jaxdiff: denoising diffusion models as pure JAX functions."""

__version__ = "0.1.0"
