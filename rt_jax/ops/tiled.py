"""Tiled Recurrent Transformer layer: Fenwick schedule over leaves, memory-lean custom backward.

Forward. Positions are grouped into leaves of ``leaf_size`` positions (N is padded at the end to a
multiple of it; the layer is causal, so padding never reaches real positions). Every query starts
with an online-softmax state (float32, float64 for float64) holding its temporary self term. An
outer ``lax.scan`` runs over leaves; inside a leaf an inner scan over positions merges the query's
state with the persistent keys of the earlier positions of the same leaf, finalises att_t, runs the
residual + MLP (``post_attention``) and writes the persistent (k_t, v_t) = kv_projection(z_t) into
the leaf's buffer. After leaf i the binary-counter step at leaf granularity (m = i + 1,
T = lowbit(m)) merges key leaves [m - T, m) into query leaves [m, min(m + T, n)), one leaf x leaf
tile at a time through ``tile_ops.merge`` (``fori_loop``, no ``lax.switch``), or, when
``tile_ops.block_calls`` is set (the Pallas kernels), one call per Fenwick block
(``rt_jax.ops.fenwick_calls``).

Backward (``jax.custom_vjp``). Residuals: the layer input x, its output z and the per-query
log-sum-exp. The backward recomputes q, k_tmp, v_tmp from x and the persistent K, V from z in
parallel, the attention outputs att (leaf x leaf tiles through ``tile_ops.merge``) and the
post-attention hidden activations in one batched pass; then a reverse scan over leaves (inner
reverse scan over positions) gets dL/dz_t (upstream + the persistent-kv path), the input gradients
of the residual + MLP, g_t = dL/datt_t, and pushes g_t into the earlier keys of the same leaf; after
each leaf the mirrored tiles (``tile_ops.grads``) accumulate dK, dV of earlier key leaves and dq of
the query leaves. The temporary (diagonal) terms, the pre-attention and persistent-kv projections
and all weight gradients of the residual + MLP are batched passes at the end. No array with two
sequence-length axes exists in either direction (see docs/tiled.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    _matmul,
    alibi_slopes,
    apply_rope,
    kv_projection,
    layer_norm,
    post_attention,
    pre_attention,
)
from rt_jax.ops.fenwick_calls import fenwick_block_grads, fenwick_block_merge
from rt_jax.ops.tiles import JNP_TILE_OPS, SoftmaxState, TileOps

_REQUIRED = (
    "attn_norm",
    "w_q",
    "q_norm",
    "w_kv",
    "k_norm",
    "w_o",
    "ff_norm",
    "w_ff_in",
    "w_ff_out",
)
_INNER_UNROLL = 4


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _lowbit(m: jax.Array) -> jax.Array:
    return jnp.bitwise_and(m, -m)


# ----------------------------------------------------------------------------- layout helpers
def _to_leaves_hm(a_BxNxHx_: jax.Array, n: int, leaf: int) -> jax.Array:
    """B x N x H (x K) -> n x B x H x L (x K): leaf-major, head-major tiles."""
    b, _, h, *rest = a_BxNxHx_.shape
    a = a_BxNxHx_.reshape(b, n, leaf, h, *rest)
    return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 2, 3)


def _from_leaves_hm(a_nxBxHxL_: jax.Array) -> jax.Array:
    """n x B x H x L (x K) -> B x N x H (x K)."""
    n, b, h, leaf, *rest = a_nxBxHxL_.shape
    a = jnp.moveaxis(jnp.moveaxis(a_nxBxHxL_, 3, 2), 0, 1)
    return a.reshape(b, n * leaf, h, *rest)


def _to_leaves_pm(a_BxNx_: jax.Array, n: int, leaf: int) -> jax.Array:
    """B x N x ... -> n x L x B x ...: leaf-major, position-major (what the scans iterate over)."""
    b, _, *rest = a_BxNx_.shape
    a = a_BxNx_.reshape(b, n, leaf, *rest)
    return jnp.moveaxis(a, 0, 2)


def _from_leaves_pm(a_nxLxBx_: jax.Array) -> jax.Array:
    """n x L x B x ... -> B x N x ...."""
    n, leaf, b, *rest = a_nxLxBx_.shape
    return jnp.moveaxis(a_nxLxBx_, 2, 0).reshape(b, n * leaf, *rest)


def _hm_leaf_to_pm(a_BxHxL_: jax.Array) -> jax.Array:
    """One leaf B x H x L (x K) -> L x B x H (x K)."""
    return jnp.moveaxis(a_BxHxL_, 2, 0)


def _pm_leaf_to_hm(a_LxBxH_: jax.Array) -> jax.Array:
    """One leaf L x B x H (x K) -> B x H x L (x K)."""
    return jnp.moveaxis(a_LxBxH_, 0, 2)


# ----------------------------------------------------------------------------- per-position pieces
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
        k = apply_rope(k, pos_N, spec.rope_theta)
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
        _, rope_t = jax.vjp(lambda a: apply_rope(a, pos[None], spec.rope_theta), dk[:, None])
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


# ----------------------------------------------------------------------------- forward
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


def _forward(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> tuple[jax.Array, jax.Array]:
    """Padded forward: z (B x Np x D) and the per-query log-sum-exp (B x Np x H)."""
    b, n_pos, d = x_BxNxD.shape
    n = n_pos // leaf
    pos = jnp.arange(n_pos)
    acc_dt = _acc_dtype(x_BxNxD.dtype)
    g, r, kd = spec.n_kv_heads, spec.group_size, spec.head_dim
    q, k_tmp, v_tmp = pre_attention(params, x_BxNxD, pos, spec)
    acc0, max0, den0 = _self_state(q, k_tmp, v_tmp, spec)
    q_l = _to_leaves_hm(q, n, leaf)
    state0 = SoftmaxState(
        _to_leaves_hm(acc0, n, leaf), _to_leaves_hm(max0, n, leaf), _to_leaves_hm(den0, n, leaf)
    )
    kbuf0 = jnp.zeros((n, b, g, leaf, kd), spec.dtype)
    xs = (jnp.arange(n), _to_leaves_pm(x_BxNxD, n, leaf), _to_leaves_pm(q, n, leaf))

    def leaf_step(carry, xs_i):
        state, k_l, v_l = carry
        i, x_leaf, q_leaf = xs_i
        st_pm = tuple(_hm_leaf_to_pm(a[i]) for a in state)

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
            k_t, v_t = kv_projection(params, z_t, (i * leaf + p)[None], spec)
            k_leaf = jax.lax.dynamic_update_slice_in_dim(k_leaf, jnp.moveaxis(k_t, 1, 2), p, 2)
            v_leaf = jax.lax.dynamic_update_slice_in_dim(v_leaf, jnp.moveaxis(v_t, 1, 2), p, 2)
            return (k_leaf, v_leaf), (z_t[:, 0], new_max + jnp.log(den))

        (k_leaf, v_leaf), (z_leaf, lse_leaf) = jax.lax.scan(
            position_step,
            (kbuf0[0], kbuf0[0]),
            (jnp.arange(leaf), x_leaf, q_leaf) + st_pm,
            unroll=min(_INNER_UNROLL, leaf),
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


def _pad_positions(a_BxNx_: jax.Array, n_pos: int, value: float = 0.0) -> jax.Array:
    pad = n_pos - a_BxNx_.shape[1]
    if pad == 0:
        return a_BxNx_
    widths = [(0, 0)] * a_BxNx_.ndim
    widths[1] = (0, pad)
    return jnp.pad(a_BxNx_, widths, constant_values=value)


def _forward_padded(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> tuple[jax.Array, jax.Array]:
    n_real = x_BxNxD.shape[1]
    n_pos = -(-n_real // leaf) * leaf
    z, lse = _forward(params, _pad_positions(x_BxNxD, n_pos), spec, leaf, tile_ops)
    return z[:, :n_real], lse[:, :n_real]


# ----------------------------------------------------------------------------- causal pass
def _level_halves(a_nxBxXxL_: jax.Array, t: int, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Fenwick level t: leaves in chunks of 2t; (first halves, second halves), each C x t x B x ...

    Padded leaves (past n) hold ``fill``; they only ever sit in second halves whose first half is
    real, or in chunks that are wholly padding, so they never reach a real query.
    """
    n = a_nxBxXxL_.shape[0]
    c = -(-n // (2 * t))
    widths = [(0, c * 2 * t - n)] + [(0, 0)] * (a_nxBxXxL_.ndim - 1)
    a = jnp.pad(a_nxBxXxL_, widths, constant_values=fill)
    a = a.reshape((c, 2, t) + a.shape[1:])
    return a[:, 0], a[:, 1]


def _chunk_block(a_CxTxBxXxL_: jax.Array) -> jax.Array:
    """C x t x B x X x L (x K) -> (C B) x X x (t L) (x K): one tile row block per chunk."""
    c, t, b, x, leaf, *rest = a_CxTxBxXxL_.shape
    a = jnp.moveaxis(a_CxTxBxXxL_, 1, 3)  # C x B x X x t x L
    return a.reshape(c * b, x, t * leaf, *rest)


def _unchunk_block(a_CBxXxM_: jax.Array, c: int, t: int) -> jax.Array:
    """Inverse of ``_chunk_block``."""
    cb, x, m, *rest = a_CBxXxM_.shape
    a = a_CBxXxM_.reshape(c, cb // c, x, t, m // t, *rest)
    return jnp.moveaxis(a, 3, 1)


def _key_leaves(a_CxTxBxGxLxK: jax.Array) -> jax.Array:
    """C x t x B x G x L x K -> t x (C B) x G x L x K: the scan runs over the t key leaves."""
    c, t, b, *rest = a_CxTxBxGxLxK.shape
    return jnp.moveaxis(a_CxTxBxGxLxK, 1, 0).reshape(t, c * b, *rest)


def _levels(n: int) -> list[int]:
    """Fenwick block sizes 1, 2, 4, ... < n (leaves)."""
    return [1 << lvl for lvl in range((n - 1).bit_length())] if n > 1 else []


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


# ----------------------------------------------------------------------------- backward
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
    q_BxHxLxK: jax.Array,
    lse_BxHxL: jax.Array,
    g_BxHxLxK: jax.Array,
    delta_BxHxL: jax.Array,
    k_BxGxK: jax.Array,
    v_BxGxK: jax.Array,
    p: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array]:
    """Within-leaf (dk_p, dv_p), B x G x K, of key p pulled from the leaf's later queries t > p.

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


def _backward(
    params: Params,
    x_BxNxD: jax.Array,
    z_BxNxD: jax.Array,
    lse_BxNxH: jax.Array,
    dz_BxNxD: jax.Array,
    spec: AttentionSpec,
    leaf: int,
    tile_ops: TileOps,
) -> tuple[Params, jax.Array]:
    """Gradients (params, x) of the layer from its input, output, log-sum-exp and dL/dz."""
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

    def leaf_step(carry, xs_i):
        dk_l, dv_l, dq_l, g_l, delta_l = carry
        i, dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, k_leaf, v_leaf = xs_i
        q_leaf = q_l[i]  # B x H x L x K (compute dtype), read by every position of the leaf
        lse_leaf = lse_l[i]
        # dK, dV from later leaves (complete: their mirrored tiles ran before this leaf).
        dkc_leaf, dvc_leaf = _hm_leaf_to_pm(dk_l[i]), _hm_leaf_to_pm(dv_l[i])

        def position_step(gbuf, ys):
            g_buf, delta_buf = gbuf
            p, dz_t, z_t, kpre_t, x1_t, hid_t, att_t, k_t, v_t, dkc_t, dvc_t = ys
            dk_loc, dv_loc = _pull_kv_grads(q_leaf, lse_leaf, g_buf, delta_buf, k_t, v_t, p, spec)
            dk_t, dv_t = dkc_t + dk_loc, dvc_t + dv_loc
            dz_t = dz_t + _kv_input_grad(params, z_t, kpre_t, dk_t, dv_t, i * leaf + p, spec)
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
            g_buf = jax.lax.dynamic_update_slice_in_dim(g_buf, g_t.astype(gdt)[:, :, None], p, 2)
            delta_buf = jax.lax.dynamic_update_slice_in_dim(delta_buf, delta_t[:, :, None], p, 2)
            return (g_buf, delta_buf), (dz_t, dhid_t, dx1_t, g_t, delta_t, dk_t, dv_t)

        gbuf0 = (jnp.zeros((b, h, leaf, kd), gdt), jnp.zeros((b, h, leaf), acc_dt))
        _, outs = jax.lax.scan(
            position_step,
            gbuf0,
            (
                jnp.arange(leaf),
                dz_leaf,
                z_leaf,
                kpre_leaf,
                x1_leaf,
                hid_leaf,
                att_leaf,
                k_leaf,
                v_leaf,
                dkc_leaf,
                dvc_leaf,
            ),
            reverse=True,
            unroll=min(_INNER_UNROLL, leaf),
        )
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


# ----------------------------------------------------------------------------- public API
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tiled_layer(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> jax.Array:
    return _forward_padded(params, x_BxNxD, spec, leaf, tile_ops)[0]


def _tiled_layer_fwd(params, x_BxNxD, spec, leaf, tile_ops):
    z, lse = _forward_padded(params, x_BxNxD, spec, leaf, tile_ops)
    return z, (params, x_BxNxD, z, lse)


def _tiled_layer_bwd(spec, leaf, tile_ops, residuals, dz):
    params, x, z, lse = residuals
    return _backward(params, x, z, lse, dz, spec, leaf, tile_ops)


_tiled_layer.defvjp(_tiled_layer_fwd, _tiled_layer_bwd)


def _check_inputs(params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf_size: int) -> None:
    if not isinstance(leaf_size, int) or isinstance(leaf_size, bool) or leaf_size <= 0:
        raise ValueError(f"leaf_size must be a positive int, got {leaf_size!r}")
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if getattr(x_BxNxD, "ndim", None) != 3 or x_BxNxD.shape[1] == 0:
        raise ValueError(
            f"x must have shape (batch, seq_len >= 1, d_model), got {getattr(x_BxNxD, 'shape', None)}"
        )
    if not jnp.issubdtype(x_BxNxD.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x_BxNxD.dtype}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}: pass one layer's parameters")
    d = x_BxNxD.shape[-1]
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    expected = {"w_q": (d, q_dim), "w_kv": (d, 2 * kv_dim), "w_o": (q_dim, d)}
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {shape} for "
                f"d_model={d} and {spec}: make spec match the parameters"
            )


def recurrent_layer_tiled(
    params: Params,
    x_BxNxD: jax.Array,
    spec: AttentionSpec,
    *,
    leaf_size: int = 32,
    tile_ops: TileOps = JNP_TILE_OPS,
) -> jax.Array:
    """One Recurrent Transformer layer, Fenwick-tiled, with a memory-lean custom backward. BxNxD."""
    _check_inputs(params, x_BxNxD, spec, leaf_size)
    return _tiled_layer(dict(params), x_BxNxD, spec, leaf_size, tile_ops)
