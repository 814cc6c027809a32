"""Mosaic TPU kernels for one Fenwick block of the tiled RT scan, in place on leaf-major buffers.

The tiled scan keeps its tensors leaf-major and head-major: queries, state and gradients
n x B x H x L (x K), keys/values n x B x G x L (x K) (n leaves of L positions). Block m
(T = lowbit(m)) joins key leaves [m - T, m) with query leaves [m, min(m + T, n)). These kernels
read and write those buffers where they lie: the block's offsets are scalar-prefetch operands
(``block_plan``) that the BlockSpec index maps read, so one compiled call serves every m (no
``lax.switch``, no gathered window), and the state (forward) or the gradients (backward) are
aliased to the outputs (``input_output_aliases``): a call touches only the block's leaves.

Grid (B, H / hb, phase), hb query heads (their gb = hb / R kv heads) per step:

* merge: phases [0, kc) copy key leaf p into a VMEM scratch of the block's keys/values; phases
  [kc, kc + tq) merge query leaf m + p - kc (its hb heads) with all resident keys, in 128-key
  chunks, and write its state back.
* grads: phases [0, kc) load keys/values; [kc, kc + tq) query leaf j: dq (added to its dq in
  place) and dK, dV accumulated in VMEM; [kc + tq, 2 kc + tq) add the block's dK, dV into key
  leaf p - kc - tq of the dK, dV buffers.

Key blocks longer than the resident budget (``resident_leaves``) run as several calls, one per
chunk of key leaves (``chunks``). Every buffer is read before it is written and each block index
is visited in one run of consecutive steps, so the pipelined copies never read stale data.
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
from pallas_kernels.rt_tiles.contract import TileSpecLike

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
# Scalar-prefetch vector: first query leaf, first key leaf, key leaves in this call, query
# leaves, global index of the first local head, last leaf.
M, KS, KC, TQ, HOFF, LAST = range(6)


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _lowbit(m):
    return jnp.bitwise_and(m, -m)


def supported(leaf: int, dtype) -> bool:
    """Whether the kernels take leaves of ``leaf`` rows of ``dtype``: a whole number of sublane
    tiles (8 rows of 32 bits: 8 float32, 16 bfloat16), so a leaf lands aligned in VMEM."""
    return leaf % (8 * max(1, 4 // jnp.dtype(dtype).itemsize)) == 0


def largest_block(n: int) -> int:
    """Key leaves of the largest Fenwick block among n leaves (0 when there is none)."""
    return 1 << ((n - 1).bit_length() - 1) if n > 1 else 0


def resident_leaves(n: int, leaf: int, config: TpuTileConfig) -> int:
    """Key leaves one call keeps in VMEM: a power of two <= max_resident_keys / leaf."""
    cap = max(1, config.max_resident_keys // leaf)
    return min(largest_block(n), 1 << (cap.bit_length() - 1)) if n > 1 else 1


def chunks(n: int, leaf: int, config: TpuTileConfig) -> int:
    """Most calls one block needs (blocks longer than ``resident_leaves`` are split)."""
    return max(1, -(-largest_block(n) // resident_leaves(n, leaf, config)))


def block_plan(m, n: int, cap: int, chunk=0, head_offset=0) -> jax.Array:
    """Scalar-prefetch vector (``M``..``LAST``) of chunk ``chunk`` of block m (int32[6]).

    Empty blocks (m <= 0 or m >= n, or a chunk past the block) get tq = 0: one step that leaves
    the buffers as they are.
    """
    m = jnp.asarray(m, jnp.int32)
    t = _lowbit(m)
    live = (m > 0) & (m < n)
    kc = jnp.clip(t - chunk * cap, 0, cap)
    tq = jnp.where(live & (kc > 0), jnp.minimum(t, n - m), 0)
    kc = jnp.where(tq > 0, kc, 1)
    ks = jnp.where(tq > 0, m - t + chunk * cap, 0)
    m = jnp.clip(m, 0, n - 1)
    return jnp.stack(
        [m, ks, kc, tq, jnp.asarray(head_offset, jnp.int32), jnp.asarray(n - 1, jnp.int32)]
    ).astype(jnp.int32)


def head_block(h: int, g: int, leaf: int, kd: int, cap: int, itemsize: int, budget: int) -> int:
    """Query heads per grid step: all local heads when their resident keys fit ``budget`` bytes,
    else the largest multiple of 8 that divides h and keeps whole kv-head groups (or one group)."""
    r = h // g

    def fits(hb):
        gb = max(1, hb // r)
        return gb * cap * leaf * kd * itemsize <= budget

    options = [hb for hb in range(h, 0, -1) if h % hb == 0 and (hb == h or hb % 8 == 0)]
    options = [hb for hb in options if hb % r == 0]
    for hb in options:
        if fits(hb):
            return hb
    return options[-1] if options else h


def _row_to_col(row_1xN: jax.Array) -> jax.Array:
    n = row_1xN.shape[1]
    return jnp.transpose(jnp.broadcast_to(row_1xN, (8, n)))[:, :1]


def _col_to_row(col_Nx1: jax.Array) -> jax.Array:
    n = col_Nx1.shape[0]
    return jnp.transpose(jnp.broadcast_to(col_Nx1, (n, 8)))[:1, :]


@dataclasses.dataclass(frozen=True)
class _Geometry:
    n: int
    leaf: int
    hb: int  # query heads per step
    gb: int  # kv heads per step
    r: int  # query heads per kv head
    cap: int  # resident key leaves
    bk: int  # keys per inner chunk


def _geometry(q_l, k_l, config: TpuTileConfig, budget_share: int) -> _Geometry:
    n, _, h, leaf, kd = q_l.shape
    g = k_l.shape[2]
    cap = resident_leaves(n, leaf, config)
    budget = (config.vmem_limit_bytes or 16 * 1024 * 1024) // budget_share
    r = h // g
    hb = config.heads_per_step or head_block(h, g, leaf, kd, cap, 4, budget)
    if h % hb or hb % r or (hb != h and hb % 8):
        raise ValueError(
            f"TpuTileConfig.heads_per_step={hb} must divide the {h} local heads, be a multiple "
            f"of the group size {r}, and equal {h} or be a multiple of 8"
        )
    gb = max(1, hb // r)
    rows = cap * leaf
    bk = min(TPU_LANES, rows)
    while rows % bk:
        bk //= 2
    return _Geometry(n, leaf, hb, gb, r, cap, bk)


def _slope(spec: TileSpecLike, head, dtype):
    h = jnp.full((1, 1), head + 1, jnp.int32).astype(jnp.float32)
    return jnp.exp2(-h * spec.alibi_bias_max / spec.n_heads).astype(dtype)


def mean_block_cost(q_l, k_l, flops_per_mac: int, acc_arrays: int) -> pl.CostEstimate:
    """A call's cost averaged over the n - 1 blocks of a scan (the call's size depends on m).

    Shared by the TPU and GPU in-place kernels (same buffers, same blocks).

    The blocks hold n (n - 1) / 2 leaf pairs and n log2 n leaves each side, so a mean call has
    n / 2 pairs and log2 n query and key leaves: q (and g), the state or gradient leaves read
    and written, keys/values read (acc_arrays = float32 arrays read + written per query leaf).
    """
    n, b, h, leaf, kd = q_l.shape
    g = k_l.shape[2]
    pairs = max(n, 2) // 2
    leaves = max(1, (max(n, 2) - 1).bit_length())
    q_bytes = b * h * leaf * kd * q_l.dtype.itemsize
    kv_bytes = 2 * b * g * leaf * kd * k_l.dtype.itemsize
    acc_bytes = acc_arrays * b * h * leaf * (kd + 2) * 4
    return pl.CostEstimate(
        flops=flops_per_mac * b * h * leaf * leaf * kd * pairs,
        transcendentals=b * h * leaf * leaf * pairs,
        bytes_accessed=leaves * (q_bytes + kv_bytes + acc_bytes),
    )


# ----------------------------------------------------------------------------- forward merge


def _merge_kernel(
    sc, q_ref, k_ref, v_ref, acc_in, max_in, den_in, acc_out, max_out, den_out, k_scr, v_scr,
    *, spec: TileSpecLike, geo: _Geometry, acc_dtype,
):  # fmt: skip
    hg, p = pl.program_id(1), pl.program_id(2)
    kc, tq = sc[KC], sc[TQ]
    leaf, bk = geo.leaf, geo.bk

    @pl.when(p < kc)
    def _load():
        row = pl.multiple_of(p * leaf, leaf)
        k_scr[:, pl.ds(row, leaf), :] = k_ref[...]
        v_scr[:, pl.ds(row, leaf), :] = v_ref[...]

    @pl.when(tq == 0)
    def _keep():
        acc_out[...] = acc_in[...]
        max_out[...] = max_in[...]
        den_out[...] = den_in[...]

    @pl.when((p >= kc) & (tq > 0))
    def _merge():
        n_keys = kc * leaf
        q_pos = (sc[M] + p - kc) * leaf + lax.broadcasted_iota(jnp.int32, (leaf, 1), 0)
        k0 = sc[KS] * leaf
        n_chunks = lax.div(n_keys + bk - 1, jnp.int32(bk))
        for h in range(geo.hb):
            g = h // geo.r
            q = q_ref[h]
            m0 = _row_to_col(max_in[pl.ds(h, 1), :])
            d0 = _row_to_col(den_in[pl.ds(h, 1), :])
            slope = None
            if spec.position == "alibi":
                slope = _slope(spec, sc[HOFF] + hg * geo.hb + h, acc_dtype)

            def body(c, carry, q=q, g=g, slope=slope):
                acc, mx, den = carry
                start = pl.multiple_of(c * bk, bk)
                k = k_scr[g, pl.ds(start, bk), :]
                v = v_scr[g, pl.ds(start, bk), :]
                key_row = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
                key_col = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
                v = jnp.where(key_col < n_keys, v, jnp.zeros_like(v))
                s = lax.dot_general(q, k, _NT, preferred_element_type=acc_dtype)
                if slope is not None:
                    s = s - slope * (q_pos - (k0 + key_row)).astype(acc_dtype)
                s = jnp.where(key_row < n_keys, s, -jnp.inf)
                m_new = jnp.maximum(mx, s.max(axis=1, keepdims=True))
                rescale = jnp.exp(mx - m_new)
                prob = jnp.exp(s - m_new)
                den = den * rescale + prob.sum(axis=1, keepdims=True)
                pv = jnp.dot(prob.astype(v.dtype), v, preferred_element_type=acc_dtype)
                return acc * rescale + pv, m_new, den

            acc, mx, den = lax.fori_loop(0, n_chunks, body, (acc_in[h], m0, d0))
            acc_out[h] = acc
            max_out[pl.ds(h, 1), :] = _col_to_row(mx)
            den_out[pl.ds(h, 1), :] = _col_to_row(den)


# Index maps: the leaf a block spec reads at phase p (grid steps of one (batch, head group)).
def _q_leaf(p, sc):
    """Query leaf m + p - kc, held at m during the key phase and at the last one after."""
    return jnp.clip(sc[M] + jnp.clip(p - sc[KC], 0, jnp.maximum(sc[TQ] - 1, 0)), 0, sc[LAST])


def _k_leaf(p, sc):
    """Key leaf ks + p during the load phase, then held."""
    return sc[KS] + jnp.minimum(p, sc[KC] - 1)


def _k_leaf_out(p, sc):
    """Key leaf whose dK, dV are written at phase p (held at ks until the write phase)."""
    return sc[KS] + jnp.clip(p - sc[KC] - sc[TQ], 0, sc[KC] - 1)


def _specs(geo: _Geometry, kd: int):
    leaf = geo.leaf

    def at(fn, ndim):
        return lambda bi, hi, p, sc: (fn(p, sc), bi, hi) + (0,) * (ndim - 3)

    q = pl.BlockSpec((None, None, geo.hb, leaf, kd), at(_q_leaf, 5))
    stat = pl.BlockSpec((None, None, geo.hb, leaf), at(_q_leaf, 4))
    kv = pl.BlockSpec((None, None, geo.gb, leaf, kd), at(_k_leaf, 5))
    kv_out = pl.BlockSpec((None, None, geo.gb, leaf, kd), at(_k_leaf_out, 5))
    return q, stat, kv, kv_out


def _merge_call(sc, q_l, k_l, v_l, state, spec, config, geo, interpret):
    n, b, h, leaf, kd = q_l.shape
    acc_dtype = state[0].dtype
    q_spec, stat_spec, kv_spec, _ = _specs(geo, kd)
    phases = sc[KC] + sc[TQ]
    kernel = functools.partial(_merge_kernel, spec=spec, geo=geo, acc_dtype=acc_dtype)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h // geo.hb, phases),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec],
            out_specs=[q_spec, stat_spec, stat_spec],
            scratch_shapes=[pltpu.VMEM((geo.gb, geo.cap * leaf, kd), k_l.dtype)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in state],
        input_output_aliases={4: 0, 5: 1, 6: 2},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=config.vmem_limit_bytes,
        ),
        cost_estimate=mean_block_cost(q_l, k_l, 4, 2),
        interpret=interpret,
        name="rt_fenwick_merge",
    )(sc, q_l, k_l, v_l, *state)


def fenwick_merge(
    q_l: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
    spec: TileSpecLike,
    *,
    config: TpuTileConfig,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merge key leaves [m - T, m) into the state of query leaves [m, min(m + T, n)) in place.

    q_l n x B x H x L x K, k_l/v_l n x B x G x L x K, state (acc n x B x H x L x K, max/den
    n x B x H x L, float32/64); returns the updated state (the same buffers when donated).
    """
    n, _, _, leaf, _ = q_l.shape
    geo = _geometry(q_l, k_l, config, 4)
    state = tuple(state)
    n_calls = chunks(n, leaf, config)
    if n_calls == 1:
        sc = block_plan(m, n, geo.cap, 0, head_offset)
        return tuple(_merge_call(sc, q_l, k_l, v_l, state, spec, config, geo, interpret))

    def body(c, st):
        sc = block_plan(m, n, geo.cap, c, head_offset)
        return tuple(_merge_call(sc, q_l, k_l, v_l, st, spec, config, geo, interpret))

    t = _lowbit(jnp.asarray(m, jnp.int32))
    return lax.fori_loop(0, jnp.maximum((t + geo.cap - 1) // geo.cap, 1), body, state)


# ----------------------------------------------------------------------------- backward grads


def _grads_kernel(
    sc, q_ref, k_ref, v_ref, g_ref, lse_ref, delta_ref, dq_in, dk_in, dv_in,
    dq_out, dk_out, dv_out, k_scr, v_scr, dk_scr, dv_scr,
    *, spec: TileSpecLike, geo: _Geometry, acc_dtype,
):  # fmt: skip
    hg, p = pl.program_id(1), pl.program_id(2)
    kc, tq = sc[KC], sc[TQ]
    leaf, bk = geo.leaf, geo.bk

    @pl.when(p < kc)
    def _load():
        row = pl.multiple_of(p * leaf, leaf)
        k_scr[:, pl.ds(row, leaf), :] = k_ref[...]
        v_scr[:, pl.ds(row, leaf), :] = v_ref[...]
        dk_scr[:, pl.ds(row, leaf), :] = jnp.zeros(dk_in.shape, acc_dtype)
        dv_scr[:, pl.ds(row, leaf), :] = jnp.zeros(dv_in.shape, acc_dtype)

    @pl.when(tq == 0)
    def _keep():
        dq_out[...] = dq_in[...]
        dk_out[...] = dk_in[...]
        dv_out[...] = dv_in[...]

    @pl.when((p >= kc) & (p < kc + tq))
    def _query_leaf():
        n_keys = kc * leaf
        q_pos = (sc[M] + p - kc) * leaf + lax.broadcasted_iota(jnp.int32, (leaf, 1), 0)
        k0 = sc[KS] * leaf
        n_chunks = lax.div(n_keys + bk - 1, jnp.int32(bk))
        for h in range(geo.hb):
            g = h // geo.r
            q = q_ref[h]
            do = g_ref[h].astype(q.dtype)
            lse = _row_to_col(lse_ref[pl.ds(h, 1), :]).astype(acc_dtype)
            delta = _row_to_col(delta_ref[pl.ds(h, 1), :]).astype(acc_dtype)
            slope = None
            if spec.position == "alibi":
                slope = _slope(spec, sc[HOFF] + hg * geo.hb + h, acc_dtype)

            def body(c, dq, q=q, do=do, lse=lse, delta=delta, g=g, slope=slope):
                start = pl.multiple_of(c * bk, bk)
                key_row = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
                key_col = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
                k = k_scr[g, pl.ds(start, bk), :]
                v = v_scr[g, pl.ds(start, bk), :]
                k = jnp.where(key_col < n_keys, k, jnp.zeros_like(k))
                v = jnp.where(key_col < n_keys, v, jnp.zeros_like(v))
                s = lax.dot_general(q, k, _NT, preferred_element_type=acc_dtype)
                if slope is not None:
                    s = s - slope * (q_pos - (k0 + key_row)).astype(acc_dtype)
                prob = jnp.where(key_row < n_keys, jnp.exp(s - lse), 0.0)
                dv = jnp.dot(prob.T.astype(do.dtype), do, preferred_element_type=acc_dtype)
                dp = lax.dot_general(do, v, _NT, preferred_element_type=acc_dtype)
                ds = prob * (dp - delta)
                dk = jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=acc_dtype)
                dk_scr[g, pl.ds(start, bk), :] += dk
                dv_scr[g, pl.ds(start, bk), :] += dv
                return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=acc_dtype)

            dq = lax.fori_loop(0, n_chunks, body, jnp.zeros(q.shape, acc_dtype))
            dq_out[h] = dq_in[h] + dq.astype(dq_out.dtype)

    @pl.when((p >= kc + tq) & (tq > 0))
    def _write_keys():
        row = pl.multiple_of((p - kc - tq) * leaf, leaf)
        dk_out[...] = dk_in[...] + dk_scr[:, pl.ds(row, leaf), :].astype(dk_out.dtype)
        dv_out[...] = dv_in[...] + dv_scr[:, pl.ds(row, leaf), :].astype(dv_out.dtype)


