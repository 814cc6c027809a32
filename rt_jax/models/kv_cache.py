"""The fixed-size KV cache of cached decoding: its pytree, allocation and in-place writes.

The cache holds, per cached layer, keys and values of shape B x G x S x K (G kv heads) in the
compute dtype, each row's number of filled positions, and any per-row recurrent state a family
carries between tokens (LRT's memory vector). Rows are right-padded: row b decodes at its own
position ``lengths[b]`` (see ``rt_jax.decoding``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rt_jax.config import ModelConfig
from rt_jax.models.family import get_family


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths", "memory"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys/values (L x B x G x S x K), each row's number of filled positions (B,), and
    any per-row recurrent state (B x M: LRT's memory vector, M = d_model; M = 0 otherwise).

    L is ``config.cache_layers``: the unrolled depth (a recursive core has a cache per iteration).
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    memory: jax.Array

    @property
    def size(self) -> int:
        """Positions the cache can hold (S)."""
        return self.k.shape[3]


def kv_bytes_per_token(config: ModelConfig) -> int:
    """Bytes the KV cache stores per token (all layers, keys and values, compute dtype)."""
    return config.kv_floats_per_token() * jnp.dtype(config.compute_dtype).itemsize


def init_cache(config: ModelConfig, batch: int, cache_size: int) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``cache_size`` positions."""
    shape = (config.cache_layers, batch, config.n_kv_heads, cache_size, config.head_dim)
    dtype = jnp.dtype(config.compute_dtype)
    memory_width = get_family(config).cache_state_width(config)
    return KVCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, memory_width), jnp.float32),
    )


def write_cache_entries(
    cache_LxBxGxSxK: jax.Array, new_LxBxGxK: jax.Array, pos_B: jax.Array
) -> jax.Array:
    """The cache with row b's new key (or value) of every layer written at position pos_B[b]."""
    b = pos_B.shape[0]
    # Advanced indices separated by a slice put the batch axis first: values are B x L x G x K.
    return cache_LxBxGxSxK.at[:, jnp.arange(b), :, pos_B].set(
        jnp.swapaxes(new_LxBxGxK, 0, 1).astype(cache_LxBxGxSxK.dtype), mode="promise_in_bounds"
    )


def prefilled_cache(
    config: ModelConfig,
    k_LxBxGxPxK: jax.Array,
    v_LxBxGxPxK: jax.Array,
    lengths_B: jax.Array,
    cache_size: int,
) -> KVCache:
    """A cache of ``cache_size`` positions holding the prompt's pairs in positions [0, P)."""
    cache = init_cache(config, k_LxBxGxPxK.shape[1], cache_size)
    return KVCache(
        jax.lax.dynamic_update_slice_in_dim(cache.k, k_LxBxGxPxK.astype(cache.k.dtype), 0, axis=3),
        jax.lax.dynamic_update_slice_in_dim(cache.v, v_LxBxGxPxK.astype(cache.v.dtype), 0, axis=3),
        lengths_B.astype(jnp.int32),
        cache.memory,
    )
