"""LRT decodes on the Transformer's code path (issue 14): with a zero memory and the gates at
init, an LRT decode step is the Transformer's decode step bit for bit (same cached attention,
projections and MLP); a live memory changes it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt_jax.config import MemoryConfig, ModelConfig
from rt_jax.models import lm, lrt, standard
from rt_jax.models.kv_cache import KVCache, init_cache


@pytest.mark.parametrize("kind, layer", [("shared", -1), ("layerwise", 1)])
def test_lrt_decode_step_is_the_transformer_step_without_memory(kind, layer):
    cfg = ModelConfig(
        vocab_size=13,
        d_model=16,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        block_type="transformer",
        position="alibi",
        memory=MemoryConfig(kind=kind, layer=layer),
    )
    plain = dataclasses.replace(cfg, memory=MemoryConfig())
    params = lm.init_params(cfg, jax.random.key(0))
    base = {k: v for k, v in params.items() if k != "lrt"}
    cache = init_cache(cfg, 3, 8)
    keys = jax.random.split(jax.random.key(1), 2)
    cache = KVCache(
        jax.random.normal(keys[0], cache.k.shape),
        jax.random.normal(keys[1], cache.v.shape),
        jnp.array([0, 3, 7], jnp.int32),
        cache.memory,
    )
    tokens = jnp.array([1, 5, 12])
    step_lrt = jax.jit(lrt.decode_step, static_argnames="config")
    step_std = jax.jit(standard.decode_step, static_argnames="config")
    logits, new = step_lrt(params, cache, tokens, cfg)
    want, want_cache = step_std(base, dataclasses.replace(cache), tokens, plain)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(new.k), np.asarray(want_cache.k))
    np.testing.assert_array_equal(np.asarray(new.v), np.asarray(want_cache.v))
    assert np.all(np.linalg.norm(np.asarray(new.memory), axis=-1) > 0)  # the next memory is set
    live = KVCache(cache.k, cache.v, cache.lengths, jax.random.normal(keys[0], cache.memory.shape))
    moved, _ = step_lrt(params, live, tokens, cfg)
    assert np.max(np.abs(np.asarray(moved) - np.asarray(want))) > 1e-3
