"""Backward of the tiled RT layer (the ``jax.custom_vjp`` rule), from x, z and the log-sum-exp.

1. Batched: q, k_tmp, v_tmp from x and the persistent K, V from z (under ``jax.vjp``); the
   attention outputs in one strictly causal pass now that K, V are known: the state seeded with
   the temporary self term, within-leaf pairs batched over leaves, every cross-leaf pair once
   through ``tile_ops.merge`` grouped by Fenwick level (``_causal_merge``); x1 and the MLP
   pre-activations.
2. Reverse scan over leaves, inner reverse scan over positions. At position p: dK_p, dV_p =
   the cross-leaf part (complete: later leaves' mirrored tiles ran before) + the within-leaf part
   *pulled* from the leaf's later queries' saved rows (q, g, lse, delta), so each position writes
   only its own row of g and delta; dL/dz_p, the residual + MLP input gradients, g_p = dL/datt_p.
   The inner scan is ``leaf_backward_positions``; with ``tile_ops.leaf_backward`` (the Pallas TPU
   ops, where its ``supports`` holds) a leaf's whole reverse loop is one kernel call instead.
   After leaf i the mirror of forward block m = i pushes query leaves [i, i + T) into the dK, dV
   of key leaves [i - T, i) through ``tile_ops.grads`` (only dK, dV are used; with block calls the
   Fenwick call's dq is kept too).
3. After the scan: dq in one causal pass (``_causal_dq``, Fenwick levels as in 1; with block
   calls the mirrored calls' dq), the within-leaf dq batched over leaves, the temporary (diagonal)
   terms, the vjps of the projections and all weight gradients of the residual + MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    _matmul,
    apply_rope,
    layer_norm,
    pre_attention,
)
from rt_jax.ops.fenwick_calls import fenwick_block_grads, fenwick_block_merge, in_place
from rt_jax.ops.tiled_forward import _INNER_UNROLL, _alibi_bias, _neg_slopes_lanes, _self_state
from rt_jax.ops.tiled_layout import (
    _acc_dtype,
    _chunk_block,
    _from_leaves_hm,
    _from_leaves_pm,
    _heads_to_lanes,
    _hm_leaf_to_pm,
    _key_leaves,
    _kv_to_lanes,
    _lanes_to_kv,
    _level_halves,
    _levels,
    _lowbit,
    _pad_positions,
    _pm_leaf_to_hm,
    _scalars_to_lanes,
    _to_leaves_hm,
    _to_leaves_pm,
    _unchunk_block,
)
from rt_jax.ops.tiles import SoftmaxState, TileOps


def _kv_pieces(
    params: Params, y_BxNxD: jax.Array, pos_N: jax.Array, spec: AttentionSpec
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """``block.kv_projection`` that also returns the pre-norm keys (float32) as an aux output."""
    dtype = spec.dtype
    b, t, _ = y_BxNxD.shape
    kv_dim = spec.n_kv_heads * spec.head_dim
    kv = _matmul(layer_norm(y_BxNxD, params["attn_norm"], spec.norm_eps), params["w_kv"], dtype)
    k_pre = kv[..., :kv_dim]
    k = layer_norm(k_pre, params["k_norm"], spec.norm_eps).astype(dtype)
    v = kv[..., kv_dim:].astype(dtype)
    k = k.reshape(b, t, spec.n_kv_heads, spec.head_dim)
    v = v.reshape(b, t, spec.n_kv_heads, spec.head_dim)
    if spec.position == "rope":
        k = apply_rope(k, pos_N, spec.rope_theta, spec.rotary_dims)
    return (k, v), k_pre


def _kv_input_grad(
    params: Params,
    z_BxD: jax.Array,
    k_pre_BxE: jax.Array,
    dk_BxGxK: jax.Array,
    dv_BxGxK: jax.Array,
    pos: jax.Array,
    spec: AttentionSpec,
) -> jax.Array:
    """dL/dz of one position through its persistent (k, v), given dk, dv (no weight grads)."""
    dtype = spec.dtype
    b = z_BxD.shape[0]
    kv_dim = spec.n_kv_heads * spec.head_dim
    dk = dk_BxGxK.astype(dtype)
    if spec.position == "rope":
        _, rope_t = jax.vjp(
            lambda a: apply_rope(a, pos[None], spec.rope_theta, spec.rotary_dims), dk[:, None]
        )
        (dk,) = rope_t(dk[:, None])
        dk = dk[:, 0]
    _, knorm_t = jax.vjp(
        lambda a: layer_norm(a, params["k_norm"], spec.norm_eps).astype(dtype), k_pre_BxE
    )
    (dk_pre,) = knorm_t(dk.reshape(b, kv_dim))
    dv = dv_BxGxK.astype(dtype).reshape(b, kv_dim).astype(dk_pre.dtype)
    _, proj_t = jax.vjp(
        lambda a: _matmul(layer_norm(a, params["attn_norm"], spec.norm_eps), params["w_kv"], dtype),
        z_BxD,
    )
    (dz,) = proj_t(jnp.concatenate([dk_pre, dv], axis=-1))
    return dz.astype(z_BxD.dtype)


def _mlp_hidden(params: Params, x1: jax.Array, spec: AttentionSpec) -> jax.Array:
    return _matmul(layer_norm(x1, params["ff_norm"], spec.norm_eps), params["w_ff_in"], spec.dtype)


def _mlp_out(params: Params, hidden_pre: jax.Array, spec: AttentionSpec, dtype) -> jax.Array:
    hidden = jax.nn.gelu(hidden_pre, approximate=False)
    return _matmul(hidden, params["w_ff_out"], spec.dtype).astype(dtype)


def _attn_out(params: Params, att_flat: jax.Array, spec: AttentionSpec, dtype) -> jax.Array:
    return _matmul(att_flat, params["w_o"], spec.dtype).astype(dtype)


def _causal_merge(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    q_l: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    state: SoftmaxState,
) -> SoftmaxState:
    """Every strictly causal cross-leaf pair merged into the query states, in one pass.

    Grouped by Fenwick level t: in chunks of 2t leaves the second half's queries meet the first
    half's keys, one key leaf at a time (t calls of ``tile_ops.merge``, each batched over every
    chunk: (C B) x H x (t L) queries against (C B) x G x L keys). Each cross-leaf pair once.
    """
    n = q_l.shape[0]
    if in_place(tile_ops, q_l):  # in-place block kernels: the forward's n - 1 calls
        return jax.lax.fori_loop(
            1,
            n,
            lambda m, st: fenwick_block_merge(tile_ops, spec, leaf, q_l, k_l, v_l, st, m),
            state,
        )
    for t in _levels(n):
        _, q_h = _level_halves(q_l, t)
        c = q_h.shape[0]
        k_h, _ = _level_halves(k_l, t)
        v_h, _ = _level_halves(v_l, t)
        halves = [_level_halves(a, t) for a in state]
        st = SoftmaxState(*(_chunk_block(h2) for _, h2 in halves))
        q_blk = _chunk_block(q_h)
        q_pos = t * leaf + jnp.arange(t * leaf)  # positions relative to the chunk's start

        def per_key_leaf(st, kv, q_blk=q_blk, q_pos=q_pos):
            s, k_s, v_s = kv
            return tile_ops.merge(
                q_blk, k_s, v_s, st, q_pos, s * leaf + jnp.arange(leaf), spec
            ), None

        st, _ = jax.lax.scan(per_key_leaf, st, (jnp.arange(t), _key_leaves(k_h), _key_leaves(v_h)))
        new = []
        for (h1, _), a in zip(halves, st, strict=True):
            full = jnp.stack([h1, _unchunk_block(a, c, t).astype(h1.dtype)], axis=1)
            new.append(full.reshape((c * 2 * t,) + h1.shape[2:])[:n])
        state = SoftmaxState(*new)
    return state


def _causal_dq(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    tensors: tuple[jax.Array, ...],
) -> jax.Array:
    """dq (n x B x H x L x K) of every strictly causal cross-leaf pair, in one pass (as above)."""
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    n = q_l.shape[0]
    dq_l = jnp.zeros(g_l.shape, delta_l.dtype)
    for t in _levels(n):
        q_blk, g_blk, delta_blk = (
            _chunk_block(_level_halves(a, t)[1]) for a in (q_l, g_l, delta_l)
        )
        lse_blk = _chunk_block(_level_halves(lse_l, t, jnp.inf)[1])
        c = -(-n // (2 * t))
        k_h, v_h = (_level_halves(a, t)[0] for a in (k_l, v_l))
        q_pos = t * leaf + jnp.arange(t * leaf)

        def per_key_leaf(dq, kv, blk=(q_blk, g_blk, lse_blk, delta_blk), q_pos=q_pos):
            s, k_s, v_s = kv
            qb, gb, lb, db = blk
            dq_s, _, _ = tile_ops.grads(
                qb, k_s, v_s, gb, lb, db, q_pos, s * leaf + jnp.arange(leaf), spec
            )
            return dq + dq_s.astype(dq.dtype), None

        dq0 = jnp.zeros(q_blk.shape, delta_l.dtype)
        dq, _ = jax.lax.scan(per_key_leaf, dq0, (jnp.arange(t), _key_leaves(k_h), _key_leaves(v_h)))
        dq_pad = jnp.stack([jnp.zeros_like(_unchunk_block(dq, c, t)), _unchunk_block(dq, c, t)], 1)
        dq_l = dq_l + dq_pad.reshape((c * 2 * t,) + dq_l.shape[1:])[:n]
    return dq_l


def _within_leaf_state(
    q_l: jax.Array, k_l: jax.Array, v_l: jax.Array, state: SoftmaxState, spec: AttentionSpec
) -> SoftmaxState:
    """Merge every leaf's own earlier keys (s < t, L x L per leaf, all leaves at once)."""
    n, b, h, leaf, kd = q_l.shape
    g, r = spec.n_kv_heads, spec.group_size
    acc_dt = state.acc.dtype
    q6 = q_l.reshape(n, b, g, r, leaf, kd)
    logits = jnp.einsum("nbgrtk,nbgsk->nbgrts", q6, k_l, preferred_element_type=acc_dt)
    t_idx, s_idx = jnp.arange(leaf)[:, None], jnp.arange(leaf)[None, :]
    if spec.position == "alibi":
        logits = logits + _alibi_bias(spec, t_idx - s_idx, acc_dt)
    logits = jnp.where(s_idx < t_idx, logits, -jnp.inf)
    max_l = state.max.reshape(n, b, g, r, leaf)
    new_max = jnp.maximum(max_l, logits.max(axis=-1))
    rescale = jnp.exp(max_l - new_max)
    prob = jnp.exp(logits - new_max[..., None])
    pv = jnp.einsum(
        "nbgrts,nbgsk->nbgrtk", prob.astype(v_l.dtype), v_l, preferred_element_type=acc_dt
    )
    acc = state.acc.reshape(n, b, g, r, leaf, kd) * rescale[..., None] + pv
    den = state.den.reshape(n, b, g, r, leaf) * rescale + prob.sum(axis=-1)
    return SoftmaxState(
        acc.reshape(n, b, h, leaf, kd), new_max.reshape(n, b, h, leaf), den.reshape(n, b, h, leaf)
    )


