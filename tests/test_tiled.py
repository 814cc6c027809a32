"""The tiled Recurrent Transformer layer equals the token-by-token oracle, forward and backward."""

import collections
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt_jax.ops.block import AttentionSpec, param_shapes
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.tiles import JNP_TILE_OPS, TileOps, block_grads, merge_block
from rt_jax.ops.transformer import transformer_layer

D_MODEL, MLP = 16, 32


def random_params(key, spec: AttentionSpec, dtype) -> dict:
    """Fresh random layer parameters, norm weights included (not all ones)."""
    shapes = param_shapes(D_MODEL, MLP, spec)
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True):
        if name.endswith("norm"):
            out[name] = (1.0 + 0.3 * jax.random.normal(k, shape)).astype(dtype)
        else:
            out[name] = (jax.random.normal(k, shape) / np.sqrt(shape[0])).astype(dtype)
    return out


def value_and_grads(layer, spec, params, x, cot):
    """z and d<z, cot>/d(params, x) of a layer, jitted."""

    def loss(p, xx):
        z = layer(p, xx, spec)
        return jnp.sum(z * cot), z

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def rel_err(a, b) -> float:
    """max |a - b| relative to max |b|, floored at 1e-4: at N = 1 the softmax has one entry, so the
    gradients of w_q, q_norm, k_norm are exactly 0 in the oracle and rounding noise in the tiled."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-4))


def check_against_reference(spec, batch, n, leaf, dtype, tol, seed=0, tile_ops=JNP_TILE_OPS):
    kp, kx, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = random_params(kp, spec, dtype)
    x = jax.random.normal(kx, (batch, n, D_MODEL), dtype)
    cot = jax.random.normal(kc, (batch, n, D_MODEL), dtype)  # non-trivial upstream gradient

    def tiled(p, xx, s):
        return recurrent_layer_tiled(p, xx, s, leaf_size=leaf, tile_ops=tile_ops)

    (g_ref, gx_ref), z_ref = value_and_grads(recurrent_layer_reference, spec, params, x, cot)
    (g_til, gx_til), z_til = value_and_grads(tiled, spec, params, x, cot)
    assert z_til.shape == z_ref.shape and z_til.dtype == z_ref.dtype
    assert rel_err(z_til, z_ref) < tol, ("z", rel_err(z_til, z_ref))
    assert rel_err(gx_til, gx_ref) < tol, ("dx", rel_err(gx_til, gx_ref))
    assert set(g_til) == set(g_ref)
    for name in g_ref:
        assert g_til[name].dtype == params[name].dtype
        assert rel_err(g_til[name], g_ref[name]) < tol, (name, rel_err(g_til[name], g_ref[name]))


# (batch, n, leaf, position, n_kv_heads): odd N, N < leaf, N not a multiple of the leaf, powers of
# two, several leaf sizes, MHA (4 kv heads) and GQA (2 or 1 kv heads), batch 1 and > 1.
F64_CASES = [
    (2, 13, 4, "alibi", 2),
    (1, 5, 8, "none", 4),
    (1, 37, 8, "alibi", 4),
    (2, 32, 16, "rope", 1),
    (1, 1, 4, "rope", 2),
]


@pytest.mark.parametrize("batch,n,leaf,position,n_kv", F64_CASES)
def test_tiled_matches_reference_float64(batch, n, leaf, position, n_kv):
    with jax.enable_x64(True):
        spec = AttentionSpec(4, n_kv, 4, position=position, compute_dtype="float64")
        check_against_reference(spec, batch, n, leaf, jnp.float64, tol=1e-10)


F32_TOL = 2e-5


@pytest.mark.parametrize(
    "batch,n,leaf,position,n_kv", [(2, 13, 2, "alibi", 2), (1, 23, 4, "rope", 4)]
)
def test_block_calls_match_reference_float64(batch, n, leaf, position, n_kv):
    """One tile call per Fenwick block (the Pallas path's granularity); 7 and 6 leaves (truncated)."""
    ops = dataclasses.replace(JNP_TILE_OPS, block_calls=True)
    with jax.enable_x64(True):
        spec = AttentionSpec(4, n_kv, 4, position=position, compute_dtype="float64")
        check_against_reference(spec, batch, n, leaf, jnp.float64, tol=1e-10, tile_ops=ops)


@pytest.mark.parametrize(
    "batch,n,leaf,position,n_kv",
    [(2, 21, 8, "alibi", 2), (1, 11, 1, "rope", 4), (3, 64, 16, "none", 1)],
)
def test_tiled_matches_reference_float32(batch, n, leaf, position, n_kv):
    spec = AttentionSpec(4, n_kv, 4, position=position)
    check_against_reference(spec, batch, n, leaf, jnp.float32, tol=F32_TOL, seed=1)


BF16_TOL = 5e-2


def test_bfloat16_is_finite_and_close_to_float32():
    kp, kx, kc = jax.random.split(jax.random.PRNGKey(2), 3)
    spec32 = AttentionSpec(4, 2, 4, position="alibi")
    spec16 = AttentionSpec(4, 2, 4, position="alibi", compute_dtype="bfloat16")
    params = random_params(kp, spec32, jnp.float32)
    x = jax.random.normal(kx, (2, 19, D_MODEL))
    cot = jax.random.normal(kc, x.shape)

    def tiled(p, xx, s):
        return recurrent_layer_tiled(p, xx, s, leaf_size=8)

    (g16, gx16), z16 = value_and_grads(tiled, spec16, params, x, cot)
    (g32, gx32), z32 = value_and_grads(recurrent_layer_reference, spec32, params, x, cot)
    chex.assert_tree_all_finite((g16, gx16, z16))
    assert z16.dtype == jnp.float32  # the residual stream stays float32
    assert rel_err(z16, z32) < BF16_TOL
    assert rel_err(gx16, gx32) < BF16_TOL
    for name in g32:
        assert rel_err(g16[name], g32[name]) < BF16_TOL, name


def test_padding_never_produces_nan_or_inf():
    """Huge inputs at the real positions; N far from a multiple of the leaf."""
    spec = AttentionSpec(4, 2, 4, position="alibi")
    params = random_params(jax.random.PRNGKey(3), spec, jnp.float32)
    x = 30.0 * jax.random.normal(jax.random.PRNGKey(4), (1, 17, D_MODEL))

    def loss(p, xx):
        return jnp.sum(recurrent_layer_tiled(p, xx, spec, leaf_size=16) ** 2)

    chex.assert_tree_all_finite(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))


