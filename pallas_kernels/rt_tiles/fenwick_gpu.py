"""Triton (Pallas GPU) kernels for one Fenwick block of the tiled RT scan, in place on leaf-major buffers.

The GPU counterpart of ``fenwick_tpu``. The scan keeps its tensors leaf-major and head-major:
queries, state and gradients n x B x H x L (x K), keys/values n x B x G x L (x K). Block m
(T = lowbit(m)) joins key leaves [m - T, m) with query leaves [m, min(m + T, n)). The kernels
take those buffers whole (no BlockSpec window, nothing cut or written back by XLA) and a small
int32 operand ``block_plan(m)`` (first query leaf, first key leaf, key leaves, query leaves, head
offset); each program computes its pointers from it, so one compiled call serves every m (no
``lax.switch``). The state (merge) and the gradients (grads) are ``input_output_aliases``: a
call reads and writes only its block's rows.

Triton Pallas has no scalar prefetch and no dynamic grid, so the grid is static and maximal
(the largest block among n leaves) and programs past the block's true size do nothing:

* merge, grid (query-leaf slots x chunks per leaf, B, H): program (j, c) takes rows
  [c cq, (c + 1) cq) of query leaf m + j (masked to the leaf) and loops over the block's key
  leaves in ``ck``-row chunks (a loop of dynamic length T x chunks per leaf), then stores its
  state rows in place.
* grads, two launches as in FlashAttention-2: dK/dV with grid (key-leaf slots x chunks, B, G),
  each program looping over the R heads of its group x the block's query leaves and adding into
  its dK/dV rows in place; dQ with grid (query-leaf slots x chunks, B, H) looping over key chunks
  and adding into its dq rows in place. No atomics: every program owns its output rows.

Chunks are powers of two >= 16 (the matrix-unit minimum), at most one leaf when leaves are that
long; shorter leaves run in 16-row chunks masked to the leaf (tiny presets only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.rt_tiles.config import GpuTileConfig, gpu_config_for_tile
from pallas_kernels.rt_tiles.contract import TileSpecLike
from pallas_kernels.rt_tiles.fenwick_tpu import mean_block_cost

# block_plan's entries: first query leaf, first key leaf, key leaves, query leaves, head offset.
M, KS, KC, TQ, HOFF = range(5)
MIN_CHUNK = 16  # rows of the smallest Triton dot operand


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def largest_block(n: int) -> int:
    """Key leaves (and at most the query leaves) of the largest Fenwick block among n leaves."""
    return 1 << ((n - 1).bit_length() - 1) if n > 1 else 0


def supported(kd: int) -> bool:
    """Whether the kernels take heads of ``kd`` features (a power of two >= 16, as ``gpu``)."""
    return kd >= 16 and not kd & (kd - 1)


def block_plan(m, n: int, head_offset=0) -> jax.Array:
    """int32[5] (``M``, ``KS``, ``KC``, ``TQ``, ``HOFF``) of block m among n leaves.

    Empty blocks (m <= 0 or m >= n) get kc = tq = 0: every program returns at once.
    """
    m = jnp.asarray(m, jnp.int32)
    t = jnp.bitwise_and(m, -m)
    live = (m > 0) & (m < n)
    tq = jnp.where(live, jnp.minimum(t, n - m), 0)
    kc = jnp.where(live, t, 0)
    ks = jnp.where(live, m - t, 0)
    return jnp.stack(
        [jnp.where(live, m, 0), ks, kc, tq, jnp.asarray(head_offset, jnp.int32)]
    ).astype(jnp.int32)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Geometry:
    n: int
    leaf: int
    r: int  # query heads per kv head
    slots: int  # leaf slots of the grid (the largest block's leaves)
    cq: int  # query rows per program / inner query chunk
    ck: int  # key rows per program (dK/dV) / inner key chunk
    qpl: int  # query chunks per leaf
    kpl: int  # key chunks per leaf


def _geometry(q_l: jax.Array, k_l: jax.Array, config: GpuTileConfig | None) -> tuple:
    n, _, h, leaf, kd = q_l.shape
    if not supported(kd):
        raise ValueError(
            f"the Triton in-place kernels need a power-of-two head_dim >= 16, got {kd}: "
            "use impl='tiled' or a TPU backend for this head size"
        )
    slots = max(1, largest_block(n))
    config = gpu_config_for_tile(leaf, slots * leaf) if config is None else config
    rows = _pow2_at_least(max(leaf, MIN_CHUNK))
    cq, ck = min(config.block_q, rows), min(config.block_k, rows)
    geo = _Geometry(n, leaf, h // k_l.shape[2], slots, cq, ck, -(-leaf // cq), -(-leaf // ck))
    return geo, config


def _slope(head, spec: TileSpecLike, dtype):
    h = (head + 1).astype(jnp.float32)
    return jnp.exp2(-h * spec.alibi_bias_max / spec.n_heads).astype(dtype)


def _rows(chunk, size: int, leaf: int):
    """Rows [chunk size, (chunk + 1) size) of a leaf, and which of them lie inside it.

    ``chunk`` is always traced, so a chunk longer than a short leaf is a dynamic slice (masked),
    not a static out-of-bounds one.
    """
    start = chunk * size
    return pl.ds(start, size), start + jnp.arange(size) < leaf


def _params(config: GpuTileConfig) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _logits(q, k, q_pos, k_pos, slope, acc_dtype):
    s = plgpu.dot(q, k, trans_b=True).astype(acc_dtype)
    if slope is not None:
        s = s - slope * (q_pos[:, None] - k_pos[None, :]).astype(acc_dtype)
    return s


# ----------------------------------------------------------------------------- forward merge


def _merge_kernel(
    plan_ref, q_ref, k_ref, v_ref, acc_in, max_in, den_in, acc_out, max_out, den_out,
    *, spec: TileSpecLike, geo: _Geometry, acc_dtype,
):  # fmt: skip
    p, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j, c = lax.div(p, geo.qpl), lax.rem(p, geo.qpl)
    m, ks, kc, tq = plan_ref[M], plan_ref[KS], plan_ref[KC], plan_ref[TQ]

    @pl.when(j < tq)
    def _merge():
        leaf_q = m + j
        rows, row_ok = _rows(c, geo.cq, geo.leaf)
        g = lax.div(h, geo.r)
        q = plgpu.load(q_ref.at[leaf_q, b, h, rows, :], mask=row_ok[:, None], other=0.0)
        at = (leaf_q, b, h, rows)
        acc = plgpu.load(acc_in.at[*at, :], mask=row_ok[:, None], other=0.0).astype(acc_dtype)
        mx = plgpu.load(max_in.at[at], mask=row_ok, other=0.0).astype(acc_dtype)
        den = plgpu.load(den_in.at[at], mask=row_ok, other=0.0).astype(acc_dtype)
        q_pos = leaf_q * geo.leaf + c * geo.cq + jnp.arange(geo.cq)
        slope = None
        if spec.position == "alibi":
            slope = _slope(h + plan_ref[HOFF], spec, acc_dtype)

        def body(i, carry):
            acc, mx, den = carry
            leaf_k = ks + lax.div(i, geo.kpl)
            cols, col_ok = _rows(lax.rem(i, geo.kpl), geo.ck, geo.leaf)
            k = plgpu.load(k_ref.at[leaf_k, b, g, cols, :], mask=col_ok[:, None], other=0.0)
            v = plgpu.load(v_ref.at[leaf_k, b, g, cols, :], mask=col_ok[:, None], other=0.0)
            k_pos = leaf_k * geo.leaf + lax.rem(i, geo.kpl) * geo.ck + jnp.arange(geo.ck)
            s = _logits(q, k, q_pos, k_pos, slope, acc_dtype)
            s = jnp.where(col_ok[None, :], s, -jnp.inf)
            m_new = jnp.maximum(mx, s.max(axis=1))
            rescale = jnp.exp(mx - m_new)
            prob = jnp.exp(s - m_new[:, None])
            den = den * rescale + prob.sum(axis=1)
            pv = plgpu.dot(prob.astype(v.dtype), v).astype(acc_dtype)
            return acc * rescale[:, None] + pv, m_new, den

        acc, mx, den = lax.fori_loop(0, kc * geo.kpl, body, (acc, mx, den))
        plgpu.store(acc_out.at[*at, :], acc.astype(acc_out.dtype), mask=row_ok[:, None])
        plgpu.store(max_out.at[at], mx.astype(max_out.dtype), mask=row_ok)
        plgpu.store(den_out.at[at], den.astype(den_out.dtype), mask=row_ok)


def fenwick_merge(
    q_l: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
    spec: TileSpecLike,
    *,
    config: GpuTileConfig | None = None,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merge key leaves [m - T, m) into the state of query leaves [m, min(m + T, n)) in place.

    Same arguments and result as ``fenwick_tpu.fenwick_merge``; ``config`` None picks
    ``GPU_BY_SIZE``'s entry for a leaf of queries against the largest block's keys.
    """
    n, b, h, _, _ = q_l.shape
    geo, config = _geometry(q_l, k_l, config)
    acc_dtype = _acc_dtype(q_l.dtype)
    kernel = functools.partial(_merge_kernel, spec=spec, geo=geo, acc_dtype=acc_dtype)
    out = pl.pallas_call(
        kernel,
        grid=(geo.slots * geo.qpl, b, h),
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in state],
        input_output_aliases={4: 0, 5: 1, 6: 2},
        compiler_params=_params(config),
        cost_estimate=mean_block_cost(q_l, k_l, 4, 2),
        interpret=interpret,
        name="rt_fenwick_merge_gpu",
    )(block_plan(m, n, head_offset), q_l, k_l, v_l, *state)
    return tuple(out)


