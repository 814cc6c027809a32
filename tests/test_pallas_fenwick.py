"""In-place Fenwick-block TPU kernels (rt_tiles.fenwick_tpu) == the window path of the jnp tiles.

The reference is ``fenwick_calls`` with the jnp tile ops (a window cut per block, ``tiles.
merge_block``/``block_grads`` from the math), itself held to the leaf-pair loops in
test_pallas_blocks. Interpret mode on CPU; the compiled-HLO check is in test_pallas_copies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rt_tiles import fenwick_tpu
from pallas_kernels.rt_tiles.config import TpuTileConfig
from rt_jax.ops.block import AttentionSpec
from rt_jax.ops.fenwick_calls import block_shape, fenwick_block_grads, fenwick_block_merge
from rt_jax.ops.tiles import JNP_TILE_OPS, SoftmaxState


def _buffers(seed, n, b, h, g, leaf, kd):
    ks = jax.random.split(jax.random.key(seed), 10)
    q = jax.random.normal(ks[0], (n, b, h, leaf, kd)) / 4
    k = jax.random.normal(ks[1], (n, b, g, leaf, kd))
    v = jax.random.normal(ks[2], (n, b, g, leaf, kd))
    state = SoftmaxState(
        jax.random.normal(ks[3], (n, b, h, leaf, kd)),
        jax.random.normal(ks[4], (n, b, h, leaf)) + 3,
        jnp.exp(jax.random.normal(ks[5], (n, b, h, leaf))),
    )
    gr = jax.random.normal(ks[6], (n, b, h, leaf, kd))
    lse = jax.random.normal(ks[7], (n, b, h, leaf)) + 4
    delta = jax.random.normal(ks[8], (n, b, h, leaf))
    grads = (
        jax.random.normal(ks[9], (n, b, h, leaf, kd)),
        jnp.ones((n, b, g, leaf, kd)),
        -jnp.ones((n, b, g, leaf, kd)),
    )
    return q, k, v, state, (q, k, v, gr, lse, delta), grads


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(y))) + 1.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol * scale, rtol=0)


def _check_every_block(n, b, h, g, leaf, kd, config, position="alibi", ms=None):
    spec = AttentionSpec(n_heads=h, n_kv_heads=g, head_dim=kd, position=position)
    q, k, v, state, tensors, grads = _buffers(n + h, n, b, h, g, leaf, kd)

    @jax.jit
    def kernel(m):
        st = fenwick_tpu.fenwick_merge(q, k, v, tuple(state), m, spec, config=config,
                                       interpret=True)  # fmt: skip
        gr = fenwick_tpu.fenwick_grads(tensors, grads, m, spec, config=config, interpret=True)
        return st, gr

    @jax.jit
    def reference(m):
        st = fenwick_block_merge(JNP_TILE_OPS, spec, leaf, q, k, v, state, m)
        return tuple(st), fenwick_block_grads(JNP_TILE_OPS, spec, leaf, tensors, grads, m)

    for m in range(n + 1) if ms is None else ms:
        got, want = kernel(jnp.int32(m)), reference(jnp.int32(m))
        _close(got, want)
        if block_shape(m, n) is None:  # empty blocks leave every buffer as it was
            _close(got, (tuple(state), grads), tol=0)


def test_in_place_kernels_equal_window_path_for_every_block():
    """6 leaves (m = 4 truncated, m = 0 and m = 6 empty), GQA, ALiBi, batch 2."""
    _check_every_block(6, 2, 4, 2, 8, 16, TpuTileConfig())


@pytest.mark.parametrize(
    "n,h,g,leaf,config,position",
    [
        # keys past the resident budget: the T = 4 block runs as two calls of two key leaves
        (6, 2, 1, 64, TpuTileConfig(block_k=128, max_resident_keys=128), "alibi"),
        # 16 heads, 8 per grid step (two head groups: ALiBi slopes of the second group)
        (5, 16, 16, 8, TpuTileConfig(heads_per_step=8), "alibi"),
        (7, 4, 4, 8, TpuTileConfig(), "none"),
    ],
)
def test_in_place_kernels_chunks_head_groups_positions(n, h, g, leaf, config, position):
    _check_every_block(n, 1, h, g, leaf, 16, config, position)


def test_block_plan_is_the_schedules_block_and_heads_per_step_is_checked():
    n, leaf = 11, 32
    cap = fenwick_tpu.resident_leaves(n, leaf, TpuTileConfig())
    for m in range(n + 1):
        m_, ks, kc, tq, _, last = (int(a) for a in fenwick_tpu.block_plan(m, n, cap))
        shape = block_shape(m, n)
        assert last == n - 1
        if shape is None:
            assert tq == 0
        else:
            assert (kc, tq, ks, m_) == (shape[0], shape[1], m - shape[0], m)
    assert fenwick_tpu.largest_block(11) == 8 and fenwick_tpu.largest_block(2) == 1
    with pytest.raises(ValueError, match="heads_per_step"):
        TpuTileConfig(heads_per_step=0)
    q = jnp.zeros((4, 1, 12, 8, 16))
    spec = AttentionSpec(n_heads=12, n_kv_heads=12, head_dim=16)
    with pytest.raises(ValueError, match="heads_per_step=6"):
        fenwick_tpu.fenwick_merge(q, q, q, (q, q[..., 0], q[..., 0]), 1, spec,
                                  config=TpuTileConfig(heads_per_step=6), interpret=True)  # fmt: skip


def test_in_place_pallas_layer_equals_oracle_forward_and_backward():
    """impl="pallas" at leaf 8 (whole sublane tiles: the in-place kernels run), GQA, ALiBi."""
    from rt_jax.config import ModelConfig
    from rt_jax.models.lm import init_params, layer_function
    from rt_jax.ops.reference import recurrent_layer_reference

    cfg = ModelConfig(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, leaf_size=8, impl="pallas", interpret=True
    )
    assert fenwick_tpu.supported(cfg.leaf_size, jnp.float32)
    params = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(0))["blocks"])
    spec = cfg.attention_spec()
    x = jax.random.normal(jax.random.key(1), (1, 37, 32))
    w = jax.random.normal(jax.random.key(2), (1, 37, 32))

    def loss(layer):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(w * layer(p, x, spec)), (0, 1)))

    pallas = loss(layer_function(cfg))(params, x)
    oracle = loss(recurrent_layer_reference)(params, x)
    np.testing.assert_allclose(float(pallas[0]), float(oracle[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pallas[1]), jax.tree.leaves(oracle[1]), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)
