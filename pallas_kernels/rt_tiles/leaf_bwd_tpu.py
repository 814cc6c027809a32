"""Mosaic TPU kernel for one leaf of the tiled RT backward: the L positions' reverse steps in one call.

The tiled backward scans leaves in reverse; inside leaf i every position p (from L - 1 down to 0)
pulls the within-leaf dK_p, dV_p of its persistent key/value from the leaf's later queries' saved
rows (q_t, g_t, lse_t, delta_t for t > p), adds the cross-leaf part, runs the vjp of the k/v
projection of z_p (norms, RoPE), of the MLP out and hidden projections (GELU') and of the
attention out-projection, which gives g_p = dL/datt_p and delta_p, written as the leaf's row p.
The jnp version (``rt_jax.ops.tiled_backward.leaf_backward_positions``) is ~40 small XLA fusions
per position. This kernel runs all L positions in one call, with the leaf's queries, log-sum-exp,
the g/delta rows and the (transposed) weights resident in VMEM; weights are read from HBM once per
call. Only the input gradients are computed here: the weight gradients stay batched after the scan.

Layout (B padded to a sublane multiple by the caller; heads flattened into lanes, c = h K + k, as
in ``leaf_tpu``): every per-position array is L x B x X. A key/value row is repeated to the H
query heads (GQA: Rep), so the probabilities of key p against all L queries are an elementwise
product over full vregs and one head-indicator matmul (``leaf_tpu._head_sums``: bf16 products
split in two exact halves); dV_p = sum_t P_t g_t and dK_p = sum_t dS_t q_t are sums over the
major axis, their query heads summed back to kv heads with Rep^T (float32, fp32 precision).

Precision follows the reference: probabilities, dS, dK, dV in float32; the cotangents entering a
weight matmul (dk_pre, dv, dz, dhidden, dx1) are rounded to the compute dtype first, which is the
one-pass bf16 product XLA:TPU runs for the reference's float32 x bf16 matmul at default precision
(on CPU the reference multiplies them in float32: the bf16 tests are looser for that).

Formulas (OLMo block, ``rt_jax.ops.block``; LN(x) = (x - mean) rsqrt(var + eps) w):
    dk_pre = LN_k'(dk rotated back by RoPE^T);  dzn = dk_pre @ w_k^T + dv @ w_v^T
    dz = dz_up + LN_attn'(dzn);  dhid = (dz @ w_ff_out^T) GELU'(hid);  dx1 = dz + LN_ff'(dhid @ w_ff_in^T)
    g = dx1 @ w_o^T;  delta = sum_k att g
with LN'(dy) = rstd (dy w - mean(dy w) - xhat mean(dy w xhat)) and the exact GELU' = Phi + x phi.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.rt_tiles.leaf_tpu import (
    SUBLANES,
    VMEM_CAP_BYTES,
    LeafSpec,
    _head_sums,
    _mm,
    _nbytes,
    _select,
    vmem_limit,
)


class LeafBackWeights(NamedTuple):
    """One layer's weights as the backward kernel takes them: transposed matrices in the compute
    dtype, norms 1 x X. ``rep`` (GK x HK, GQA only) repeats kv heads to query heads and
    ``rep_t`` (HK x GK, float32) sums them back; ``rot_t`` (GK x GK, RoPE only) is the transposed
    rotate-half; ``e`` (HK x H) sums each head's lanes; ``neg_slopes`` (1 x 1 x H, ALiBi) -slope_h.
    """

    w_o_t: jax.Array
    w_ff_in_t: jax.Array
    w_ff_out_t: jax.Array
    w_k_t: jax.Array
    w_v_t: jax.Array
    attn_norm: jax.Array
    ff_norm: jax.Array
    k_norm: jax.Array
    e: jax.Array
    rep: jax.Array | None
    rep_t: jax.Array | None
    rot_t: jax.Array | None
    neg_slopes: jax.Array | None


def _layer_norm_vjp(x, weight, dy, eps):
    """d/dx of LN(x) * weight applied to dy (mean and biased variance over the last axis)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    dxhat = dy * weight
    mean_d = jnp.mean(dxhat, axis=-1, keepdims=True)
    mean_dx = jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
    return rstd * (dxhat - mean_d - xhat * mean_dx)


