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
(``rt_jax.ops.fenwick_calls``).
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
    _heads_to_lanes,
    _hm_leaf_to_pm,
    _kv_to_lanes,
    _lanes_to_heads,
    _lanes_to_kv,
    _lanes_to_scalars,
    _lowbit,
    _pad_positions,
    _pm_leaf_to_hm,
    _scalars_to_lanes,
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


def _local_merge(
    q_RxKxBG: jax.Array,
    k_LxKxBG: jax.Array,
    v_LxKxBG: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    p: jax.Array,
    neg_slopes: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One query (leaf offset p) merged with its leaf's keys s < p, lane layout (O(1) state).

    Elementwise products over full lanes reduced over a major axis: no 1 x K x L matvecs.
    """
    acc_t, max_t, den_t = state  # R x K x BG, R x BG, R x BG
    acc_dt = acc_t.dtype
    leaf = k_LxKxBG.shape[0]
    logits = jnp.sum(q_RxKxBG[:, None].astype(acc_dt) * k_LxKxBG[None].astype(acc_dt), axis=2)
    s = jnp.arange(leaf)[:, None]
    if neg_slopes is not None:
        logits = logits + neg_slopes[:, None, :] * (p - s).astype(acc_dt)
    logits = jnp.where(s < p, logits, -jnp.inf)  # R x L x BG
    new_max = jnp.maximum(max_t, logits.max(axis=1))
    rescale = jnp.exp(max_t - new_max)
    prob = jnp.exp(logits - new_max[:, None])
    pv = jnp.sum(prob[:, :, None] * v_LxKxBG[None].astype(acc_dt), axis=1)  # R x K x BG
    acc = acc_t * rescale[:, None] + pv
    den = den_t * rescale + prob.sum(axis=1)
    return acc, new_max, den


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
    neg_slopes = _neg_slopes_lanes(spec, b, acc_dt) if spec.position == "alibi" else None
    xs = (
        jnp.arange(n),
        _to_leaves_pm(x_BxNxD, n, leaf),
        _heads_to_lanes(_to_leaves_pm(q, n, leaf), g),  # n x L x R x K x BG
    )

    def leaf_step(carry, xs_i):
        state, k_l, v_l = carry
        i, x_leaf, q_leaf = xs_i
        acc_pm, max_pm, den_pm = (_hm_leaf_to_pm(a[i]) for a in state)  # L x B x H (x K)
        st_lanes = (
            _heads_to_lanes(acc_pm, g),
            _scalars_to_lanes(max_pm, g),
            _scalars_to_lanes(den_pm, g),
        )

        def position_step(kv_leaf, ys):
            # Pull: query t reads its leaf's key/value buffer (L x K x BG, compute dtype, one row
            # written per step); its own state is O(1) vectors.
            k_leaf, v_leaf = kv_leaf
            p, x_t, q_t, acc_t, max_t, den_t = ys
            acc, new_max, den = _local_merge(
                q_t, k_leaf, v_leaf, (acc_t, max_t, den_t), p, neg_slopes
            )
            att = _lanes_to_heads(acc / den[:, None], b).astype(spec.dtype)[:, None]
            z_t = post_attention(params, x_t[:, None], att, spec)
            k_t, v_t = kv_projection(params, z_t, (i * leaf + p)[None], spec)
            k_leaf = jax.lax.dynamic_update_slice_in_dim(
                k_leaf, _kv_to_lanes(k_t[:, 0])[None], p, 0
            )
            v_leaf = jax.lax.dynamic_update_slice_in_dim(
                v_leaf, _kv_to_lanes(v_t[:, 0])[None], p, 0
            )
            return (k_leaf, v_leaf), (z_t[:, 0], new_max + jnp.log(den))

        buf0 = jnp.zeros((leaf, kd, b * g), spec.dtype)
        (k_lanes, v_lanes), (z_leaf, lse_lanes) = jax.lax.scan(
            position_step,
            (buf0, buf0),
            (jnp.arange(leaf), x_leaf, q_leaf) + st_lanes,
            unroll=min(_INNER_UNROLL, leaf),
        )
        k_leaf, v_leaf = (_pm_leaf_to_hm(_lanes_to_kv(a, b)) for a in (k_lanes, v_lanes))
        lse_leaf = _lanes_to_scalars(lse_lanes, b)
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
