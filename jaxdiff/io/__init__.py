"""Reading and writing: orbax checkpoints (``checkpoints``), 8-bit images, grids and sample
files (``images``), files written atomically and file-name slugs (``files``).

Import the module you need (``from jaxdiff.io import images``): this package imports none of
them itself, so reading images never pulls in orbax.
"""