def _recompute_attention(
    q_l: jax.Array,
    k_tmp: jax.Array,
    v_tmp: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    q: jax.Array,
    spec: AttentionSpec,
    leaf: int,
    tile_ops: TileOps,
) -> jax.Array:
    """Attention outputs n x B x H x L x K (float32/64) from the known persistent K, V.

    One causal pass after the forward is known: the state seeded with the temporary self term,
    the within-leaf pairs batched over leaves, then every cross-leaf pair (``_causal_merge``).
    """
    n = q_l.shape[0]
    leaf = q_l.shape[3]
    state = SoftmaxState(*(_to_leaves_hm(a, n, leaf) for a in _self_state(q, k_tmp, v_tmp, spec)))
    state = _within_leaf_state(q_l, k_l, v_l, state, spec)
    state = _causal_merge(tile_ops, spec, leaf, q_l, k_l, v_l, state)
    return state.acc / state.den[..., None]


def _grad_leaf_tiles(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array | None, jax.Array, jax.Array],
    q_lo: jax.Array,
    q_hi: jax.Array,
    k_lo: jax.Array,
    k_hi: jax.Array,
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """Accumulate (dq, dK, dV) of query leaves [q_lo, q_hi) x key leaves [k_lo, k_hi), tile by tile.

    With dq = None only dK, dV are accumulated (the tiles' dq is dead code).
    """
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    offs = jnp.arange(leaf)
    with_dq = grads[0] is not None

    def per_key(s, acc):
        dq_l, dk_l, dv_l = acc
        k_pos = s * leaf + offs

        def per_query(j, inner):
            dq_l, dk, dv = inner
            dq, dk_j, dv_j = tile_ops.grads(
                q_l[j], k_l[s], v_l[s], g_l[j], lse_l[j], delta_l[j], j * leaf + offs, k_pos, spec
            )
            if with_dq:
                dq_l = dq_l.at[j].add(dq.astype(dq_l.dtype))
            return dq_l, dk + dk_j, dv + dv_j

        dq_l, dk, dv = jax.lax.fori_loop(q_lo, q_hi, per_query, (dq_l, dk_l[s], dv_l[s]))
        return dq_l, dk_l.at[s].set(dk), dv_l.at[s].set(dv)

    return jax.lax.fori_loop(k_lo, k_hi, per_key, tuple(grads))


