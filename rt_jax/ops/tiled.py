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
        slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).astype(acc_dt)
        dist = (p - s).astype(acc_dt)
        logits = logits - slopes.reshape(1, spec.n_kv_heads, spec.group_size, 1) * dist
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
    q, k_tmp, v_tmp = pre_attention(params, x_BxNxD, pos, spec)
    acc0, max0, den0 = _self_state(q, k_tmp, v_tmp, spec)
    q_l = _to_leaves_hm(q, n, leaf)
    state0 = SoftmaxState(
        _to_leaves_hm(acc0, n, leaf), _to_leaves_hm(max0, n, leaf), _to_leaves_hm(den0, n, leaf)
    )
    g, kd = spec.n_kv_heads, spec.head_dim
    kbuf0 = jnp.zeros((n, b, g, leaf, kd), spec.dtype)
    x_l = _to_leaves_pm(x_BxNxD, n, leaf)

    def leaf_step(carry, xs):
        state, k_l, v_l = carry
        i, x_leaf = xs
        q_pm = _hm_leaf_to_pm(q_l[i])
        st_pm = (
            _hm_leaf_to_pm(state.acc[i]),
            _hm_leaf_to_pm(state.max[i]),
            _hm_leaf_to_pm(state.den[i]),
        )

        def position_step(kv_leaf, ys):
            k_leaf, v_leaf = kv_leaf
            p, x_t, q_t, acc_t, max_t, den_t = ys
            logits = _local_logits(q_t, k_leaf, p, spec)
            new_max = jnp.maximum(max_t, logits.max(axis=-1))
            rescale = jnp.exp(max_t - new_max)
            prob = jnp.exp(logits - new_max[..., None]).reshape(b, g, spec.group_size, leaf)
            pv = jnp.einsum("bgrs,bgsk->bgrk", prob, v_leaf.astype(acc_dt)).reshape(acc_t.shape)
            acc = acc_t * rescale[..., None] + pv
            den = den_t * rescale + prob.reshape(den_t.shape + (leaf,)).sum(axis=-1)
            att = (acc / den[..., None]).astype(spec.dtype)[:, None]
            z_t = post_attention(params, x_t[:, None], att, spec)
            k_t, v_t = kv_projection(params, z_t, (i * leaf + p)[None], spec)
            k_leaf = jax.lax.dynamic_update_slice_in_dim(k_leaf, jnp.moveaxis(k_t, 1, 2), p, 2)
            v_leaf = jax.lax.dynamic_update_slice_in_dim(v_leaf, jnp.moveaxis(v_t, 1, 2), p, 2)
            return (k_leaf, v_leaf), (z_t[:, 0], new_max + jnp.log(den))

        (k_leaf, v_leaf), (z_leaf, lse_leaf) = jax.lax.scan(
            position_step,
            (kbuf0[0], kbuf0[0]),
            (jnp.arange(leaf), x_leaf, q_pm) + st_pm,
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

    _, (z_l, lse_l) = jax.lax.scan(leaf_step, (state0, kbuf0, kbuf0), (jnp.arange(n), x_l))
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


# ----------------------------------------------------------------------------- backward
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
    """Attention outputs n x B x H x L x K (float32/64) from the known persistent K, V."""
    n, b, h, _, kd = q_l.shape
    g, r = spec.n_kv_heads, spec.group_size
    acc0, max0, den0 = _self_state(q, k_tmp, v_tmp, spec)
    acc_dt = acc0.dtype
    # Within-leaf pairs, all leaves at once (L x L per leaf).
    q6 = q_l.reshape(n, b, g, r, leaf, kd)
    logits = jnp.einsum("nbgrtk,nbgsk->nbgrts", q6, k_l, preferred_element_type=acc_dt)
    t_idx, s_idx = jnp.arange(leaf)[:, None], jnp.arange(leaf)[None, :]
    if spec.position == "alibi":
        slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).astype(acc_dt)
        logits = logits - slopes.reshape(1, 1, g, r, 1, 1) * (t_idx - s_idx).astype(acc_dt)
    logits = jnp.where(s_idx < t_idx, logits, -jnp.inf)
    max_l = _to_leaves_hm(max0, n, leaf).reshape(n, b, g, r, leaf)
    new_max = jnp.maximum(max_l, logits.max(axis=-1))
    rescale = jnp.exp(max_l - new_max)
    prob = jnp.exp(logits - new_max[..., None])
    pv = jnp.einsum("nbgrts,nbgsk->nbgrtk", prob, v_l.astype(acc_dt))
    acc = _to_leaves_hm(acc0, n, leaf).reshape(n, b, g, r, leaf, kd) * rescale[..., None] + pv
    den = _to_leaves_hm(den0, n, leaf).reshape(n, b, g, r, leaf) * rescale + prob.sum(axis=-1)
    state = SoftmaxState(
        acc.reshape(n, b, h, leaf, kd), new_max.reshape(n, b, h, leaf), den.reshape(n, b, h, leaf)
    )

    if tile_ops.block_calls:
        # Cross-leaf pairs: the forward's Fenwick blocks, one call each.
        def per_block(m, st):
            return fenwick_block_merge(tile_ops, spec, leaf, q_l, k_l, v_l, st, m)

        state = jax.lax.fori_loop(1, n, per_block, state)
    else:
        # Cross-leaf pairs: query leaf j meets key leaves [0, j), one tile at a time.
        def per_query_leaf(j, st):
            return _merge_leaf_tiles(tile_ops, spec, leaf, q_l, k_l, v_l, st, j, j + 1, 0, j)

        state = jax.lax.fori_loop(1, n, per_query_leaf, state)
    return state.acc / state.den[..., None]