def _grads_call(sc, tensors, grads, spec, config, geo, interpret):
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    n, b, h, leaf, kd = q_l.shape
    acc_dtype = grads[1].dtype
    q_spec, stat_spec, kv_in, kv_out = _specs(geo, kd)
    phases = 2 * sc[KC] + sc[TQ]
    phases = jnp.where(sc[TQ] > 0, phases, 1)
    kernel = functools.partial(_grads_kernel, spec=spec, geo=geo, acc_dtype=acc_dtype)
    rows = geo.cap * leaf
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h // geo.hb, phases),
            in_specs=[q_spec, kv_in, kv_in, q_spec, stat_spec, stat_spec, q_spec, kv_out, kv_out],
            out_specs=[q_spec, kv_out, kv_out],
            scratch_shapes=[pltpu.VMEM((geo.gb, rows, kd), k_l.dtype)] * 2
            + [pltpu.VMEM((geo.gb, rows, kd), acc_dtype)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in grads],
        input_output_aliases={7: 0, 8: 1, 9: 2},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=config.vmem_limit_bytes,
        ),
        cost_estimate=mean_block_cost(q_l, k_l, 10, 4),
        interpret=interpret,
        name="rt_fenwick_grads",
    )(sc, q_l, k_l, v_l, g_l, lse_l, delta_l, *grads)


def fenwick_grads(
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
    spec: TileSpecLike,
    *,
    config: TpuTileConfig,
    interpret: bool = False,
    head_offset: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Add block m's (dq, dK, dV) into (dq_l, dk_l, dv_l) in place.

    ``tensors`` = (q_l, k_l, v_l, g_l, lse_l, delta_l) leaf-major as in ``fenwick_merge``;
    query leaves [m, min(m + T, n)) against key leaves [m - T, m).
    """
    q_l, k_l = tensors[0], tensors[1]
    n, _, _, leaf, _ = q_l.shape
    geo = _geometry(q_l, k_l, config, 8)
    grads = tuple(grads)
    if chunks(n, leaf, config) == 1:
        sc = block_plan(m, n, geo.cap, 0, head_offset)
        return tuple(_grads_call(sc, tensors, grads, spec, config, geo, interpret))

    def body(c, gr):
        sc = block_plan(m, n, geo.cap, c, head_offset)
        return tuple(_grads_call(sc, tensors, gr, spec, config, geo, interpret))

    t = _lowbit(jnp.asarray(m, jnp.int32))
    return lax.fori_loop(0, jnp.maximum((t + geo.cap - 1) // geo.cap, 1), body, grads)