def _counting_tile_ops(log):
    def merge(q, k, v, state, q_pos, k_pos, spec):
        jax.debug.callback(lambda a, b: log["merge"].append((int(a), int(b))), q_pos[0], k_pos[0])
        return merge_block(q, k, v, state, q_pos, k_pos, spec)

    def grads(q, k, v, g, lse, delta, q_pos, k_pos, spec):
        jax.debug.callback(lambda a, b: log["grads"].append((int(a), int(b))), q_pos[0], k_pos[0])
        return block_grads(q, k, v, g, lse, delta, q_pos, k_pos, spec)

    return TileOps(merge=merge, grads=grads, name="counting")


def test_every_cross_leaf_tile_goes_through_tile_ops_exactly_once():
    spec = AttentionSpec(4, 2, 4, position="alibi")
    leaf, n = 4, 29  # 8 leaves, the last one partial
    params = random_params(jax.random.PRNGKey(5), spec, jnp.float32)
    x = jax.random.normal(jax.random.PRNGKey(6), (1, n, D_MODEL))
    log = collections.defaultdict(list)
    ops = _counting_tile_ops(log)

    def loss(p, xx):
        return jnp.sum(recurrent_layer_tiled(p, xx, spec, leaf_size=leaf, tile_ops=ops))

    z = jax.jit(lambda p, xx: recurrent_layer_tiled(p, xx, spec, leaf_size=leaf, tile_ops=ops))(
        params, x
    )
    jax.block_until_ready(z)
    pairs = collections.Counter((q // leaf, k // leaf) for q, k in log["merge"])
    n_leaves = -(-n // leaf)
    expected = collections.Counter((j, s) for j in range(n_leaves) for s in range(j))
    assert pairs == expected  # forward: each (query leaf, earlier key leaf) tile once
    log.clear()
    jax.block_until_ready(jax.jit(jax.grad(loss))(params, x))
    merges = collections.Counter((q // leaf, k // leaf) for q, k in log["merge"])
    assert merges == expected + expected  # forward again + the attention recompute
    grads = collections.Counter((q // leaf, k // leaf) for q, k in log["grads"])
    assert grads == expected  # mirrored backward tiles
    # Same numbers as with the default tile ops.
    z_jnp = jax.jit(lambda p, xx: recurrent_layer_tiled(p, xx, spec, leaf_size=leaf))(params, x)
    np.testing.assert_array_equal(z, z_jnp)


_SHAPE = re.compile(r"\b(?:f16|bf16|f32|f64|s32|s64|pred|u32|s8|u8)\[([0-9,]*)\]")


def _max_big_axes(hlo_text: str, threshold: int) -> int:
    """Largest number of axes of size >= threshold of any array in an HLO module."""
    best = 0
    for dims in _SHAPE.findall(hlo_text):
        sizes = [int(d) for d in dims.split(",") if d]
        best = max(best, sum(s >= threshold for s in sizes))
    return best


def test_no_array_with_two_sequence_axes():
    """Compiled forward and forward+backward hold no array with two axes of sequence scale.

    With N = 400 and leaf 8 there are 50 leaves; every other axis (batch, heads, head dim, width,
    MLP width, 2 x kv width) is < 50, so an axis of size >= 50 is a sequence (or leaf-count) axis.
    """
    spec = AttentionSpec(4, 2, 4, position="alibi")
    n, leaf, threshold = 400, 8, 50
    params = random_params(jax.random.PRNGKey(7), spec, jnp.float32)
    x = jnp.zeros((2, n, D_MODEL))

    def compiled_text(layer):
        fwd = jax.jit(lambda p, xx: layer(p, xx, spec))
        bwd = jax.jit(jax.grad(lambda p, xx: jnp.sum(layer(p, xx, spec)), argnums=(0, 1)))
        return fwd.lower(params, x).compile().as_text(), bwd.lower(params, x).compile().as_text()

    def tiled(p, xx, s):
        return recurrent_layer_tiled(p, xx, s, leaf_size=leaf)

    fwd_text, bwd_text = compiled_text(tiled)
    assert _max_big_axes(fwd_text, threshold) <= 1
    assert _max_big_axes(bwd_text, threshold) <= 1
    # The detector does see the quadratic arrays of the Transformer layer (B x H x N x N).
    assert _max_big_axes(compiled_text(transformer_layer)[1], threshold) >= 2


def test_bad_inputs_raise():
    spec = AttentionSpec(4, 2, 4)
    params = random_params(jax.random.PRNGKey(0), spec, jnp.float32)
    x = jnp.zeros((1, 8, D_MODEL))
    with pytest.raises(ValueError, match="leaf_size"):
        recurrent_layer_tiled(params, x, spec, leaf_size=0)
    with pytest.raises(ValueError, match="shape"):
        recurrent_layer_tiled(params, x[0], spec)
    with pytest.raises(ValueError, match="w_q"):
        recurrent_layer_tiled(params, x, AttentionSpec(2, 2, 4))
    with pytest.raises(ValueError, match="missing"):
        recurrent_layer_tiled({"w_q": params["w_q"]}, x, spec)
    assert JNP_TILE_OPS.name == "jnp"
