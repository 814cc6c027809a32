"""Mosaic TPU kernels for one tile of the Fenwick schedule: forward merge and backward gradients.

Layout (head-major, as in ``contract``): queries B x H x T x K, keys/values B x G x S x K.
Per-query statistics (running max, denominator, lse, delta) travel lane-major as B x H x 1 x T so
their HBM blocks are dense; the kernels turn them into columns with a small transpose.

Both kernels keep the whole key/value block of the call resident in VMEM (block index constant
along the query axis, so Pallas fetches it once per (batch, kv head)) and loop over it in
``block_k`` chunks; queries stream in ``block_q`` blocks. Key blocks longer than
``max_resident_keys`` are split into several calls. Partial blocks are padded by the pipeline and
masked by index; ALiBi is generated from the positions and the head index; GQA maps query head h
to kv head h // R in the index maps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.rt_tiles.config import TPU_LANES, TpuTileConfig
from pallas_kernels.rt_tiles.contract import TileSpecLike, TileState

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _row_to_col(row_1xN: jax.Array) -> jax.Array:
    """(1, n) lane-major row -> (n, 1) column."""
    n = row_1xN.shape[1]
    return jnp.transpose(jnp.broadcast_to(row_1xN, (8, n)))[:, :1]


def _col_to_row(col_Nx1: jax.Array) -> jax.Array:
    """(n, 1) column -> (1, n) lane-major row."""
    n = col_Nx1.shape[0]
    return jnp.transpose(jnp.broadcast_to(col_Nx1, (n, TPU_LANES)))[:1, :]


def _alibi_slope(head: jax.Array, off_ref, spec: TileSpecLike, dtype: jnp.dtype) -> jax.Array:
    """(1, 1) slope of local query head ``head`` (global head = head + offset), as
    ``contract.alibi_slopes`` computes it."""
    h = (lax.broadcast(head + 1, (1, 1)) + off_ref[...]).astype(jnp.float32)
    return jnp.exp2(-h * spec.alibi_bias_max / spec.n_heads).astype(dtype)


@dataclasses.dataclass(frozen=True)
class TileGeometry:
    """Static block layout of one tile call (derived from shapes and the config)."""

    block_q: int
    block_k: int
    keys_per_call: int
    n_calls: int

    @classmethod
    def of(cls, n_queries: int, n_keys: int, config: TpuTileConfig) -> TileGeometry:
        """Blocks for a tile of n_queries x n_keys."""
        block_q = min(config.block_q, _round_up(n_queries, TPU_LANES))
        block_k = min(config.block_k, _round_up(n_keys, TPU_LANES))
        keys_per_call = min(config.max_resident_keys, _round_up(n_keys, block_k))
        return cls(block_q, block_k, keys_per_call, -(-n_keys // keys_per_call))


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
    n_keys: int,
    block_k: int,
    acc_dtype: jnp.dtype,
):
    head = pl.program_id(1)
    q = q_ref[...]
    m = _row_to_col(max_ref[...])
    den = _row_to_col(den_ref[...])
    acc = acc_ref[...]
    alibi = spec.position == "alibi"
    if alibi:
        slope = _alibi_slope(head, off_ref, spec, acc_dtype)
        qpos = _row_to_col(qpos_ref[...]).astype(acc_dtype)

    def body(i, carry):
        acc, m, den = carry
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        key_row = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        key_col = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        v = jnp.where(key_col < n_keys, v, jnp.zeros_like(v))
        s = lax.dot_general(q, k, _NT, preferred_element_type=acc_dtype)
        if alibi:
            kpos = kpos_ref[:, pl.ds(start, block_k)].astype(acc_dtype)
            s = s - slope * (qpos - kpos)
        s = jnp.where(key_row < n_keys, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        den = den * rescale + p.sum(axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=acc_dtype)
        return acc * rescale + pv, m_new, den

    n_chunks = k_ref.shape[0] // block_k
    acc, m, den = lax.fori_loop(0, n_chunks, body, (acc, m, den))
    acc_out[...] = acc
    max_out[...] = _col_to_row(m)
    den_out[...] = _col_to_row(den)


def merge_cost(
    b: int, h: int, g: int, t: int, s: int, k: int, itemsize: int, config: TpuTileConfig
) -> pl.CostEstimate:
    """FLOPs, exps and HBM bytes of ``merge`` per its BlockSpecs (all calls of one tile)."""
    geo = TileGeometry.of(t, s, config)
    acc_bytes = 4 if itemsize <= 4 else 8
    state = b * h * t * (k + 2) * acc_bytes
    per_call_q = b * h * t * k * itemsize + 2 * state + 4 * t
    kv = 2 * b * g * s * k * itemsize + 4 * s
    return pl.CostEstimate(
        flops=4 * b * h * t * s * k,
        transcendentals=b * h * t * s,
        bytes_accessed=geo.n_calls * per_call_q + kv,
    )


def _merge_call(
    off, q, k, v, acc, mx, den, qpos, kpos, chunk, spec, config, geo, n_keys, interpret
) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, h, t, kd = q.shape
    g = k.shape[1]
    r = h // g
    acc_dtype = acc.dtype
    grid = (b, h, pl.cdiv(t, geo.block_q))
    q_spec = pl.BlockSpec((None, None, geo.block_q, kd), lambda bi, hi, ti: (bi, hi, ti, 0))
    kv_spec = pl.BlockSpec(
        (None, None, geo.keys_per_call, kd), lambda bi, hi, ti: (bi, hi // r, chunk, 0)
    )
    stat_spec = pl.BlockSpec((None, None, 1, geo.block_q), lambda bi, hi, ti: (bi, hi, 0, ti))
    kernel = functools.partial(
        _merge_kernel,
        spec=spec,
        n_keys=n_keys,
        block_k=geo.block_k,
        acc_dtype=acc_dtype,
    )
    cost = merge_cost(b, h, g, t, n_keys, kd, q.dtype.itemsize, config)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1, 1), lambda bi, hi, ti: (0, 0)),
            pl.BlockSpec((1, geo.block_q), lambda bi, hi, ti: (0, ti)),
            pl.BlockSpec((1, geo.keys_per_call), lambda bi, hi, ti: (0, chunk)),
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=[q_spec, stat_spec, stat_spec],
        out_shape=[
            jax.ShapeDtypeStruct(acc.shape, acc_dtype),
            jax.ShapeDtypeStruct(mx.shape, acc_dtype),
            jax.ShapeDtypeStruct(den.shape, acc_dtype),
        ],
        input_output_aliases={6: 0, 7: 1, 8: 2},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=config.vmem_limit_bytes,
        ),
        cost_estimate=pl.CostEstimate(
            flops=cost.flops // geo.n_calls,
            transcendentals=cost.transcendentals // geo.n_calls,
            bytes_accessed=cost.bytes_accessed // geo.n_calls,
        ),
        interpret=interpret,
        name="rt_tile_merge",
    )(off, qpos, kpos, q, k, v, acc, mx, den)


def merge(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: TileSpecLike,
    *,
    config: TpuTileConfig,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> TileState:
    """TPU kernel for ``contract.merge_block`` (same arguments and result)."""
    b, h, t, kd = q_BxHxTxK.shape
    s = k_BxGxSxK.shape[2]
    geo = TileGeometry.of(t, s, config)
    acc_dtype = _acc_dtype(q_BxHxTxK.dtype)
    acc, mx, den = state
    acc = acc.astype(acc_dtype)
    mx = mx.astype(acc_dtype).reshape(b, h, 1, t)
    den = den.astype(acc_dtype).reshape(b, h, 1, t)
    off = jnp.asarray(head_offset, jnp.int32).reshape(1, 1)
    qpos = q_pos_T.astype(jnp.int32).reshape(1, t)
    kpos = k_pos_S.astype(jnp.int32).reshape(1, s)
    for chunk in range(geo.n_calls):
        n_keys = min(s - chunk * geo.keys_per_call, geo.keys_per_call)
        acc, mx, den = _merge_call(
            off,
            q_BxHxTxK,
            k_BxGxSxK,
            v_BxGxSxK,
            acc,
            mx,
            den,
            qpos,
            kpos,
            chunk,
            spec,
            config,
            geo,
            n_keys,
            interpret,
        )
    return TileState(acc, mx.reshape(b, h, t), den.reshape(b, h, t))


# ----------------------------------------------------------------------------- backward grads


def _grads_kernel(
    off_ref,
    qpos_ref,
    kpos_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    *,
    spec: TileSpecLike,
    n_queries: int,
    n_keys: int,
    block_q: int,
    block_k: int,
    acc_dtype: jnp.dtype,
):
    group, rep, tq = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    head = group * spec.group_size + rep

    @pl.when((rep == 0) & (tq == 0))
    def _zero():
        dk_ref[...] = jnp.zeros_like(dk_ref)
        dv_ref[...] = jnp.zeros_like(dv_ref)

    q_valid = tq * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) < n_queries
    q = q_ref[...]
    do = do_ref[...]
    q = jnp.where(q_valid, q, jnp.zeros_like(q))
    do = jnp.where(q_valid, do, jnp.zeros_like(do))
    lse = jnp.where(q_valid, _row_to_col(lse_ref[...]), 0.0).astype(acc_dtype)
    delta = jnp.where(q_valid, _row_to_col(delta_ref[...]), 0.0).astype(acc_dtype)
    alibi = spec.position == "alibi"
    if alibi:
        slope = _alibi_slope(head, off_ref, spec, acc_dtype)
        qpos = _row_to_col(qpos_ref[...]).astype(acc_dtype)

    def body(i, dq):
        start = pl.multiple_of(i * block_k, block_k)
        key_row = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        key_col = start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        k = jnp.where(key_col < n_keys, k, jnp.zeros_like(k))
        v = jnp.where(key_col < n_keys, v, jnp.zeros_like(v))
        s = lax.dot_general(q, k, _NT, preferred_element_type=acc_dtype)
        if alibi:
            kpos = kpos_ref[:, pl.ds(start, block_k)].astype(acc_dtype)
            s = s - slope * (qpos - kpos)
        p = jnp.where(q_valid & (key_row < n_keys), jnp.exp(s - lse), 0.0)
        dv = jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=acc_dtype)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=acc_dtype)
        ds = p * (dp - delta)
        dk = jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=acc_dtype)
        dk_ref[pl.ds(start, block_k), :] += dk
        dv_ref[pl.ds(start, block_k), :] += dv
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=acc_dtype)

    n_chunks = k_ref.shape[0] // block_k
    dq = lax.fori_loop(0, n_chunks, body, jnp.zeros(q.shape, acc_dtype))
    dq_ref[...] = dq


def grads_cost(
    b: int, h: int, g: int, t: int, s: int, k: int, itemsize: int, config: TpuTileConfig
) -> pl.CostEstimate:
    """FLOPs, exps and HBM bytes of ``grads`` per its BlockSpecs (all calls of one tile)."""
    geo = TileGeometry.of(t, s, config)
    acc_bytes = 4 if itemsize <= 4 else 8
    # per call: q and do in, lse and delta in, dq out (plus the running sum when split)
    per_call_q = b * h * t * (2 * k * itemsize + 2 * acc_bytes + k * acc_bytes) + 4 * t
    dq_sum = (geo.n_calls - 1) * 3 * b * h * t * k * acc_bytes
    # keys/values in once per (batch, kv head); dk, dv out once
    kv = 2 * b * g * s * k * (itemsize + acc_bytes) + 4 * s
    return pl.CostEstimate(
        flops=10 * b * h * t * s * k,
        transcendentals=b * h * t * s,
        bytes_accessed=geo.n_calls * per_call_q + dq_sum + kv,
    )


def _grads_call(
    off, q, k, v, do, lse, delta, qpos, kpos, chunk, spec, config, geo, n_keys, interpret
) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, h, t, kd = q.shape
    g = k.shape[1]
    r = h // g
    acc_dtype = _acc_dtype(q.dtype)
    grid = (b, g, r, pl.cdiv(t, geo.block_q))
    q_spec = pl.BlockSpec(
        (None, None, geo.block_q, kd), lambda bi, gi, ri, ti: (bi, gi * r + ri, ti, 0)
    )
    kv_in = pl.BlockSpec(
        (None, None, geo.keys_per_call, kd), lambda bi, gi, ri, ti: (bi, gi, chunk, 0)
    )
    kv_out = pl.BlockSpec(
        (None, None, geo.keys_per_call, kd), lambda bi, gi, ri, ti: (bi, gi, 0, 0)
    )
    stat_spec = pl.BlockSpec(
        (None, None, 1, geo.block_q), lambda bi, gi, ri, ti: (bi, gi * r + ri, 0, ti)
    )
    kernel = functools.partial(
        _grads_kernel,
        spec=spec,
        n_queries=t,
        n_keys=n_keys,
        block_q=geo.block_q,
        block_k=geo.block_k,
        acc_dtype=acc_dtype,
    )
    cost = grads_cost(b, h, g, t, k.shape[2], kd, q.dtype.itemsize, config)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1, 1), lambda bi, gi, ri, ti: (0, 0)),
            pl.BlockSpec((1, geo.block_q), lambda bi, gi, ri, ti: (0, ti)),
            pl.BlockSpec((1, geo.keys_per_call), lambda bi, gi, ri, ti: (0, chunk)),
            q_spec,
            kv_in,
            kv_in,
            q_spec,
            stat_spec,
            stat_spec,
        ],
        out_specs=[q_spec, kv_out, kv_out],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, acc_dtype),
            jax.ShapeDtypeStruct((b, g, n_keys, kd), acc_dtype),
            jax.ShapeDtypeStruct((b, g, n_keys, kd), acc_dtype),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=config.vmem_limit_bytes,
        ),
        cost_estimate=pl.CostEstimate(
            flops=cost.flops // geo.n_calls,
            transcendentals=cost.transcendentals // geo.n_calls,
            bytes_accessed=cost.bytes_accessed // geo.n_calls,
        ),
        interpret=interpret,
        name="rt_tile_grads",
    )(off, qpos, kpos, q, k, v, do, lse, delta)


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
    config: TpuTileConfig,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """TPU kernel for ``contract.block_grads`` (same arguments and result)."""
    b, h, t, kd = q_BxHxTxK.shape
    s = k_BxGxSxK.shape[2]
    geo = TileGeometry.of(t, s, config)
    acc_dtype = _acc_dtype(q_BxHxTxK.dtype)
    do = g_BxHxTxK.astype(q_BxHxTxK.dtype)
    lse = lse_BxHxT.astype(acc_dtype).reshape(b, h, 1, t)
    delta = delta_BxHxT.astype(acc_dtype).reshape(b, h, 1, t)
    qpos = q_pos_T.astype(jnp.int32).reshape(1, t)
    kpos = k_pos_S.astype(jnp.int32).reshape(1, s)
    off = jnp.asarray(head_offset, jnp.int32).reshape(1, 1)
    dq_total, dks, dvs = None, [], []
    for chunk in range(geo.n_calls):
        n_keys = min(s - chunk * geo.keys_per_call, geo.keys_per_call)
        dq, dk, dv = _grads_call(
            off,
            q_BxHxTxK,
            k_BxGxSxK,
            v_BxGxSxK,
            do,
            lse,
            delta,
            qpos,
            kpos,
            chunk,
            spec,
            config,
            geo,
            n_keys,
            interpret,
        )
        dq_total = dq if dq_total is None else dq_total + dq
        dks.append(dk)
        dvs.append(dv)
    if len(dks) == 1:
        return dq_total, dks[0], dvs[0]
    return dq_total, jnp.concatenate(dks, axis=2), jnp.concatenate(dvs, axis=2)
