"""Forward of the tiled RT layer: a leaf scan, a per-position pull step and Fenwick merges.

Every query starts with an online-softmax state (float32, float64 for float64) holding its
temporary self term. An outer ``lax.scan`` runs over leaves; inside a leaf an inner scan over
positions is the "pull" step: query t reads its leaf's persistent key/value buffer (compute dtype,
one row written per step, never converted), merges the earlier positions into its own O(1) state,
finalises att_t, runs the residual + MLP (``post_attention``) and writes (k_t, v_t) =
kv_projection(z_t) as one new row. After leaf i the binary-counter step at leaf granularity
(m = i + 1, T = lowbit(m)) merges key leaves [m - T, m) into query leaves [m, min(m + T, n)), one
leaf x leaf tile at a time through ``tile_ops.merge`` (``fori_loop``, no ``lax.switch``), or, when
``tile_ops.block_calls`` is set (the Pallas kernels), one call per Fenwick block
(``rt_jax.ops.fenwick_calls``). With ``tile_ops.leaf_forward`` (the Pallas TPU ops, where its
``supports`` holds) a leaf's whole position loop is one kernel call computing the same step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    alibi_slopes,
    kv_projection,
    post_attention,
    pre_attention,
)
from rt_jax.ops.fenwick_calls import fenwick_block_merge
from rt_jax.ops.tiled_layout import (
    _acc_dtype,
    _from_leaves_pm,
    _hm_leaf_to_pm,
    _lowbit,
    _pad_positions,
    _to_leaves_hm,
    _to_leaves_pm,
)
from rt_jax.ops.tiles import SoftmaxState, TileOps

_INNER_UNROLL = 4


def _self_state(q: jax.Array, k_tmp: jax.Array, v_tmp: jax.Array, spec: AttentionSpec):
    """Online-softmax state holding only the temporary self term: acc BxNxHxK, max/den BxNxH."""
    b, n, h, kd = q.shape
    acc_dt = _acc_dtype(q.dtype)
    qg = q.reshape(b, n, spec.n_kv_heads, spec.group_size, kd)
    self_logit = jnp.einsum("bngrk,bngk->bngr", qg, k_tmp, preferred_element_type=acc_dt)
    acc = jnp.broadcast_to(v_tmp[:, :, :, None, :], qg.shape).astype(acc_dt)
    return acc.reshape(b, n, h, kd), self_logit.reshape(b, n, h), jnp.ones((b, n, h), acc_dt)


def _alibi_bias(spec: AttentionSpec, dist: jax.Array, acc_dt) -> jax.Array:
    """-slope_h * dist as G x R x (dist's shape), float32/64."""
    slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).astype(acc_dt)
    slopes = slopes.reshape((spec.n_kv_heads, spec.group_size) + (1,) * dist.ndim)
    return -slopes * dist.astype(acc_dt)


def _neg_slopes_lanes(spec: AttentionSpec, b: int, acc_dt) -> jax.Array:
    """-slope_h as R x BG (lane layout), so the ALiBi bias of distance d is this times d."""
    slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).astype(acc_dt)
    s_RxG = slopes.reshape(spec.n_kv_heads, spec.group_size).T
    return -jnp.broadcast_to(s_RxG[:, None, :], (spec.group_size, b, spec.n_kv_heads)).reshape(
        spec.group_size, b * spec.n_kv_heads
    )


def _local_logits(
    q_BxHxK: jax.Array, k_BxGxLxK: jax.Array, p: jax.Array, spec: AttentionSpec
) -> jax.Array:
    """Logits B x H x L of one query (leaf offset p) against its leaf's keys, -inf at s >= p."""
    b, h, kd = q_BxHxK.shape
    leaf = k_BxGxLxK.shape[2]
    acc_dt = _acc_dtype(q_BxHxK.dtype)
    qg = q_BxHxK.reshape(b, spec.n_kv_heads, spec.group_size, kd)
    logits = jnp.einsum("bgrk,bgsk->bgrs", qg, k_BxGxLxK, preferred_element_type=acc_dt)
    s = jnp.arange(leaf)
    if spec.position == "alibi":
        logits = logits + _alibi_bias(spec, p - s, acc_dt)
    logits = jnp.where(s < p, logits, -jnp.inf)
    return logits.reshape(b, h, leaf)


def _merge_leaf_tiles(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    q_l: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    state: SoftmaxState,
    q_lo: jax.Array,
    q_hi: jax.Array,
    k_lo: jax.Array,
    k_hi: jax.Array,
) -> SoftmaxState:
    """Merge key leaves [k_lo, k_hi) into the states of query leaves [q_lo, q_hi), tile by tile."""
    offs = jnp.arange(leaf)

    def per_query(j, st):
        tile = SoftmaxState(st.acc[j], st.max[j], st.den[j])
        q_pos = j * leaf + offs

        def per_key(s, tl):
            return tile_ops.merge(q_l[j], k_l[s], v_l[s], tl, q_pos, s * leaf + offs, spec)

        tile = jax.lax.fori_loop(k_lo, k_hi, per_key, tile)
        return SoftmaxState(
            st.acc.at[j].set(tile.acc), st.max.at[j].set(tile.max), st.den.at[j].set(tile.den)
        )

    return jax.lax.fori_loop(q_lo, q_hi, per_query, state)