# ----------------------------------------------------------------------------- backward grads


def _probs(q, k, lse, q_pos, k_pos, row_ok, col_ok, slope, acc_dtype):
    s = _logits(q, k, q_pos, k_pos, slope, acc_dtype)
    return jnp.where(row_ok[:, None] & col_ok[None, :], jnp.exp(s - lse[:, None]), 0.0)


def _dkdv_kernel(
    plan_ref, q_ref, k_ref, v_ref, g_ref, lse_ref, delta_ref, dk_in, dv_in, dk_out, dv_out,
    *, spec: TileSpecLike, geo: _Geometry, acc_dtype,
):  # fmt: skip
    p, b, grp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    i, c = lax.div(p, geo.kpl), lax.rem(p, geo.kpl)
    m, ks, kc, tq = plan_ref[M], plan_ref[KS], plan_ref[KC], plan_ref[TQ]

    @pl.when(i < kc)
    def _keys():
        leaf_k = ks + i
        cols, col_ok = _rows(c, geo.ck, geo.leaf)
        at = (leaf_k, b, grp, cols)
        k = plgpu.load(k_ref.at[*at, :], mask=col_ok[:, None], other=0.0)
        v = plgpu.load(v_ref.at[*at, :], mask=col_ok[:, None], other=0.0)
        k_pos = leaf_k * geo.leaf + c * geo.ck + jnp.arange(geo.ck)
        per_head = tq * geo.qpl

        def body(step, carry):
            dk, dv = carry
            rep, rest = lax.div(step, per_head), lax.rem(step, per_head)
            head = grp * geo.r + rep
            leaf_q = m + lax.div(rest, geo.qpl)
            rows, row_ok = _rows(lax.rem(rest, geo.qpl), geo.cq, geo.leaf)
            qat = (leaf_q, b, head, rows)
            q = plgpu.load(q_ref.at[*qat, :], mask=row_ok[:, None], other=0.0)
            do = plgpu.load(g_ref.at[*qat, :], mask=row_ok[:, None], other=0.0).astype(q.dtype)
            lse = plgpu.load(lse_ref.at[qat], mask=row_ok, other=0.0).astype(acc_dtype)
            delta = plgpu.load(delta_ref.at[qat], mask=row_ok, other=0.0).astype(acc_dtype)
            q_pos = leaf_q * geo.leaf + lax.rem(rest, geo.qpl) * geo.cq + jnp.arange(geo.cq)
            slope = None
            if spec.position == "alibi":
                slope = _slope(head + plan_ref[HOFF], spec, acc_dtype)
            prob = _probs(q, k, lse, q_pos, k_pos, row_ok, col_ok, slope, acc_dtype)
            dv = dv + plgpu.dot(prob.astype(do.dtype), do, trans_a=True).astype(acc_dtype)
            dp = plgpu.dot(do, v, trans_b=True).astype(acc_dtype)
            ds = prob * (dp - delta[:, None])
            dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True).astype(acc_dtype)
            return dk, dv

        zeros = jnp.zeros(k.shape, acc_dtype)
        dk, dv = lax.fori_loop(0, geo.r * per_head, body, (zeros, zeros))
        old_k = plgpu.load(dk_in.at[*at, :], mask=col_ok[:, None], other=0.0)
        old_v = plgpu.load(dv_in.at[*at, :], mask=col_ok[:, None], other=0.0)
        plgpu.store(dk_out.at[*at, :], old_k + dk.astype(dk_out.dtype), mask=col_ok[:, None])
        plgpu.store(dv_out.at[*at, :], old_v + dv.astype(dv_out.dtype), mask=col_ok[:, None])


