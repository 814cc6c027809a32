"""Triton (Pallas GPU) kernels for one tile of the Fenwick schedule: forward merge and gradients.

Layout as in ``contract`` (queries B x H x T x K, keys/values B x G x S x K, statistics
B x H x T). Every program owns ``block_q`` queries (or ``block_k`` keys for dK/dV) of one head and
streams the other side through a ``fori_loop`` with masked loads, so partial blocks need no padding
in memory. ALiBi comes from the positions and the head index; GQA maps query head h to kv head
h // R; the dK/dV program of kv head g sums the R query heads of its group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rt_tiles.config import GpuTileConfig, gpu_config_for_tile
from pallas_kernels.rt_tiles.contract import TileSpecLike, TileState


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _check_head_dim(kd: int) -> None:
    if kd < 16 or kd & (kd - 1):
        raise ValueError(
            f"the Triton tile kernels need a power-of-two head_dim >= 16, got {kd}: "
            "use impl='tiled' or a TPU backend for this head size"
        )


def _slope(head: jax.Array, off_ref, spec: TileSpecLike, dtype: jnp.dtype) -> jax.Array:
    h = (head + off_ref[0] + 1).astype(jnp.float32)
    return jnp.exp2(-h * spec.alibi_bias_max / spec.n_heads).astype(dtype)


def _params(config: GpuTileConfig) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------- forward merge


def _merge_kernel(
    off_ref,
    qpos_ref,
    kpos_ref,
    q_ref,
    k_ref,
    v_ref,
    acc_ref,
    max_ref,
    den_ref,
    acc_out,
    max_out,
    den_out,
    *,
    spec: TileSpecLike,
    n_queries: int,
    n_keys: int,
    block_q: int,
    block_k: int,
    acc_dtype: jnp.dtype,
):
    tq, head = pl.program_id(0), pl.program_id(2)
    rows = pl.ds(tq * block_q, block_q)
    row_ok = tq * block_q + jnp.arange(block_q) < n_queries
    q = plgpu.load(q_ref.at[rows, :], mask=row_ok[:, None], other=0.0)
    acc = plgpu.load(acc_ref.at[rows, :], mask=row_ok[:, None], other=0.0)
    m = plgpu.load(max_ref.at[rows], mask=row_ok, other=0.0)
    den = plgpu.load(den_ref.at[rows], mask=row_ok, other=0.0)
    alibi = spec.position == "alibi"
    if alibi:
        slope = _slope(head, off_ref, spec, acc_dtype)
        qpos = plgpu.load(qpos_ref.at[rows], mask=row_ok, other=0).astype(acc_dtype)

    def body(i, carry):
        acc, m, den = carry
        cols = pl.ds(i * block_k, block_k)
        col_ok = i * block_k + jnp.arange(block_k) < n_keys
        k = plgpu.load(k_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
        s = plgpu.dot(q, k, trans_b=True).astype(acc_dtype)
        if alibi:
            kpos = plgpu.load(kpos_ref.at[cols], mask=col_ok, other=0).astype(acc_dtype)
            s = s - slope * (qpos[:, None] - kpos[None, :])
        s = jnp.where(col_ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        den = den * rescale + p.sum(axis=1)
        pv = plgpu.dot(p.astype(v.dtype), v).astype(acc_dtype)
        return acc * rescale[:, None] + pv, m_new, den

    acc, m, den = lax.fori_loop(0, pl.cdiv(n_keys, block_k), body, (acc, m, den))
    plgpu.store(acc_out.at[rows, :], acc, mask=row_ok[:, None])
    plgpu.store(max_out.at[rows], m, mask=row_ok)
    plgpu.store(den_out.at[rows], den, mask=row_ok)


def merge(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: TileSpecLike,
    *,
    config: GpuTileConfig | None = None,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> TileState:
    """GPU kernel for ``contract.merge_block`` (same arguments and result).

    ``config`` None picks the entry of ``config.GPU_BY_SIZE`` for this tile's size.
    """
    b, h, t, kd = q_BxHxTxK.shape
    g, s = k_BxGxSxK.shape[1], k_BxGxSxK.shape[2]
    config = gpu_config_for_tile(t, s) if config is None else config
    _check_head_dim(kd)
    r = h // g
    acc_dtype = _acc_dtype(q_BxHxTxK.dtype)
    q_spec = pl.BlockSpec((None, None, t, kd), lambda ti, bi, hi: (bi, hi, 0, 0))
    kv_spec = pl.BlockSpec((None, None, s, kd), lambda ti, bi, hi: (bi, hi // r, 0, 0))
    stat_spec = pl.BlockSpec((None, None, t), lambda ti, bi, hi: (bi, hi, 0))
    kernel = functools.partial(
        _merge_kernel,
        spec=spec,
        n_queries=t,
        n_keys=s,
        block_q=config.block_q,
        block_k=config.block_k,
        acc_dtype=acc_dtype,
    )
    acc, mx, den = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, config.block_q), b, h),
        in_specs=[
            pl.BlockSpec((1,), lambda ti, bi, hi: (0,)),
            pl.BlockSpec((t,), lambda ti, bi, hi: (0,)),
            pl.BlockSpec((s,), lambda ti, bi, hi: (0,)),
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=[q_spec, stat_spec, stat_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, t, kd), acc_dtype),
            jax.ShapeDtypeStruct((b, h, t), acc_dtype),
            jax.ShapeDtypeStruct((b, h, t), acc_dtype),
        ],
        input_output_aliases={6: 0, 7: 1, 8: 2},
        compiler_params=_params(config),
        interpret=interpret,
        name="rt_tile_merge_gpu",
    )(
        jnp.asarray(head_offset, jnp.int32).reshape(1),
        q_pos_T.astype(jnp.int32),
        k_pos_S.astype(jnp.int32),
        q_BxHxTxK,
        k_BxGxSxK,
        v_BxGxSxK,
        state[0].astype(acc_dtype),
        state[1].astype(acc_dtype),
        state[2].astype(acc_dtype),
    )
    return TileState(acc, mx, den)


# ----------------------------------------------------------------------------- backward grads


def _probs(q, k, lse, qpos, kpos, row_ok, col_ok, slope, alibi, acc_dtype):
    s = plgpu.dot(q, k, trans_b=True).astype(acc_dtype)
    if alibi:
        s = s - slope * (qpos[:, None] - kpos[None, :])
    return jnp.where(row_ok[:, None] & col_ok[None, :], jnp.exp(s - lse[:, None]), 0.0)


def _dkdv_kernel(
    off_ref,
    qpos_ref,
    kpos_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_out,
    dv_out,
    *,
    spec: TileSpecLike,
    n_queries: int,
    n_keys: int,
    block_q: int,
    block_k: int,
    acc_dtype: jnp.dtype,
):
    tk, group = pl.program_id(0), pl.program_id(2)
    cols = pl.ds(tk * block_k, block_k)
    col_ok = tk * block_k + jnp.arange(block_k) < n_keys
    k = plgpu.load(k_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
    v = plgpu.load(v_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
    alibi = spec.position == "alibi"
    kpos = plgpu.load(kpos_ref.at[cols], mask=col_ok, other=0).astype(acc_dtype)
    dk = jnp.zeros(k.shape, acc_dtype)
    dv = jnp.zeros(v.shape, acc_dtype)
    n_q_blocks = pl.cdiv(n_queries, block_q)

    def body(j, carry):
        dk, dv = carry
        rep, i = lax.div(j, n_q_blocks), lax.rem(j, n_q_blocks)
        slope = _slope(group * spec.group_size + rep, off_ref, spec, acc_dtype)
        rows = pl.ds(i * block_q, block_q)
        row_ok = i * block_q + jnp.arange(block_q) < n_queries
        q = plgpu.load(q_ref.at[rep, rows, :], mask=row_ok[:, None], other=0.0)
        do = plgpu.load(do_ref.at[rep, rows, :], mask=row_ok[:, None], other=0.0)
        lse = plgpu.load(lse_ref.at[rep, rows], mask=row_ok, other=0.0)
        delta = plgpu.load(delta_ref.at[rep, rows], mask=row_ok, other=0.0)
        qpos = plgpu.load(qpos_ref.at[rows], mask=row_ok, other=0).astype(acc_dtype)
        p = _probs(q, k, lse, qpos, kpos, row_ok, col_ok, slope, alibi, acc_dtype)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True).astype(acc_dtype)
        dp = plgpu.dot(do, v, trans_b=True).astype(acc_dtype)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(acc_dtype)
        return dk, dv

    dk, dv = lax.fori_loop(0, spec.group_size * n_q_blocks, body, (dk, dv))
    plgpu.store(dk_out.at[cols, :], dk, mask=col_ok[:, None])
    plgpu.store(dv_out.at[cols, :], dv, mask=col_ok[:, None])


def _dq_kernel(
    off_ref,
    qpos_ref,
    kpos_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_out,
    *,
    spec: TileSpecLike,
    n_queries: int,
    n_keys: int,
    block_q: int,
    block_k: int,
    acc_dtype: jnp.dtype,
):
    tq, head = pl.program_id(0), pl.program_id(2)
    rows = pl.ds(tq * block_q, block_q)
    row_ok = tq * block_q + jnp.arange(block_q) < n_queries
    q = plgpu.load(q_ref.at[rows, :], mask=row_ok[:, None], other=0.0)
    do = plgpu.load(do_ref.at[rows, :], mask=row_ok[:, None], other=0.0)
    lse = plgpu.load(lse_ref.at[rows], mask=row_ok, other=0.0)
    delta = plgpu.load(delta_ref.at[rows], mask=row_ok, other=0.0)
    qpos = plgpu.load(qpos_ref.at[rows], mask=row_ok, other=0).astype(acc_dtype)
    slope = _slope(head, off_ref, spec, acc_dtype)
    alibi = spec.position == "alibi"

    def body(i, dq):
        cols = pl.ds(i * block_k, block_k)
        col_ok = i * block_k + jnp.arange(block_k) < n_keys
        k = plgpu.load(k_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[cols, :], mask=col_ok[:, None], other=0.0)
        kpos = plgpu.load(kpos_ref.at[cols], mask=col_ok, other=0).astype(acc_dtype)
        p = _probs(q, k, lse, qpos, kpos, row_ok, col_ok, slope, alibi, acc_dtype)
        dp = plgpu.dot(do, v, trans_b=True).astype(acc_dtype)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k).astype(acc_dtype)

    dq = lax.fori_loop(0, pl.cdiv(n_keys, block_k), body, jnp.zeros(q.shape, acc_dtype))
    plgpu.store(dq_out.at[rows, :], dq, mask=row_ok[:, None])


def grads(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    g_BxHxTxK: jax.Array,
    lse_BxHxT: jax.Array,
    delta_BxHxT: jax.Array,
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: TileSpecLike,
    *,
    config: GpuTileConfig | None = None,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GPU kernels (dK/dV, then dQ) for ``contract.block_grads`` (same arguments and result).

    ``config`` None picks the entry of ``config.GPU_BY_SIZE`` for this tile's size.
    """
    b, h, t, kd = q_BxHxTxK.shape
    g, s = k_BxGxSxK.shape[1], k_BxGxSxK.shape[2]
    config = gpu_config_for_tile(t, s) if config is None else config
    _check_head_dim(kd)
    r = h // g
    acc_dtype = _acc_dtype(q_BxHxTxK.dtype)
    args = (
        jnp.asarray(head_offset, jnp.int32).reshape(1),
        q_pos_T.astype(jnp.int32),
        k_pos_S.astype(jnp.int32),
        q_BxHxTxK,
        k_BxGxSxK,
        v_BxGxSxK,
        g_BxHxTxK.astype(q_BxHxTxK.dtype),
        lse_BxHxT.astype(acc_dtype),
        delta_BxHxT.astype(acc_dtype),
    )
    static = dict(
        spec=spec,
        n_queries=t,
        n_keys=s,
        block_q=config.block_q,
        block_k=config.block_k,
        acc_dtype=acc_dtype,
    )
    pos_specs = [
        pl.BlockSpec((1,), lambda ti, bi, xi: (0,)),
        pl.BlockSpec((t,), lambda ti, bi, xi: (0,)),
        pl.BlockSpec((s,), lambda ti, bi, xi: (0,)),
    ]
    # dK, dV: one program per (batch, kv head, key block), all R query heads of the group.
    group_q = pl.BlockSpec((None, r, t, kd), lambda ti, bi, gi: (bi, gi, 0, 0))
    group_stat = pl.BlockSpec((None, r, t), lambda ti, bi, gi: (bi, gi, 0))
    kv = pl.BlockSpec((None, None, s, kd), lambda ti, bi, gi: (bi, gi, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **static),
        grid=(pl.cdiv(s, config.block_k), b, g),
        in_specs=pos_specs + [group_q, kv, kv, group_q, group_stat, group_stat],
        out_specs=[kv, kv],
        out_shape=[jax.ShapeDtypeStruct((b, g, s, kd), acc_dtype)] * 2,
        compiler_params=_params(config),
        interpret=interpret,
        name="rt_tile_dkdv_gpu",
    )(*args)
    # dQ: one program per (batch, query head, query block).
    head_q = pl.BlockSpec((None, None, t, kd), lambda ti, bi, hi: (bi, hi, 0, 0))
    head_stat = pl.BlockSpec((None, None, t), lambda ti, bi, hi: (bi, hi, 0))
    kv_of_head = pl.BlockSpec((None, None, s, kd), lambda ti, bi, hi: (bi, hi // r, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(pl.cdiv(t, config.block_q), b, h),
        in_specs=pos_specs + [head_q, kv_of_head, kv_of_head, head_q, head_stat, head_stat],
        out_specs=head_q,
        out_shape=jax.ShapeDtypeStruct((b, h, t, kd), acc_dtype),
        compiler_params=_params(config),
        interpret=interpret,
        name="rt_tile_dq_gpu",
    )(*args)
    return dq, dk, dv