def _gelu_grad(x):
    """Derivative of the exact GELU x Phi(x): Phi(x) + x phi(x) (erf, as in ``leaf_tpu``)."""
    cdf = 0.5 * (1.0 + lax.erf(x * math.sqrt(0.5)))
    return cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _sum_heads(a, rep_t, acc):
    """Query-head lanes summed into their kv head's lanes: a (B x HK) @ Rep^T, fp32 precision."""
    return jnp.dot(a, rep_t, preferred_element_type=acc, precision=lax.Precision.HIGHEST)


def _leaf_bwd_kernel(*refs, spec: LeafSpec, dtype, acc, rope: bool, gqa: bool):
    it = iter(refs)
    q_ref, lse_ref, dzu_ref, z_ref, kpre_ref, x1_ref, hid_ref, att_ref = (
        next(it) for _ in range(8)
    )
    k_ref, v_ref, dkc_ref, dvc_ref = (next(it) for _ in range(4))
    wo_t, wfi_t, wfo_t, wk_t, wv_t, an, fn, kn, e_ref = (next(it) for _ in range(9))
    rep_ref, rept_ref = (next(it), next(it)) if gqa else (None, None)
    rot_ref = next(it) if rope else None
    slope_ref = next(it) if spec.position == "alibi" else None
    cos_ref, sin_ref = (next(it), next(it)) if rope else (None, None)
    dz_ref, dhid_ref, dx1_ref, g_ref, delta_ref, dk_ref, dv_ref = (next(it) for _ in range(7))

    leaf, b, hk = q_ref.shape
    h = spec.n_heads
    eps = spec.norm_eps
    # rows t <= p of g and delta are read before they are written (with probability 0)
    g_ref[...] = jnp.zeros(g_ref.shape, acc)
    delta_ref[...] = jnp.zeros(delta_ref.shape, acc)
    e = e_ref[...]
    et = e.T
    t_idx = lax.broadcasted_iota(jnp.int32, (leaf, 1, 1), 0)

    def position(j, carry):
        p = leaf - 1 - j
        k_p, v_p = k_ref[p], v_ref[p]  # B x GK, compute dtype
        if rep_ref is not None:
            k_x, v_x = _select(k_p, rep_ref[...], acc), _select(v_p, rep_ref[...], acc)
        else:
            k_x, v_x = k_p.astype(acc), v_p.astype(acc)
        # key p against every query of the leaf (only t > p count)
        q_all = q_ref[...].astype(acc)  # L x B x HK
        g_all = g_ref[...]
        logits = _head_sums((q_all * k_x[None]).reshape(leaf * b, hk), e, dtype, acc)
        logits = logits.reshape(leaf, b, h)
        if slope_ref is not None:
            logits = logits + slope_ref[...] * (t_idx - p).astype(acc)
        prob = jnp.where(t_idx > p, jnp.exp(logits - lse_ref[...]), 0.0)
        dprob = _head_sums((g_all * v_x[None]).reshape(leaf * b, hk), e, dtype, acc)
        ds = prob * (dprob.reshape(leaf, b, h) - delta_ref[...])
        p_lanes = _select(prob.reshape(leaf * b, h), et, acc).reshape(leaf, b, hk)
        ds_lanes = _select(ds.reshape(leaf * b, h), et, acc).reshape(leaf, b, hk)
        dv_h = (p_lanes * g_all).sum(axis=0)  # B x HK
        dk_h = (ds_lanes * q_all).sum(axis=0)
        if rept_ref is not None:
            dk_h, dv_h = _sum_heads(dk_h, rept_ref[...], acc), _sum_heads(dv_h, rept_ref[...], acc)
        dk_t = dkc_ref[p] + dk_h
        dv_t = dvc_ref[p] + dv_h
        dk_ref[p] = dk_t
        dv_ref[p] = dv_t
        # through the persistent (k, v) = kv_projection(z_p)
        ct = dk_t.astype(dtype)
        if rot_ref is not None:  # RoPE^T: ct cos + (ct sin) P^T = ct cos + (ct P^T) sin
            rot = _select(ct, rot_ref[...], acc)
            ct = (ct.astype(acc) * cos_ref[p] + rot * sin_ref[p]).astype(dtype)
        dk_pre = _layer_norm_vjp(kpre_ref[p], kn[...].astype(acc), ct.astype(acc), eps)
        dzn = _mm(dk_pre.astype(dtype), wk_t[...], acc) + _mm(dv_t.astype(dtype), wv_t[...], acc)
        z_p = z_ref[p].astype(acc)
        dzn = dzn.astype(dtype).astype(acc)
        dz = dzu_ref[p] + _layer_norm_vjp(z_p, an[...].astype(acc), dzn, eps).astype(dz_ref.dtype)
        dz_ref[p] = dz
        # MLP out, GELU, MLP in
        hid = hid_ref[p]
        dh = _mm(dz.astype(dtype), wfo_t[...], acc).astype(dtype).astype(acc)
        dhid = dh * _gelu_grad(hid)
        dhid_ref[p] = dhid
        dhn = _mm(dhid.astype(dtype), wfi_t[...], acc).astype(dtype).astype(acc)
        x1_p = x1_ref[p].astype(acc)
        dx1 = dz + _layer_norm_vjp(x1_p, fn[...].astype(acc), dhn, eps).astype(dz.dtype)
        dx1_ref[p] = dx1
        # attention out-projection: g = dL/datt, delta = <att, g> per head
        g_t = _mm(dx1.astype(dtype), wo_t[...], acc).astype(dtype).astype(acc)
        g_ref[p] = g_t
        delta_ref[p] = _select(att_ref[p] * g_t, e, acc)
        return carry

    lax.fori_loop(0, leaf, position, 0)


