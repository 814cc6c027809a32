"""One tile call per Fenwick block (fenwick_block_merge/grads) == the tiled scan's leaf x leaf loops."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rt_tiles.config import TpuTileConfig
from rt_jax.ops import fenwick_calls, tiled
from rt_jax.ops.block import AttentionSpec, param_shapes
from rt_jax.ops.fenwick_calls import fenwick_block_grads, fenwick_block_merge
from rt_jax.ops.pallas_tiles import pallas_tile_ops
from rt_jax.ops.tiles import JNP_TILE_OPS, SoftmaxState, TileOps, block_grads, merge_block

N_LEAVES, LEAF, B, H, G, KD = 6, 4, 2, 4, 2, 16  # 6 leaves: the block at m = 4 is truncated
SPEC = AttentionSpec(n_heads=H, n_kv_heads=G, head_dim=KD)


def _leaf_major(seed):
    ks = jax.random.split(jax.random.key(seed), 10)
    q = jax.random.normal(ks[0], (N_LEAVES, B, H, LEAF, KD)) / 4
    k = jax.random.normal(ks[1], (N_LEAVES, B, G, LEAF, KD))
    v = jax.random.normal(ks[2], (N_LEAVES, B, G, LEAF, KD))
    state = SoftmaxState(
        jax.random.normal(ks[3], (N_LEAVES, B, H, LEAF, KD)),
        jax.random.normal(ks[4], (N_LEAVES, B, H, LEAF)) + 3,
        jnp.exp(jax.random.normal(ks[5], (N_LEAVES, B, H, LEAF))),
    )
    g = jax.random.normal(ks[6], (N_LEAVES, B, H, LEAF, KD))
    lse = jax.random.normal(ks[7], (N_LEAVES, B, H, LEAF)) + 4
    delta = jax.random.normal(ks[8], (N_LEAVES, B, H, LEAF))
    return q, k, v, state, (q, k, v, g, lse, delta)


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(y))) + 1.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol * scale, rtol=0)


@jax.jit
def _leaf_merge(q, k, v, state, m):
    t = m & -m
    hi = jnp.minimum(m + t, N_LEAVES)
    return tiled._merge_leaf_tiles(JNP_TILE_OPS, SPEC, LEAF, q, k, v, state, m, hi, m - t, m)


@jax.jit
def _leaf_grads(tensors, grads, m):
    t = m & -m
    hi = jnp.minimum(m + t, N_LEAVES)
    return tiled._grad_leaf_tiles(JNP_TILE_OPS, SPEC, LEAF, tensors, grads, m, hi, m - t, m)


def test_block_merge_and_grads_equal_leaf_loops_for_every_block():
    q, k, v, state, tensors = _leaf_major(0)
    zeros = (
        jnp.zeros((N_LEAVES, B, H, LEAF, KD)),
        jnp.zeros((N_LEAVES, B, G, LEAF, KD)),
        jnp.zeros((N_LEAVES, B, G, LEAF, KD)),
    )
    merge = jax.jit(lambda st, m: fenwick_block_merge(JNP_TILE_OPS, SPEC, LEAF, q, k, v, st, m))
    grads = jax.jit(lambda gr, m: fenwick_block_grads(JNP_TILE_OPS, SPEC, LEAF, tensors, gr, m))
    st_block, st_leaf = state, state
    gr_block, gr_leaf = zeros, zeros
    for m in range(0, N_LEAVES):
        if m:
            st_leaf = _leaf_merge(q, k, v, st_leaf, m)
            gr_leaf = _leaf_grads(tensors, gr_leaf, m)
        st_block = merge(st_block, jnp.int32(m))
        gr_block = grads(gr_block, jnp.int32(m))
        _close(st_block, st_leaf)
        _close(gr_block, gr_leaf)


def test_block_calls_with_pallas_kernels():
    """The same drop-ins with the TPU kernels (interpret): the truncated block m = 4 and m = 5."""
    q, k, v, state, tensors = _leaf_major(1)
    ops = pallas_tile_ops(interpret=True, config=TpuTileConfig(block_q=128, block_k=128))
    zeros = (
        jnp.zeros((N_LEAVES, B, H, LEAF, KD)),
        jnp.zeros((N_LEAVES, B, G, LEAF, KD)),
        jnp.zeros((N_LEAVES, B, G, LEAF, KD)),
    )

    def both(m):
        st = fenwick_block_merge(ops, SPEC, LEAF, q, k, v, state, m)
        return st, fenwick_block_grads(ops, SPEC, LEAF, tensors, zeros, m)

    for m in (4, 5):
        st, gr = jax.jit(both)(jnp.int32(m))
        _close(st, _leaf_merge(q, k, v, state, m))
        _close(gr, _leaf_grads(tensors, zeros, m))


D_MODEL = 16


def tiled_test_params(spec):
    """Random layer parameters (norm weights near one)."""
    shapes = param_shapes(D_MODEL, 32, spec)
    keys = jax.random.split(jax.random.key(5), len(shapes))
    return {
        name: (1.0 + 0.3 * jax.random.normal(k, shape)) if name.endswith("norm")
        else jax.random.normal(k, shape) / np.sqrt(shape[0])
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }  # fmt: skip


def _counting_block_ops(log):
    """jnp tile ops with one call per Fenwick block that log the leaf pairs each call computes."""

    def record(kind, q_pos, k_pos):
        def put(q0, k0, tq=q_pos.shape[0] // LEAF, tk=k_pos.shape[0] // LEAF):
            q0, k0 = int(q0) // LEAF, int(k0) // LEAF
            log[kind].extend((q0 + j, k0 + s) for j in range(tq) for s in range(tk))

        jax.debug.callback(put, q_pos[0], k_pos[0])

    def merge(q, k, v, state, q_pos, k_pos, spec):
        record("merge", q_pos, k_pos)
        return merge_block(q, k, v, state, q_pos, k_pos, spec)

    def grads(q, k, v, g, lse, delta, q_pos, k_pos, spec):
        record("grads", q_pos, k_pos)
        return block_grads(q, k, v, g, lse, delta, q_pos, k_pos, spec)

    return TileOps(merge=merge, grads=grads, name="counting-blocks", block_calls=True)


def test_block_calls_compute_exactly_the_schedules_tiles():
    """Counted on the calls actually made: 11 leaves (tails truncated at m = 6, 10), no m = n call."""
    n_tok = 11 * LEAF - 2
    n = -(-n_tok // LEAF)
    assert fenwick_calls.block_shapes(n)[0] == ((1, 1), (2, 2), (4, 4), (8, 3), (2, 1))
    params = tiled_test_params(SPEC)
    x = jax.random.normal(jax.random.key(6), (1, n_tok, D_MODEL))
    log = collections.defaultdict(list)
    ops = _counting_block_ops(log)
    layer = functools.partial(tiled.recurrent_layer_tiled, spec=SPEC, leaf_size=LEAF, tile_ops=ops)
    jax.block_until_ready(jax.jit(layer)(params, x))
    needed = collections.Counter((j, s) for j in range(n) for s in range(j))
    assert collections.Counter(log["merge"]) == needed  # each needed tile once, nothing more
    assert len(log["merge"]) == n * (n - 1) // 2 == 55
    log.clear()
    jax.block_until_ready(jax.jit(jax.grad(lambda p, a: jnp.sum(layer(p, a))))(params, x))
    assert collections.Counter(log["grads"]) == needed  # mirrored backward tiles, once each
