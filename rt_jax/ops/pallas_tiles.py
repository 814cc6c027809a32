"""Tile operations backed by the Pallas kernels in ``pallas_kernels.rt_tiles``."""

from __future__ import annotations

from pallas_kernels.rt_tiles.api import tile_kernels
from pallas_kernels.rt_tiles.config import GpuTileConfig, TpuTileConfig
from rt_jax.ops.tiles import TileOps


def pallas_tile_ops(
    interpret: bool,
    backend: str | None = None,
    config: TpuTileConfig | GpuTileConfig | None = None,
    block_calls: bool = True,
) -> TileOps:
    """A ``TileOps`` whose merge/grads are the Pallas kernels (``interpret=True`` on CPU).

    ``backend`` is "tpu" (Mosaic) or "gpu" (Triton); None picks the platform's own, and the TPU
    kernels in interpret mode on CPU. ``block_calls`` makes the tiled scan call the kernels once
    per Fenwick block (key block resident on chip) rather than once per leaf pair. Raises ValueError
    when the choice cannot run here.
    """
    merge, grads, name = tile_kernels(backend, interpret=interpret, config=config)
    mode = "interpret" if interpret else "compiled"
    return TileOps(merge=merge, grads=grads, name=f"pallas-{name}-{mode}", block_calls=block_calls)