def _grad_leaf_tiles(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
    q_lo: jax.Array,
    q_hi: jax.Array,
    k_lo: jax.Array,
    k_hi: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Accumulate (dq, dK, dV) of query leaves [q_lo, q_hi) x key leaves [k_lo, k_hi), tile by tile."""
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    offs = jnp.arange(leaf)

    def per_key(s, acc):
        dq_l, dk_l, dv_l = acc
        k_pos = s * leaf + offs

        def per_query(j, inner):
            dq_l, dk, dv = inner
            dq, dk_j, dv_j = tile_ops.grads(
                q_l[j], k_l[s], v_l[s], g_l[j], lse_l[j], delta_l[j], j * leaf + offs, k_pos, spec
            )
            return dq_l.at[j].add(dq.astype(dq_l.dtype)), dk + dk_j, dv + dv_j

        dq_l, dk, dv = jax.lax.fori_loop(q_lo, q_hi, per_query, (dq_l, dk_l[s], dv_l[s]))
        return dq_l, dk_l.at[s].set(dk), dv_l.at[s].set(dv)

    return jax.lax.fori_loop(k_lo, k_hi, per_key, grads)


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

    def leaf_step(carry, xs):
        dk_l, dv_l, dq_l, g_l, delta_l = carry
        i, dz_leaf, z_leaf, kpre_leaf, x1_leaf, hid_leaf, att_leaf, q_leaf, lse_leaf = xs
        k_leaf, v_leaf = k_l[i], v_l[i]

        def position_step(dkv, ys):
            dk_leaf, dv_leaf = dkv
            p, dz_t, z_t, kpre_t, x1_t, hid_t, att_t, q_t, lse_t = ys
            dk_t = jax.lax.dynamic_index_in_dim(dk_leaf, p, 2, keepdims=False)
            dv_t = jax.lax.dynamic_index_in_dim(dv_leaf, p, 2, keepdims=False)
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
            # Same-leaf earlier keys (s < p) of this query.
            prob = jnp.exp(_local_logits(q_t, k_leaf, p, spec) - lse_t[..., None])
            prob = prob.reshape(b, g, r, leaf)
            g5 = g_t.reshape(b, g, r, kd)
            dv_leaf = dv_leaf + jnp.einsum("bgrs,bgrk->bgsk", prob, g5)
            dprob = jnp.einsum("bgrk,bgsk->bgrs", g5, v_leaf.astype(acc_dt))
            dlogit = prob * (dprob - delta_t.reshape(b, g, r)[..., None])
            q5 = q_t.reshape(b, g, r, kd).astype(acc_dt)
            dk_leaf = dk_leaf + jnp.einsum("bgrs,bgrk->bgsk", dlogit, q5)
            dq_t = jnp.einsum("bgrs,bgsk->bgrk", dlogit, k_leaf.astype(acc_dt)).reshape(b, h, kd)
            return (dk_leaf, dv_leaf), (dz_t, dhid_t, dx1_t, g_t, delta_t, dq_t)

        (dk_leaf, dv_leaf), outs = jax.lax.scan(
            position_step,
            (dk_l[i], dv_l[i]),
            (
                jnp.arange(leaf),
                dz_leaf,
                z_leaf,
                kpre_leaf,
                x1_leaf,
                hid_leaf,
                att_leaf,
                q_leaf,
                lse_leaf,
            ),
            reverse=True,
            unroll=min(_INNER_UNROLL, leaf),
        )
        dz_o, dhid_o, dx1_o, g_o, delta_o, dq_o = outs
        dk_l = dk_l.at[i].set(dk_leaf)
        dv_l = dv_l.at[i].set(dv_leaf)
        g_l = g_l.at[i].set(_pm_leaf_to_hm(g_o))
        delta_l = delta_l.at[i].set(_pm_leaf_to_hm(delta_o))
        # Mirror of forward block m = i: queries [i, i + T) push into keys [i - T, i).
        tensors = (q_l, k_l, v_l, g_l, lse_l, delta_l)
        if tile_ops.block_calls:
            dq_l, dk_l, dv_l = fenwick_block_grads(
                tile_ops, spec, leaf, tensors, (dq_l, dk_l, dv_l), i
            )
        else:
            t = _lowbit(i)
            dq_l, dk_l, dv_l = _grad_leaf_tiles(
                tile_ops,
                spec,
                leaf,
                tensors,
                (dq_l, dk_l, dv_l),
                i,
                jnp.minimum(i + t, n),
                i - t,
                i,
            )
        return (dk_l, dv_l, dq_l, g_l, delta_l), (dz_o, dhid_o, dx1_o, dq_o)

    zeros_kv = jnp.zeros((n, b, g, leaf, kd), acc_dt)
    zeros_q = jnp.zeros((n, b, h, leaf, kd), acc_dt)
    carry0 = (zeros_kv, zeros_kv, zeros_q, zeros_q, jnp.zeros((n, b, h, leaf), acc_dt))
    xs = (jnp.arange(n),) + tuple(
        _to_leaves_pm(a, n, leaf) for a in (dz_up, z, k_pre, x1, hidden_pre, att, q, lse)
    )
    (dk_l, dv_l, dq_l, g_l, delta_l), outs = jax.lax.scan(leaf_step, carry0, xs, reverse=True)
    dz_all, dhid_all, dx1_all, dq_local = (_from_leaves_pm(a) for a in outs)

    # Temporary (diagonal) terms, batched.
    g_all = _from_leaves_hm(g_l).reshape(b, n_pos, g, r, kd)
    delta = _from_leaves_hm(delta_l).reshape(b, n_pos, g, r)
    q5 = q.reshape(b, n_pos, g, r, kd)
    self_logit = jnp.einsum("bngrk,bngk->bngr", q5, k_tmp, preferred_element_type=acc_dt)
    p_self = jnp.exp(self_logit - lse.reshape(b, n_pos, g, r))
    dv_tmp = jnp.einsum("bngr,bngrk->bngk", p_self, g_all)
    dlogit_self = p_self * (jnp.einsum("bngrk,bngk->bngr", g_all, v_tmp.astype(acc_dt)) - delta)
    dk_tmp = jnp.einsum("bngr,bngrk->bngk", dlogit_self, q5.astype(acc_dt))
    dq = (
        _from_leaves_hm(dq_l)
        + dq_local
        + (dlogit_self[..., None] * k_tmp[:, :, :, None, :].astype(acc_dt)).reshape(q.shape)
    )

    d_pre, dx_pre = pre_vjp(
        (dq.astype(q.dtype), dk_tmp.astype(k_tmp.dtype), dv_tmp.astype(v_tmp.dtype))
    )
    (d_kv,) = kv_vjp(
        (_from_leaves_hm(dk_l).astype(k_all.dtype), _from_leaves_hm(dv_l).astype(v_all.dtype))
    )
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