def leaf_positions(
    params: Params,
    spec: AttentionSpec,
    start: jax.Array,
    x_LxBxD: jax.Array,
    q_LxBxHxK: jax.Array,
    state_pm: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One leaf's pull steps (the jnp reference of the leaf kernel): z L x B x D, lse L x B x H
    and the leaf's keys/values B x G x L x K, from its inputs and position-major state
    (acc L x B x H x K, max/den L x B x H, earlier leaves merged); ``start`` = i L."""
    leaf, b, _ = x_LxBxD.shape
    g, r, kd = spec.n_kv_heads, spec.group_size, spec.head_dim
    acc_dt = state_pm[0].dtype
    kbuf0 = jnp.zeros((b, g, leaf, kd), spec.dtype)

    def position_step(kv_leaf, ys):
        # Pull: query t reads its leaf's key/value buffer (compute dtype, one row written
        # per step); its own state is O(1) vectors.
        k_leaf, v_leaf = kv_leaf
        p, x_t, q_t, acc_t, max_t, den_t = ys
        logits = _local_logits(q_t, k_leaf, p, spec)
        new_max = jnp.maximum(max_t, logits.max(axis=-1))
        rescale = jnp.exp(max_t - new_max)
        prob = jnp.exp(logits - new_max[..., None])
        pv = jnp.einsum(
            "bgrs,bgsk->bgrk",
            prob.reshape(b, g, r, leaf).astype(v_leaf.dtype),
            v_leaf,
            preferred_element_type=acc_dt,
        )
        acc = acc_t * rescale[..., None] + pv.reshape(acc_t.shape)
        den = den_t * rescale + prob.sum(axis=-1)
        att = (acc / den[..., None]).astype(spec.dtype)[:, None]
        z_t = post_attention(params, x_t[:, None], att, spec)
        k_t, v_t = kv_projection(params, z_t, (start + p)[None], spec)
        k_leaf = jax.lax.dynamic_update_slice_in_dim(k_leaf, jnp.moveaxis(k_t, 1, 2), p, 2)
        v_leaf = jax.lax.dynamic_update_slice_in_dim(v_leaf, jnp.moveaxis(v_t, 1, 2), p, 2)
        return (k_leaf, v_leaf), (z_t[:, 0], new_max + jnp.log(den))

    (k_leaf, v_leaf), (z_leaf, lse_leaf) = jax.lax.scan(
        position_step,
        (kbuf0, kbuf0),
        (jnp.arange(leaf), x_LxBxD, q_LxBxHxK) + tuple(state_pm),
        unroll=min(_INNER_UNROLL, leaf),
    )
    return z_leaf, lse_leaf, k_leaf, v_leaf


def _forward(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> tuple[jax.Array, jax.Array]:
    """Padded forward: z (B x Np x D) and the per-query log-sum-exp (B x Np x H)."""
    b, n_pos, d = x_BxNxD.shape
    n = n_pos // leaf
    pos = jnp.arange(n_pos)
    acc_dt = _acc_dtype(x_BxNxD.dtype)
    g, kd = spec.n_kv_heads, spec.head_dim
    q, k_tmp, v_tmp = pre_attention(params, x_BxNxD, pos, spec)
    acc0, max0, den0 = _self_state(q, k_tmp, v_tmp, spec)
    q_l = _to_leaves_hm(q, n, leaf)
    state0 = SoftmaxState(
        _to_leaves_hm(acc0, n, leaf), _to_leaves_hm(max0, n, leaf), _to_leaves_hm(den0, n, leaf)
    )
    kbuf0 = jnp.zeros((n, b, g, leaf, kd), spec.dtype)
    xs = (jnp.arange(n), _to_leaves_pm(x_BxNxD, n, leaf), _to_leaves_pm(q, n, leaf))
    kernel = tile_ops.leaf_forward
    if kernel is not None and not kernel.supports(params, x_BxNxD, spec, leaf):
        kernel = None
    weights = kernel.prepare(params, spec, acc_dt) if kernel is not None else None

    def leaf_step(carry, xs_i):
        state, k_l, v_l = carry
        i, x_leaf, q_leaf = xs_i
        st_pm = tuple(_hm_leaf_to_pm(a[i]) for a in state)
        if kernel is not None:  # all L positions in one kernel call (the same step, fused)
            z_leaf, lse_leaf, k_leaf, v_leaf = kernel(
                weights, x_leaf, q_leaf, st_pm, i * leaf, spec
            )
        else:
            z_leaf, lse_leaf, k_leaf, v_leaf = leaf_positions(
                params, spec, i * leaf, x_leaf, q_leaf, st_pm
            )
        k_l = k_l.at[i].set(k_leaf)
        v_l = v_l.at[i].set(v_leaf)
        m = i + 1
        if tile_ops.block_calls:
            state = fenwick_block_merge(tile_ops, spec, leaf, q_l, k_l, v_l, state, m)
        else:
            t = _lowbit(m)
            state = _merge_leaf_tiles(
                tile_ops, spec, leaf, q_l, k_l, v_l, state, m, jnp.minimum(m + t, n), m - t, m
            )
        return (state, k_l, v_l), (z_leaf, lse_leaf)

    _, (z_l, lse_l) = jax.lax.scan(leaf_step, (state0, kbuf0, kbuf0), xs)
    return _from_leaves_pm(z_l), _from_leaves_pm(lse_l)


def _forward_padded(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> tuple[jax.Array, jax.Array]:
    n_real = x_BxNxD.shape[1]
    n_pos = -(-n_real // leaf) * leaf
    z, lse = _forward(params, _pad_positions(x_BxNxD, n_pos), spec, leaf, tile_ops)
    return z[:, :n_real], lse[:, :n_real]