def leaf_bwd_cost(
    leaf: int, b: int, d: int, f: int, spec: LeafSpec, dtype, operands, outputs
) -> pl.CostEstimate:
    """FLOPs, transcendentals and HBM bytes of one call (every operand and output once).

    FLOPs count the matmuls as issued (each position's key against all L query rows of the leaf,
    masked; bf16 head sums are two matmuls; a float32 selection or head-sum matmul counts once,
    whatever its contraction precision), the elementwise products and sums of the pull and the
    norm/GELU vjps. Every matmul has B rows: the MXU runs them at most B/128 (v5e) full, which a
    FLOP count cannot show (docs/kernels.md).
    """
    h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    hk, gk = h * kd, g * kd
    weights = hk * d + d * f + f * d + 2 * d * gk
    per_pos = 2 * b * weights  # transposed k/v projection, MLP out, MLP in, o-projection
    passes = 2 if jnp.dtype(dtype) == jnp.bfloat16 else 1
    per_pos += 2 * 2 * leaf * b * hk * h * passes  # logits, dprob: @ E
    per_pos += 2 * 2 * leaf * b * h * hk  # P, dS back to lanes: @ E^T
    per_pos += 2 * b * hk * h  # delta: @ E
    per_pos += 6 * leaf * b * hk  # q k, g v, P g and dS q (with their sums over t)
    per_pos += 4 * leaf * b * h  # exp argument, where, dS
    per_pos += b * (10 * (2 * d + gk) + 8 * f)  # three LayerNorm vjps, GELU'
    if spec.position == "rope":
        per_pos += 2 * b * gk * gk + 3 * b * gk
    if g != h:
        per_pos += 2 * 2 * b * gk * hk * 2  # k, v repeated; dk, dv summed back
    trans = leaf * b * (leaf * h + 2 * f + 3)  # exp (P), erf and exp (GELU'), rsqrt
    return pl.CostEstimate(
        flops=leaf * per_pos,
        transcendentals=trans,
        bytes_accessed=sum(_nbytes(a) for a in operands) + sum(_nbytes(a) for a in outputs),
    )


def vmem_bytes(operands, out_shapes, leaf: int, b: int, hk: int, f: int, acc) -> int:
    """VMEM one call holds: every operand and output (single-buffered) and the largest
    temporaries (q, g and four L x B x HK products/lanes in float32, the MLP hidden vjp)."""
    a = jnp.dtype(acc).itemsize
    temps = 6 * leaf * b * hk * a + 3 * b * f * a
    held = sum(_nbytes(x) for x in operands) + sum(_nbytes(x) for x in out_shapes)
    return held + temps