def _dq_kernel(
    plan_ref, q_ref, k_ref, v_ref, g_ref, lse_ref, delta_ref, dq_in, dq_out,
    *, spec: TileSpecLike, geo: _Geometry, acc_dtype,
):  # fmt: skip
    p, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j, c = lax.div(p, geo.qpl), lax.rem(p, geo.qpl)
    m, ks, kc, tq = plan_ref[M], plan_ref[KS], plan_ref[KC], plan_ref[TQ]

    @pl.when(j < tq)
    def _queries():
        leaf_q = m + j
        rows, row_ok = _rows(c, geo.cq, geo.leaf)
        g = lax.div(h, geo.r)
        at = (leaf_q, b, h, rows)
        q = plgpu.load(q_ref.at[*at, :], mask=row_ok[:, None], other=0.0)
        do = plgpu.load(g_ref.at[*at, :], mask=row_ok[:, None], other=0.0).astype(q.dtype)
        lse = plgpu.load(lse_ref.at[at], mask=row_ok, other=0.0).astype(acc_dtype)
        delta = plgpu.load(delta_ref.at[at], mask=row_ok, other=0.0).astype(acc_dtype)
        q_pos = leaf_q * geo.leaf + c * geo.cq + jnp.arange(geo.cq)
        slope = None
        if spec.position == "alibi":
            slope = _slope(h + plan_ref[HOFF], spec, acc_dtype)

        def body(i, dq):
            leaf_k = ks + lax.div(i, geo.kpl)
            cols, col_ok = _rows(lax.rem(i, geo.kpl), geo.ck, geo.leaf)
            k = plgpu.load(k_ref.at[leaf_k, b, g, cols, :], mask=col_ok[:, None], other=0.0)
            v = plgpu.load(v_ref.at[leaf_k, b, g, cols, :], mask=col_ok[:, None], other=0.0)
            k_pos = leaf_k * geo.leaf + lax.rem(i, geo.kpl) * geo.ck + jnp.arange(geo.ck)
            prob = _probs(q, k, lse, q_pos, k_pos, row_ok, col_ok, slope, acc_dtype)
            dp = plgpu.dot(do, v, trans_b=True).astype(acc_dtype)
            ds = prob * (dp - delta[:, None])
            return dq + plgpu.dot(ds.astype(k.dtype), k).astype(acc_dtype)

        dq = lax.fori_loop(0, kc * geo.kpl, body, jnp.zeros(q.shape, acc_dtype))
        old = plgpu.load(dq_in.at[*at, :], mask=row_ok[:, None], other=0.0)
        plgpu.store(dq_out.at[*at, :], old + dq.astype(dq_out.dtype), mask=row_ok[:, None])


