"""The tiled Recurrent Transformer layer equals the token-by-token oracle, forward and backward."""

import collections
import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt_jax.ops import tiled
from rt_jax.ops.block import AttentionSpec, param_shapes
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.tiles import JNP_TILE_OPS, SoftmaxState, TileOps, block_grads, merge_block
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


def test_tiled_partial_rotary_matches_reference_float64():
    """RoPE on half of each head's dims: the backward's key rotation (and its vjp) turns the
    same dims as the forward's (it used to rotate all of them, so the gradients were wrong)."""
    with jax.enable_x64(True):
        spec = AttentionSpec(4, 2, 4, position="rope", rotary_pct=0.5, compute_dtype="float64")
        check_against_reference(spec, 1, 6, 4, jnp.float64, tol=1e-10)


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
    """Tile ops that log every call: (first query position, first key position, rows, T, S)."""

    def record(kind, q, k, q_pos, k_pos):
        rows, t, s = q.shape[0], q.shape[2], k.shape[2]
        jax.debug.callback(
            lambda a, b: log[kind].append((int(a), int(b), rows, t, s)), q_pos[0], k_pos[0]
        )

    def merge(q, k, v, state, q_pos, k_pos, spec):
        record("merge", q, k, q_pos, k_pos)
        return merge_block(q, k, v, state, q_pos, k_pos, spec)

    def grads(q, k, v, g, lse, delta, q_pos, k_pos, spec):
        record("grads", q, k, q_pos, k_pos)
        return block_grads(q, k, v, g, lse, delta, q_pos, k_pos, spec)

    return TileOps(merge=merge, grads=grads, name="counting")


def _leaf_pairs(calls, leaf, batch):
    """Split logged calls into leaf-pair tiles (a Counter of (query leaf, key leaf)) and the rest.

    The rest are the backward's causal-pass calls, batched over chunks (rows = chunks x batch) with
    chunk-relative positions; returned as the number of leaf pairs they cover.
    """
    pairs, batched = collections.Counter(), 0
    for q0, k0, rows, t, s in calls:
        if rows == batch and t == s == leaf:
            pairs[(q0 // leaf, k0 // leaf)] += 1
        else:
            batched += (rows // batch) * (t // leaf) * (s // leaf)
    return pairs, batched


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
    n_leaves = -(-n // leaf)
    expected = collections.Counter((j, s) for j in range(n_leaves) for s in range(j))
    pairs, batched = _leaf_pairs(log["merge"], leaf, 1)
    assert pairs == expected and batched == 0  # forward: each (query leaf, earlier key leaf) once
    log.clear()
    jax.block_until_ready(jax.jit(jax.grad(loss))(params, x))
    pairs, batched = _leaf_pairs(log["merge"], leaf, 1)
    assert pairs == expected  # forward again
    assert batched == sum(expected.values())  # the attention recompute: one causal pass
    pairs, batched = _leaf_pairs(log["grads"], leaf, 1)
    assert pairs == expected  # mirrored dK, dV tiles in the reverse scan
    assert batched == sum(expected.values())  # dq: one causal pass after the scan
    # Same numbers as with the default tile ops.
    z_jnp = jax.jit(lambda p, xx: recurrent_layer_tiled(p, xx, spec, leaf_size=leaf))(params, x)
    np.testing.assert_array_equal(z, z_jnp)


@pytest.mark.parametrize("n_leaves", [1, 2, 5, 6, 8])
def test_causal_pass_equals_leaf_pair_loops(n_leaves):
    """The backward's batched causal pass covers each cross-leaf pair exactly once (float64).

    Against the leaf x leaf loops: query leaf j merges key leaves [0, j) one tile at a time; dq of
    query leaf j sums the tiles' dq over key leaves [0, j). A pair done twice or missed differs.
    """
    leaf, b, h, g, kd = 3, 2, 4, 2, 4
    spec = AttentionSpec(h, g, kd, position="alibi", compute_dtype="float64")
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.PRNGKey(9), 8)
        q = jax.random.normal(ks[0], (n_leaves, b, h, leaf, kd), jnp.float64)
        k = jax.random.normal(ks[1], (n_leaves, b, g, leaf, kd), jnp.float64)
        v = jax.random.normal(ks[2], (n_leaves, b, g, leaf, kd), jnp.float64)
        state = tiles_state(ks[3], (n_leaves, b, h, leaf, kd))
        gr = jax.random.normal(ks[4], (n_leaves, b, h, leaf, kd), jnp.float64)
        lse = jax.random.normal(ks[5], (n_leaves, b, h, leaf), jnp.float64) + 4.0
        delta = jax.random.normal(ks[6], (n_leaves, b, h, leaf), jnp.float64)
        tensors = (q, k, v, gr, lse, delta)
        got = tiled._causal_merge(JNP_TILE_OPS, spec, leaf, q, k, v, state)
        want = state
        dq_want = jnp.zeros_like(q)
        for j in range(1, n_leaves):
            want = tiled._merge_leaf_tiles(JNP_TILE_OPS, spec, leaf, q, k, v, want, j, j + 1, 0, j)
            dq_want, _, _ = tiled._grad_leaf_tiles(
                JNP_TILE_OPS,
                spec,
                leaf,
                tensors,
                (dq_want, jnp.zeros_like(k), jnp.zeros_like(k)),
                j,
                j + 1,
                0,
                j,
            )
        for a, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-12, atol=1e-12)
        dq = tiled._causal_dq(JNP_TILE_OPS, spec, leaf, tensors)
        np.testing.assert_allclose(np.asarray(dq), np.asarray(dq_want), rtol=1e-12, atol=1e-12)


def tiles_state(key, shape):
    """A random online-softmax state (acc, max, den > 0) of the given acc shape, float64."""
    ka, km, kd = jax.random.split(key, 3)
    return SoftmaxState(
        jax.random.normal(ka, shape, jnp.float64),
        jax.random.normal(km, shape[:-1], jnp.float64) + 3.0,
        jnp.exp(jax.random.normal(kd, shape[:-1], jnp.float64)),
    )


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
