"""Mosaic TPU kernel for one leaf of the tiled RT forward: the L positions' pull steps in one call.

The tiled forward scans leaves; inside leaf i every position t (global i L + t) reads its
online-softmax state (acc, max, den: earlier leaves' Fenwick merges and the temporary self pair),
attends over the leaf's own earlier keys/values (k_s, v_s for s < t), finalises att_t, runs the
OLMo residual + MLP and the key/value projection of its output z_t, and writes (k_t, v_t) as the
leaf's next key row. The jnp version (``rt_jax.ops.tiled_forward``, ``position_step``) is ~30-40
small XLA fusions per position. This kernel runs all L positions in one call, with the state, the
leaf's keys/values and the weights (compute dtype) resident in VMEM for the whole leaf; the weights
are read from HBM once per call.

Layout (B padded to a sublane multiple by the caller; heads flattened into lanes, c = h K + k):
x L x B x D, q and acc L x B x HK, max/den L x B x H; outputs z L x B x D, lse L x B x H and the
leaf's k, v L x B x GK. The leaf's keys/values sit in float32 VMEM scratch L x B x HK, already
repeated to the H query heads (GQA: a 0/1 matrix Rep), so a query against its leaf's keys is an
elementwise product over full vregs followed by one matmul with the head-indicator matrix E
(HK x H): logits = (q_t * k_s) @ E. Probabilities go back to lanes with E^T, exactly (one nonzero
per column). For a bfloat16 model the products of two bf16 values are split into two bf16 halves
that hold them exactly, so the logits are the f32 sums of exact products, as in the reference's
bf16 x bf16 -> f32 matmul; float32 models use fp32 contraction precision.

Formulas (``rt_jax.ops.block``, OLMo style; the RT refuses NeoX):
    x1 = x + att @ w_o;  z = x1 + GELU(LN_ff(x1) @ w_ff_in) @ w_ff_out
    k = LN_k(LN_attn(z) @ w_k) (RoPE: rotated by its position), v = LN_attn(z) @ w_v
GELU is the exact one, written with erf (0.5 x (1 + erf(x / sqrt 2))): Mosaic lowers erf, not
erfc (what ``jax.nn.gelu`` uses); the two differ by float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

POSITIONS = ("alibi", "rope", "none")
SUBLANES = 8
VMEM_CAP_BYTES = 100 * 1024 * 1024
"""Most VMEM the leaf kernel asks for (v5e/v6e have 128 MiB); larger layers keep the jnp loop."""


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What the leaf kernel needs to know about the layer (global heads; OLMo block)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    position: str = "alibi"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LeafSpec(n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}): n_heads must "
                "be a positive multiple of n_kv_heads"
            )
        if self.position not in POSITIONS:
            raise ValueError(f"LeafSpec.position={self.position!r}: expected one of {POSITIONS}")

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads


class LeafWeights(NamedTuple):
    """One layer's weights as the kernel takes them: matrices in the compute dtype, norms 1 x X.

    ``rep`` (GK x HK, GQA only) repeats kv heads to query heads; ``rot`` (GK x GK, RoPE only)
    is rotate-half as a signed permutation; ``e`` (HK x H) sums each head's lanes; ``neg_slopes``
    (1 x 1 x H, ALiBi only) is -slope_h.
    """

    w_o: jax.Array
    w_ff_in: jax.Array
    w_ff_out: jax.Array
    w_k: jax.Array
    w_v: jax.Array
    attn_norm: jax.Array
    ff_norm: jax.Array
    k_norm: jax.Array
    e: jax.Array
    rep: jax.Array | None
    rot: jax.Array | None
    neg_slopes: jax.Array | None


def _acc_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def head_indicator(n_heads: int, head_dim: int, dtype) -> jax.Array:
    """E (HK x H): E[h K + k, h] = 1."""
    c = jnp.arange(n_heads * head_dim)[:, None] // head_dim
    return (c == jnp.arange(n_heads)[None, :]).astype(dtype)


def kv_repeat(n_heads: int, n_kv_heads: int, head_dim: int, dtype) -> jax.Array:
    """Rep (GK x HK): kv head g's lanes copied to those of its query heads h (h // R == g)."""
    r = n_heads // n_kv_heads
    src = jnp.arange(n_kv_heads * head_dim)
    dst = jnp.arange(n_heads * head_dim)
    same_k = (src[:, None] % head_dim) == (dst[None, :] % head_dim)
    same_g = (src[:, None] // head_dim) == (dst[None, :] // head_dim) // r
    return (same_k & same_g).astype(dtype)


def rotate_half(n_kv_heads: int, head_dim: int, rotary_dims: int, dtype) -> jax.Array:
    """P (GK x GK) with (k @ P)[g K + j] = -k[g K + j + r/2] (j < r/2), k[g K + j - r/2]
    (r/2 <= j < r), 0 (j >= r): rotate-half within each head's first r dims."""
    half = rotary_dims // 2
    c = jnp.arange(n_kv_heads * head_dim)
    j = c % head_dim
    src = c[:, None]
    dst = c[None, :]
    jd = j[None, :]
    minus = (jd < half) & (src == dst + half)
    plus = (jd >= half) & (jd < rotary_dims) & (src == dst - half)
    return jnp.where(minus, -1, jnp.where(plus, 1, 0)).astype(dtype)


def rope_tables(
    pos_L: jax.Array, n_kv_heads: int, head_dim: int, rotary_dims: int, theta: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin per lane (L x 1 x GK): the rotary angle of lane j of each head at each position
    (rotate-half convention, frequencies theta^(-i / (r/2))); cos 1, sin 0 past the rotary dims."""
    half = rotary_dims // 2
    freq = theta ** (-jnp.arange(half, dtype=dtype) / half)
    angle = pos_L.astype(dtype)[:, None] * freq[None, :]
    j = jnp.arange(head_dim)
    idx = jnp.where(j < half, j, j - half).clip(0, half - 1)
    live = j < rotary_dims
    cos = jnp.where(live, jnp.cos(angle)[:, idx], 1).astype(dtype)
    sin = jnp.where(live, jnp.sin(angle)[:, idx], 0).astype(dtype)
    tile = (1, n_kv_heads)
    return jnp.tile(cos, tile)[:, None, :], jnp.tile(sin, tile)[:, None, :]


def _layer_norm(x, weight, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * weight


def _gelu(x):
    return 0.5 * x * (1.0 + lax.erf(x * math.sqrt(0.5)))


def _mm(a, b, acc):
    """a @ b with accumulation in ``acc``."""
    return jnp.dot(a, b, preferred_element_type=acc)


def _select(a, m, acc):
    """a @ m for a 0/1 (or signed permutation) matrix m, exact: float32 operands get fp32
    contraction precision (one nonzero per column, so the result is a's entries)."""
    if a.dtype == jnp.float32:
        return jnp.dot(a, m, preferred_element_type=acc, precision=lax.Precision.HIGHEST)
    return jnp.dot(a, m, preferred_element_type=acc)


def _head_sums(prod, e, dtype, acc):
    """Per-head lane sums prod @ E (rows x H) of products of two ``dtype`` values."""
    if dtype == jnp.bfloat16:
        # a product of two bf16 values has <= 16 significant bits: two bf16 halves hold it
        # exactly, so two bf16 passes give the f32 sum of exact products.
        hi = prod.astype(jnp.bfloat16)
        lo = (prod - hi.astype(acc)).astype(jnp.bfloat16)
        eb = e.astype(jnp.bfloat16)
        return _mm(hi, eb, acc) + _mm(lo, eb, acc)
    return _select(prod, e.astype(prod.dtype), acc)


def _leaf_kernel(*refs, spec: LeafSpec, dtype, acc, rope: bool, gqa: bool):
    it = iter(refs)
    x_ref, q_ref, acc_ref, max_ref, den_ref = (next(it) for _ in range(5))
    wo, wfi, wfo, wk, wv, an, fn, kn, e_ref = (next(it) for _ in range(9))
    rep_ref = next(it) if gqa else None
    rot_ref = next(it) if rope else None
    slope_ref = next(it) if spec.position == "alibi" else None
    cos_ref, sin_ref = (next(it), next(it)) if rope else (None, None)
    z_ref, lse_ref, k_ref, v_ref = (next(it) for _ in range(4))
    kx_scr, vx_scr = next(it), next(it)

    leaf, b, hk = q_ref.shape
    h = spec.n_heads
    eps = spec.norm_eps
    kx_scr[...] = jnp.zeros(kx_scr.shape, acc)
    vx_scr[...] = jnp.zeros(vx_scr.shape, acc)
    e = e_ref[...]
    et = e.T
    s_idx = lax.broadcasted_iota(jnp.int32, (leaf, 1, 1), 0)

    def position(t, carry):
        q_t = q_ref[t].astype(acc)  # B x HK
        m_t, d_t = max_ref[t], den_ref[t]  # B x H
        # logits against the leaf's keys s < t (rows s >= t are zeros, masked to -inf)
        prod = q_t[None] * kx_scr[...]  # L x B x HK
        logits = _head_sums(prod.reshape(leaf * b, hk), e, dtype, acc).reshape(leaf, b, h)
        if slope_ref is not None:
            logits = logits + slope_ref[...] * (t - s_idx).astype(acc)
        logits = jnp.where(s_idx < t, logits, -jnp.inf)
        new_max = jnp.maximum(m_t, logits.max(axis=0))
        rescale = jnp.exp(m_t - new_max)
        prob = jnp.exp(logits - new_max[None])
        p_lanes = _select(prob.astype(dtype).reshape(leaf * b, h), et.astype(dtype), acc)
        pv = (p_lanes.reshape(leaf, b, hk) * vx_scr[...]).sum(axis=0)
        acc_t = acc_ref[t] * _select(rescale, et, acc) + pv
        den = d_t * rescale + prob.sum(axis=0)
        lse_ref[t] = new_max + jnp.log(den)
        att = (acc_t / _select(den, et, acc)).astype(dtype)
        # residual + MLP (OLMo)
        x_t = x_ref[t]
        x1 = x_t + _mm(att, wo[...], acc).astype(x_t.dtype)
        hn = _layer_norm(x1.astype(acc), fn[...].astype(acc), eps)
        hidden = _gelu(_mm(hn.astype(dtype), wfi[...], acc))
        z = x1 + _mm(hidden.astype(dtype), wfo[...], acc).astype(x_t.dtype)
        z_ref[t] = z
        # the persistent key/value pair of z_t
        zn = _layer_norm(z.astype(acc), an[...].astype(acc), eps).astype(dtype)
        k = _layer_norm(_mm(zn, wk[...], acc), kn[...].astype(acc), eps).astype(dtype)
        v = _mm(zn, wv[...], acc).astype(dtype)
        if rot_ref is not None:
            rot = _select(k, rot_ref[...], acc)
            k = (k.astype(acc) * cos_ref[t] + rot * sin_ref[t]).astype(dtype)
        k_ref[t] = k
        v_ref[t] = v
        if rep_ref is not None:
            kx_scr[t] = _select(k, rep_ref[...], acc)
            vx_scr[t] = _select(v, rep_ref[...], acc)
        else:
            kx_scr[t] = k.astype(acc)
            vx_scr[t] = v.astype(acc)
        return carry

    lax.fori_loop(0, leaf, position, 0)


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def leaf_cost(
    leaf: int, b: int, d: int, f: int, spec: LeafSpec, dtype, operands, outputs
) -> pl.CostEstimate:
    """FLOPs, transcendentals and HBM bytes of one call (every operand and output once).

    FLOPs count the matmuls as issued (the local attention runs over all L key rows of the
    leaf, masked; bf16 logits are two matmuls; a float32 selection matmul counts once, whatever
    its contraction precision) and the elementwise products of the local attention. Every matmul
    has B rows (the batch): the MXU runs them at most B/128 (v5e) full, which a FLOP count
    cannot show (docs/kernels.md).
    """
    h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    hk, gk = h * kd, g * kd
    spec_dtype_bf16 = jnp.dtype(dtype) == jnp.bfloat16
    weights = hk * d + d * f + f * d + 2 * d * gk
    per_pos = 2 * b * weights  # o-projection, MLP, k/v projection
    passes = 2 if spec_dtype_bf16 else 1  # bf16: the products' two halves, one matmul each
    per_pos += 2 * leaf * b * hk * h * (passes + 1)  # logits @ E, probabilities @ E^T
    per_pos += 2 * 2 * leaf * b * hk  # q * k, p * v (and the sum over s)
    per_pos += 2 * 2 * b * h * hk  # rescale and den back to lanes
    if spec.position == "rope":
        per_pos += 2 * b * gk * gk
    if g != h:
        per_pos += 2 * 2 * b * gk * hk
    trans = leaf * b * (leaf * h + 2 * h + f + 3)  # exp (logits, rescale), log, erf, rsqrt
    return pl.CostEstimate(
        flops=leaf * per_pos,
        transcendentals=trans,
        bytes_accessed=sum(_nbytes(a) for a in operands) + sum(_nbytes(a) for a in outputs),
    )


def vmem_bytes(operands, out_shapes, leaf: int, b: int, hk: int, f: int, acc) -> int:
    """VMEM one call holds: every operand and output (single-buffered), the two key/value
    scratch buffers and the largest temporaries (the L x B x HK products, the MLP hidden)."""
    a = jnp.dtype(acc).itemsize
    scratch = 2 * leaf * b * hk * a
    temps = 3 * leaf * b * hk * a + 2 * b * f * a
    held = sum(_nbytes(x) for x in operands) + sum(_nbytes(x) for x in out_shapes)
    return held + scratch + temps


def leaf_forward(
    x_LxBxD: jax.Array,
    q_LxBxHK: jax.Array,
    state: tuple[jax.Array, jax.Array, jax.Array],
    weights: LeafWeights,
    rope: tuple[jax.Array, jax.Array] | None,
    spec: LeafSpec,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """All L positions of one leaf: (z L x B x D, lse L x B x H, k and v L x B x GK).

    ``state`` = (acc L x B x HK, max L x B x H, den L x B x H), float32 (float64 in interpret
    mode); ``q`` scaled and rotated, compute dtype; ``rope`` the (cos, sin) tables of the leaf's
    positions (``rope_tables``) when ``spec.position == "rope"``. B must be a multiple of 8.
    """
    leaf, b, d = x_LxBxD.shape
    hk = q_LxBxHK.shape[2]
    gk = spec.n_kv_heads * spec.head_dim
    f = weights.w_ff_in.shape[1]
    dtype = q_LxBxHK.dtype
    acc = state[0].dtype
    if b % SUBLANES:
        raise ValueError(f"leaf_forward needs a batch that is a multiple of {SUBLANES}, got {b}")
    if (spec.position == "rope") != (rope is not None):
        raise ValueError("leaf_forward: pass the rope tables exactly when spec.position='rope'")
    gqa = weights.rep is not None
    operands = [x_LxBxD, q_LxBxHK, *state, *weights[:9]]
    operands += [a for a in (weights.rep, weights.rot, weights.neg_slopes) if a is not None]
    if rope is not None:
        operands += list(rope)
    out_shape = [
        jax.ShapeDtypeStruct((leaf, b, d), x_LxBxD.dtype),
        jax.ShapeDtypeStruct((leaf, b, spec.n_heads), acc),
        jax.ShapeDtypeStruct((leaf, b, gk), dtype),
        jax.ShapeDtypeStruct((leaf, b, gk), dtype),
    ]
    need = vmem_bytes(operands, out_shape, leaf, b, hk, f, acc)
    kernel = functools.partial(
        _leaf_kernel, spec=spec, dtype=dtype, acc=acc, rope=rope is not None, gqa=gqa
    )
    vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
    return tuple(
        pl.pallas_call(
            kernel,
            in_specs=[vmem] * len(operands),
            out_specs=[vmem] * 4,
            out_shape=out_shape,
            scratch_shapes=[pltpu.VMEM((leaf, b, hk), acc)] * 2,
            compiler_params=pltpu.CompilerParams(vmem_limit_bytes=vmem_limit(need)),
            cost_estimate=leaf_cost(leaf, b, d, f, spec, dtype, operands, out_shape),
            interpret=interpret,
            name="rt_leaf_forward",
        )(*operands)
    )


def vmem_limit(need: int) -> int:
    """The scoped VMEM limit for a call holding ``need`` bytes: +25% and 8 MiB slack, capped."""
    return min(VMEM_CAP_BYTES, need + need // 4 + (8 << 20))


def fits(leaf: int, b: int, d: int, f: int, spec: LeafSpec, dtype, x_dtype, acc) -> bool:
    """Whether one call's VMEM (``vmem_bytes``, batch padded to 8) stays under VMEM_CAP_BYTES."""
    h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    hk, gk = h * kd, g * kd
    bp = -(-b // SUBLANES) * SUBLANES
    sd = jax.ShapeDtypeStruct
    ops = [
        sd((leaf, bp, d), x_dtype),
        sd((leaf, bp, hk), dtype),
        sd((leaf, bp, hk), acc),
        sd((leaf, bp, h), acc),
        sd((leaf, bp, h), acc),
        sd((hk + 2 * f + 2 * gk, d), dtype),  # w_o, w_ff_in, w_ff_out, w_k, w_v
        sd((hk, h), acc),
    ]
    if g != h:
        ops.append(sd((gk, hk), dtype))
    if spec.position == "rope":
        ops += [sd((gk, gk), dtype), sd((2 * leaf, gk), acc)]
    outs = [sd((leaf, bp, d), x_dtype), sd((leaf, bp, h), acc), sd((2 * leaf, bp, gk), dtype)]
    return vmem_bytes(ops, outs, leaf, bp, hk, f, acc) <= VMEM_CAP_BYTES