def fenwick_grads(
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
    spec: TileSpecLike,
    *,
    config: GpuTileConfig | None = None,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Add block m's (dq, dK, dV) into (dq_l, dk_l, dv_l) in place (dK/dV launch, then dQ).

    ``tensors`` = (q_l, k_l, v_l, g_l, lse_l, delta_l) leaf-major as in ``fenwick_merge``.
    """
    q_l, k_l = tensors[0], tensors[1]
    n, b, h, _, _ = q_l.shape
    g = k_l.shape[2]
    geo, config = _geometry(q_l, k_l, config)
    acc_dtype = _acc_dtype(q_l.dtype)
    plan = block_plan(m, n, head_offset)
    dq_l, dk_l, dv_l = grads
    static = dict(spec=spec, geo=geo, acc_dtype=acc_dtype)
    dk_l, dv_l = pl.pallas_call(
        functools.partial(_dkdv_kernel, **static),
        grid=(geo.slots * geo.kpl, b, g),
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (dk_l, dv_l)],
        input_output_aliases={7: 0, 8: 1},
        compiler_params=_params(config),
        cost_estimate=mean_block_cost(q_l, k_l, 8, 2),
        interpret=interpret,
        name="rt_fenwick_dkdv_gpu",
    )(plan, *tensors, dk_l, dv_l)
    dq_l = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(geo.slots * geo.qpl, b, h),
        out_shape=jax.ShapeDtypeStruct(dq_l.shape, dq_l.dtype),
        input_output_aliases={7: 0},
        compiler_params=_params(config),
        cost_estimate=mean_block_cost(q_l, k_l, 6, 2),
        interpret=interpret,
        name="rt_fenwick_dq_gpu",
    )(plan, *tensors, dq_l)
    return dq_l, dk_l, dv_l