def leaf_backward(
    q_LxBxHK: jax.Array,
    lse_LxBxH: jax.Array,
    ys: tuple[jax.Array, ...],
    weights: LeafBackWeights,
    rope: tuple[jax.Array, jax.Array] | None,
    spec: LeafSpec,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """All L positions of one leaf, in reverse: (dz, dhidden, dx1, g, delta, dk, dv), L x B x ....

    ``ys`` = (dz_up, z, k_pre, x1, hidden_pre, att, k, v, dk_cross, dv_cross), L x B x X with
    heads in lanes (att L x B x HK float32; k, v compute dtype, k_pre and the cross-leaf dK, dV
    float32, L x B x GK); ``q`` scaled and rotated, compute dtype; ``rope`` the (cos, sin) tables
    of the leaf's positions (``leaf_tpu.rope_tables``) when ``spec.position == "rope"``. g and
    delta are float32 (g rounded to the compute dtype), dk and dv L x B x GK float32. B must be a
    multiple of 8.
    """
    leaf, b, hk = q_LxBxHK.shape
    dz_up = ys[0]
    d = dz_up.shape[2]
    f = weights.w_ff_in_t.shape[0]
    gk = spec.n_kv_heads * spec.head_dim
    dtype = q_LxBxHK.dtype
    acc = lse_LxBxH.dtype
    if b % SUBLANES:
        raise ValueError(f"leaf_backward needs a batch that is a multiple of {SUBLANES}, got {b}")
    if (spec.position == "rope") != (rope is not None):
        raise ValueError("leaf_backward: pass the rope tables exactly when spec.position='rope'")
    gqa = weights.rep is not None
    operands = [q_LxBxHK, lse_LxBxH, *ys, *weights[:9]]
    operands += [
        a for a in (weights.rep, weights.rep_t, weights.rot_t, weights.neg_slopes) if a is not None
    ]
    if rope is not None:
        operands += list(rope)
    sd = jax.ShapeDtypeStruct
    out_shape = [
        sd((leaf, b, d), dz_up.dtype),  # dz
        sd((leaf, b, f), acc),  # dhidden
        sd((leaf, b, d), dz_up.dtype),  # dx1
        sd((leaf, b, hk), acc),  # g
        sd((leaf, b, spec.n_heads), acc),  # delta
        sd((leaf, b, gk), acc),  # dk
        sd((leaf, b, gk), acc),  # dv
    ]
    need = vmem_bytes(operands, out_shape, leaf, b, hk, f, acc)
    kernel = functools.partial(
        _leaf_bwd_kernel, spec=spec, dtype=dtype, acc=acc, rope=rope is not None, gqa=gqa
    )
    vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
    return tuple(
        pl.pallas_call(
            kernel,
            in_specs=[vmem] * len(operands),
            out_specs=[vmem] * len(out_shape),
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(vmem_limit_bytes=vmem_limit(need)),
            cost_estimate=leaf_bwd_cost(leaf, b, d, f, spec, dtype, operands, out_shape),
            interpret=interpret,
            name="rt_leaf_backward",
        )(*operands)
    )


def fits(leaf: int, b: int, d: int, f: int, spec: LeafSpec, dtype, x_dtype, acc) -> bool:
    """Whether one call's VMEM (``vmem_bytes``, batch padded to 8) stays under VMEM_CAP_BYTES."""
    h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    hk, gk = h * kd, g * kd
    bp = -(-b // SUBLANES) * SUBLANES
    sd = jax.ShapeDtypeStruct
    ops = [
        sd((leaf, bp, hk), dtype),  # q
        sd((leaf, bp, h), acc),  # lse
        sd((3 * leaf, bp, d), x_dtype),  # dz_up, z, x1
        sd((leaf, bp, 3 * gk + f + hk), acc),  # k_pre, dk_cross, dv_cross, hidden_pre, att
        sd((2 * leaf, bp, gk), dtype),  # k, v
        sd((hk + 2 * f + 2 * gk, d), dtype),  # the five weight matrices
        sd((hk, h), acc),
    ]
    if g != h:
        ops += [sd((gk, hk), dtype), sd((hk, gk), acc)]
    if spec.position == "rope":
        ops += [sd((gk, gk), dtype), sd((2 * leaf, gk), acc)]
    outs = [sd((2 * leaf, bp, d), x_dtype), sd((leaf, bp, f + hk + h + 2 * gk), acc)]
    return vmem_bytes(ops, outs, leaf, bp, hk, f, acc) <= VMEM_CAP_BYTES
