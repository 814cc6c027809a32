"""The jnp tile operations the kernels must reproduce (the contract lives in rt_jax.ops.tiles)."""

from rt_jax.ops.tiles import SoftmaxState, block_grads, merge_block, tile_logits

__all__ = ["SoftmaxState", "block_grads", "merge_block", "tile_logits"]
