"""Pallas kernels for the tiles of the Recurrent Transformer's Fenwick schedule (TPU and GPU).

``reference.py`` re-exports the jnp tile ops they must match, ``config.py`` holds the block sizes
per target, ``tpu.py`` (Mosaic) and ``gpu.py`` (Triton) the kernels, ``api.py`` the dispatch.
"""