def _pull_kv_grads(
    q_LxRxKxBG: jax.Array,
    lse_LxRxBG: jax.Array,
    g_LxRxKxBG: jax.Array,
    delta_LxRxBG: jax.Array,
    k_KxBG: jax.Array,
    v_KxBG: jax.Array,
    p: jax.Array,
    neg_slopes: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Within-leaf (dk_p, dv_p), K x BG, of key p pulled from the leaf's later queries t > p.

    With P = exp(<q_t, k_p> + bias - lse_t): dv_p = sum_t P g_t, dk_p = sum_t P (<g_t, v_p> -
    delta_t) q_t. Rows t <= p of the query-side buffers are never read (P = 0 there). Lane
    layout (``tiled_layout``): elementwise products over full lanes, reduced over major axes.
    """
    acc_dt = delta_LxRxBG.dtype
    leaf = q_LxRxKxBG.shape[0]
    q = q_LxRxKxBG.astype(acc_dt)
    g = g_LxRxKxBG.astype(acc_dt)
    logits = jnp.sum(q * k_KxBG.astype(acc_dt), axis=2)  # L x R x BG
    t = jnp.arange(leaf)[:, None, None]
    if neg_slopes is not None:
        logits = logits + neg_slopes * (t - p).astype(acc_dt)
    prob = jnp.where(t > p, jnp.exp(logits - lse_LxRxBG), 0.0)
    dprob = jnp.sum(g * v_KxBG.astype(acc_dt), axis=2)
    ds = prob * (dprob - delta_LxRxBG)
    dv = jnp.sum(prob[:, :, None] * g, axis=(0, 1))
    dk = jnp.sum(ds[:, :, None] * q, axis=(0, 1))
    return dk, dv


def _pull_kv_grads_matvec(
    q_BxHxLxK: jax.Array,
    lse_BxHxL: jax.Array,
    g_BxHxLxK: jax.Array,
    delta_BxHxL: jax.Array,
    k_BxGxK: jax.Array,
    v_BxGxK: jax.Array,
    p: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array]:
    """``_pull_kv_grads`` in the head-major layout (B x G x K), as batched matvecs (CPU path).

    With P = exp(<q_t, k_p> + bias - lse_t): dv_p = sum_t P g_t, dk_p = sum_t P (<g_t, v_p> -
    delta_t) q_t. Rows t <= p of the query-side buffers are never read (P = 0 there).
    """
    b, h, leaf, kd = q_BxHxLxK.shape
    g, r = spec.n_kv_heads, spec.group_size
    acc_dt = delta_BxHxL.dtype
    q5 = q_BxHxLxK.reshape(b, g, r, leaf, kd)
    g5 = g_BxHxLxK.reshape(b, g, r, leaf, kd)
    logits = jnp.einsum("bgrtk,bgk->bgrt", q5, k_BxGxK, preferred_element_type=acc_dt)
    t = jnp.arange(leaf)
    if spec.position == "alibi":
        logits = logits + _alibi_bias(spec, t - p, acc_dt)
    prob = jnp.where(t > p, jnp.exp(logits - lse_BxHxL.reshape(b, g, r, leaf)), 0.0)
    dprob = jnp.einsum(
        "bgrtk,bgk->bgrt", g5, v_BxGxK.astype(g5.dtype), preferred_element_type=acc_dt
    )
    ds = prob * (dprob - delta_BxHxL.reshape(b, g, r, leaf))
    dv = jnp.einsum("bgrt,bgrtk->bgk", prob.astype(g5.dtype), g5, preferred_element_type=acc_dt)
    dk = jnp.einsum("bgrt,bgrtk->bgk", ds.astype(q5.dtype), q5, preferred_element_type=acc_dt)
    return dk, dv


def _within_leaf_dq(tensors: tuple[jax.Array, ...], spec: AttentionSpec) -> jax.Array:
    """dq n x B x H x L x K of every leaf's own pairs (s < t), all leaves at once."""
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    n, b, h, leaf, kd = q_l.shape
    g, r = spec.n_kv_heads, spec.group_size
    acc_dt = delta_l.dtype
    q6 = q_l.reshape(n, b, g, r, leaf, kd)
    logits = jnp.einsum("nbgrtk,nbgsk->nbgrts", q6, k_l, preferred_element_type=acc_dt)
    t_idx, s_idx = jnp.arange(leaf)[:, None], jnp.arange(leaf)[None, :]
    if spec.position == "alibi":
        logits = logits + _alibi_bias(spec, t_idx - s_idx, acc_dt)
    lse6 = lse_l.reshape(n, b, g, r, leaf, 1)
    prob = jnp.where(s_idx < t_idx, jnp.exp(logits - lse6), 0.0)
    g6 = g_l.reshape(n, b, g, r, leaf, kd)
    dprob = jnp.einsum(
        "nbgrtk,nbgsk->nbgrts", g6, v_l.astype(g6.dtype), preferred_element_type=acc_dt
    )
    ds = prob * (dprob - delta_l.reshape(n, b, g, r, leaf, 1))
    dq = jnp.einsum("nbgrts,nbgsk->nbgrtk", ds, k_l.astype(acc_dt))
    return dq.reshape(n, b, h, leaf, kd)


def leaf_backward_positions(
    params: Params,
    spec: AttentionSpec,
    start: jax.Array,
    q_leaf: jax.Array,
    lse_leaf: jax.Array,
    ys: tuple[jax.Array, ...],
    lanes: bool = True,
) -> tuple[jax.Array, ...]:
    """One leaf's reverse position loop (the jnp reference of the backward leaf kernel).

    ``ys`` = (dz, z, k_pre, x1, hidden_pre, att, k, v, dk_cross, dv_cross), position-major
    (L x B x ...; att L x B x H x K, k, v and the cross-leaf dK/dV L x B x G x K); ``q_leaf`` and
    ``lse_leaf`` the leaf's queries and log-sum-exp in the pull's layout (lane layout
    L x R x K x BG and L x R x BG, or head-major B x H x L (x K) with ``lanes=False``); ``start``
    = i L. Returns (dz, dhidden, dx1, g, delta, dk, dv), L x B x ..., where dz includes the
    gradient through the position's own persistent (k, v) and g = dL/datt (float32/64).
    """
    leaf, b, _ = ys[0].shape
    xdt, dtype = ys[0].dtype, spec.dtype
    acc_dt = _acc_dtype(xdt)
    h, g, r, kd = spec.n_heads, spec.n_kv_heads, spec.group_size, spec.head_dim
    gdt = dtype  # g is stored in the compute dtype, like q, k, v (see ``_backward``)
    neg_slopes = _neg_slopes_lanes(spec, b, acc_dt) if spec.position == "alibi" else None

    def position_step(gbuf, ys):
        g_buf, delta_buf = gbuf
        p, dz_t, z_t, kpre_t, x1_t, hid_t, att_t, k_t, v_t, dkc_t, dvc_t = ys
        if lanes:
            dk_loc, dv_loc = _pull_kv_grads(
                q_leaf, lse_leaf, g_buf, delta_buf, k_t, v_t, p, neg_slopes
            )
            dk_loc, dv_loc = _lanes_to_kv(dk_loc, b), _lanes_to_kv(dv_loc, b)
        else:
            dk_loc, dv_loc = _pull_kv_grads_matvec(
                q_leaf, lse_leaf, g_buf, delta_buf, k_t, v_t, p, spec
            )
        dk_t, dv_t = dkc_t + dk_loc, dvc_t + dv_loc
        dz_t = dz_t + _kv_input_grad(params, z_t, kpre_t, dk_t, dv_t, start + p, spec)
        _, mlp_out_t = jax.vjp(lambda a: _mlp_out(params, a, spec, xdt), hid_t)
        (dhid_t,) = mlp_out_t(dz_t)
        _, mlp_hid_t = jax.vjp(lambda a: _mlp_hidden(params, a, spec), x1_t)
        (dx1_t,) = mlp_hid_t(dhid_t)
        dx1_t = dz_t + dx1_t
        _, attn_out_t = jax.vjp(
            lambda a: _attn_out(params, a, spec, xdt), att_t.astype(dtype).reshape(b, h * kd)
        )
        (g_t,) = attn_out_t(dx1_t)
        g_t = g_t.reshape(b, h, kd).astype(acc_dt)
        delta_t = jnp.sum(att_t * g_t, axis=-1)
        if lanes:
            g_row = _heads_to_lanes(g_t.astype(gdt), g)[None]
            g_buf = jax.lax.dynamic_update_slice_in_dim(g_buf, g_row, p, 0)
            delta_row = _scalars_to_lanes(delta_t, g)[None]
            delta_buf = jax.lax.dynamic_update_slice_in_dim(delta_buf, delta_row, p, 0)
        else:
            g_row = g_t.astype(gdt)[:, :, None]
            g_buf = jax.lax.dynamic_update_slice_in_dim(g_buf, g_row, p, 2)
            delta_buf = jax.lax.dynamic_update_slice_in_dim(delta_buf, delta_t[:, :, None], p, 2)
        return (g_buf, delta_buf), (dz_t, dhid_t, dx1_t, g_t, delta_t, dk_t, dv_t)

    if lanes:
        gbuf0 = (jnp.zeros((leaf, r, kd, b * g), gdt), jnp.zeros((leaf, r, b * g), acc_dt))
    else:
        gbuf0 = (jnp.zeros((b, h, leaf, kd), gdt), jnp.zeros((b, h, leaf), acc_dt))
    dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, k_leaf, v_leaf, *dkv_c = ys
    kv_in = tuple(_kv_to_lanes(a) if lanes else a for a in (k_leaf, v_leaf))
    _, outs = jax.lax.scan(
        position_step,
        gbuf0,
        (jnp.arange(leaf), dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, *kv_in, *dkv_c),
        reverse=True,
        unroll=min(_INNER_UNROLL, leaf),
    )
    return outs


def _backward(
    params: Params,
    x_BxNxD: jax.Array,
    z_BxNxD: jax.Array,
    lse_BxNxH: jax.Array,
    dz_BxNxD: jax.Array,
    spec: AttentionSpec,
    leaf: int,
    tile_ops: TileOps,
    lanes: bool = True,
) -> tuple[Params, jax.Array]:
    """Gradients (params, x) of the layer from its input, output, log-sum-exp and dL/dz.

    ``lanes``: the per-position pull in the lane layout (accelerators) or as head-major batched
    matvecs (``False``, faster on XLA:CPU); the same function up to float reordering.
    """
    b, n_real, _ = x_BxNxD.shape
    n = -(-n_real // leaf)
    n_pos = n * leaf
    xdt, dtype = x_BxNxD.dtype, spec.dtype
    acc_dt = _acc_dtype(xdt)
    h, g, r, kd = spec.n_heads, spec.n_kv_heads, spec.group_size, spec.head_dim
    # g = dL/datt is stored for the tiles in the compute dtype, like q, k, v (an f32 g would be
    # rounded to bf16 for the matrix unit anyway, one whole-buffer convert per leaf).
    gdt = dtype
    pos = jnp.arange(n_pos)
    x = _pad_positions(x_BxNxD, n_pos)
    z = _pad_positions(z_BxNxD, n_pos)
    dz_up = _pad_positions(dz_BxNxD.astype(xdt), n_pos)
    # Padded queries get lse = +inf: every probability they would take part in is exactly 0.
    lse = _pad_positions(lse_BxNxH.astype(acc_dt), n_pos, jnp.inf)

    (q, k_tmp, v_tmp), pre_vjp = jax.vjp(lambda p, a: pre_attention(p, a, pos, spec), params, x)
    (k_all, v_all), kv_vjp, k_pre = jax.vjp(
        lambda p: _kv_pieces(p, z, pos, spec), params, has_aux=True
    )
    q_l = _to_leaves_hm(q, n, leaf)
    k_l = _to_leaves_hm(k_all, n, leaf)
    v_l = _to_leaves_hm(v_all, n, leaf)
    lse_l = _to_leaves_hm(lse, n, leaf)
    att_l = _recompute_attention(q_l, k_tmp, v_tmp, k_l, v_l, q, spec, leaf, tile_ops)
    att = _from_leaves_hm(att_l)  # B x Np x H x K
    att_c = att.astype(dtype).reshape(b, n_pos, h * kd)
    x1 = x + _attn_out(params, att_c, spec, xdt)
    hidden_pre = _mlp_hidden(params, x1, spec)

    kernel = tile_ops.leaf_backward
    if kernel is not None and not kernel.supports(params, x, spec, leaf):
        kernel = None
    weights = kernel.prepare(params, spec, acc_dt) if kernel is not None else None
    if kernel is not None:  # the kernel's own layout: n x L x B x H (x K)
        q_side, lse_side = _to_leaves_pm(q, n, leaf), _to_leaves_pm(lse, n, leaf)
    elif lanes:
        q_side = _heads_to_lanes(_to_leaves_pm(q, n, leaf), g)  # n x L x R x K x BG
        lse_side = _scalars_to_lanes(_to_leaves_pm(lse, n, leaf), g)  # n x L x R x BG
    else:
        q_side, lse_side = q_l, lse_l  # n x B x H x L (x K)

    def leaf_step(carry, xs_i):
        dk_l, dv_l, dq_l, g_l, delta_l = carry
        i, dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, k_leaf, v_leaf = xs_i
        q_leaf = q_side[i]  # compute dtype, read by every position of the leaf
        lse_leaf = lse_side[i]
        # dK, dV from later leaves (complete: their mirrored tiles ran before this leaf).
        dkc_leaf, dvc_leaf = _hm_leaf_to_pm(dk_l[i]), _hm_leaf_to_pm(dv_l[i])
        ys = (dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, k_leaf, v_leaf)
        ys = ys + (dkc_leaf, dvc_leaf)
        if kernel is not None:  # all L positions in one kernel call (the same step, fused)
            outs = kernel(weights, q_leaf, lse_leaf, ys, i * leaf, spec)
        else:
            outs = leaf_backward_positions(params, spec, i * leaf, q_leaf, lse_leaf, ys, lanes)
        dz_o, dhid_o, dx1_o, g_o, delta_o, dk_o, dv_o = outs
        g_l = g_l.at[i].set(_pm_leaf_to_hm(g_o).astype(gdt))
        delta_l = delta_l.at[i].set(_pm_leaf_to_hm(delta_o))
        # Mirror of forward block m = i: queries [i, i + T) push into keys [i - T, i).
        tensors = (q_l, k_l, v_l, g_l, lse_l, delta_l)
        if tile_ops.block_calls:
            dq_l, dk_l, dv_l = fenwick_block_grads(
                tile_ops, spec, leaf, tensors, (dq_l, dk_l, dv_l), i
            )
        else:
            t = _lowbit(i)
            _, dk_l, dv_l = _grad_leaf_tiles(
                tile_ops,
                spec,
                leaf,
                tensors,
                (None, dk_l, dv_l),
                i,
                jnp.minimum(i + t, n),
                i - t,
                i,
            )
        return (dk_l, dv_l, dq_l, g_l, delta_l), (dz_o, dhid_o, dx1_o, dk_o, dv_o)

    zeros_kv = jnp.zeros((n, b, g, leaf, kd), acc_dt)
    dq0 = jnp.zeros((n, b, h, leaf, kd), acc_dt) if tile_ops.block_calls else None
    g0 = jnp.zeros((n, b, h, leaf, kd), gdt)
    carry0 = (zeros_kv, zeros_kv, dq0, g0, jnp.zeros((n, b, h, leaf), acc_dt))
    xs = (jnp.arange(n),) + tuple(
        _to_leaves_pm(a, n, leaf) for a in (dz_up, z, k_pre, x1, hidden_pre, att, k_all, v_all)
    )
    (_, _, dq_l, g_l, delta_l), outs = jax.lax.scan(leaf_step, carry0, xs, reverse=True)
    dz_all, dhid_all, dx1_all, dk_all, dv_all = (_from_leaves_pm(a) for a in outs)

    # dq after the reverse scan: cross-leaf pairs (one causal pass; with block calls the mirrored
    # Fenwick calls already returned it), within-leaf pairs, and the temporary (diagonal) terms.
    tensors = (q_l, k_l, v_l, g_l, lse_l, delta_l)
    if not tile_ops.block_calls:
        dq_l = _causal_dq(tile_ops, spec, leaf, tensors)
    dq_l = dq_l + _within_leaf_dq(tensors, spec)
    g_all = _from_leaves_hm(g_l).reshape(b, n_pos, g, r, kd)
    delta = _from_leaves_hm(delta_l).reshape(b, n_pos, g, r)
    q5 = q.reshape(b, n_pos, g, r, kd)
    self_logit = jnp.einsum("bngrk,bngk->bngr", q5, k_tmp, preferred_element_type=acc_dt)
    p_self = jnp.exp(self_logit - lse.reshape(b, n_pos, g, r))
    dv_tmp = jnp.einsum("bngr,bngrk->bngk", p_self, g_all)
    dlogit_self = p_self * (jnp.einsum("bngrk,bngk->bngr", g_all, v_tmp.astype(acc_dt)) - delta)
    dk_tmp = jnp.einsum("bngr,bngrk->bngk", dlogit_self, q5.astype(acc_dt))
    dq = _from_leaves_hm(dq_l) + (
        dlogit_self[..., None] * k_tmp[:, :, :, None, :].astype(acc_dt)
    ).reshape(q.shape)

    d_pre, dx_pre = pre_vjp(
        (dq.astype(q.dtype), dk_tmp.astype(k_tmp.dtype), dv_tmp.astype(v_tmp.dtype))
    )
    (d_kv,) = kv_vjp((dk_all.astype(k_all.dtype), dv_all.astype(v_all.dtype)))
    _, out_vjp = jax.vjp(lambda p: _mlp_out(p, hidden_pre, spec, xdt), params)
    (d_out,) = out_vjp(dz_all)
    _, hid_vjp = jax.vjp(lambda p: _mlp_hidden(p, x1, spec), params)
    (d_hid,) = hid_vjp(dhid_all)
    _, att_vjp = jax.vjp(lambda p: _attn_out(p, att_c, spec, xdt), params)
    (d_att,) = att_vjp(dx1_all)
    d_params = jax.tree.map(lambda *a: sum(a[1:], a[0]), d_pre, d_kv, d_out, d_hid, d_att)
    dx = (dx_pre + dx1_all)[:, :n_real]
    return d_params, dx.astype(xdt)
