"""The jnp tile operations the kernels must reproduce (see ``contract``)."""

from pallas_kernels.rt_tiles.contract import TileState, block_grads, merge_block, tile_logits

SoftmaxState = TileState  # the name the tests and rt_jax.ops.tiles use for the same state

__all__ = ["SoftmaxState", "TileState", "block_grads", "merge_block", "tile_logits"]
