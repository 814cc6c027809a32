"""``attention="flash"``: the platform's fused causal attention, behind the XLA one's signature.

On TPU, JAX's Pallas TPU flash attention (``jax.experimental.pallas.ops.tpu.flash_attention``),
with ALiBi (and, for queries at arbitrary positions, the causal mask) as its additive bias input
``ab``; RoPE is already applied to q and k by the block. GQA repeats the K/V heads (the kernel
wants equal head counts). N that is not a multiple of the kernel's 128-position block is padded
(padded keys are masked; padded query rows are dropped). With ``spec.interpret`` the same TPU
kernel runs in Pallas's TPU interpret mode on any platform (tests on CPU).

On GPU, ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (native GQA; ALiBi as its
bias in the compute dtype; bfloat16/float16 only).

The kernel is chosen when the program is lowered (``lax.platform_dependent``), so ahead-of-time
compiles for a TPU from this CPU get the TPU kernel. On any other platform (or float32 on
cuDNN) lowering raises ValueError naming ``attention``: no silent fallback to XLA.

Conventions match ``rt_jax.ops.transformer.causal_attention``: q arrives scaled by 1/sqrt(K)
(so the kernels' own scale is 1), softmax in float32, probabilities cast to the value dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.extend.core import Primitive
from jax.interpreters import mlir

from rt_jax.ops.block import AttentionSpec, attention_bias

BLOCK = 128
"""The TPU kernel's block (positions) along queries and keys; N is padded to a multiple."""

MASK_VALUE = float(tpu_flash.DEFAULT_MASK_VALUE)
"""A finite "minus infinity" for masked logits (the kernel's own): a fully masked row stays NaN-free."""


# --------------------------------------------------------------------------------------------
# Failing fast where no fused kernel exists: an op whose lowering raises.

_unavailable_p = Primitive("rt_flash_attention_unavailable")
_unavailable_p.def_impl(lambda x, *, reason: _raise(reason, "this backend"))
_unavailable_p.def_abstract_eval(lambda x, *, reason: x)


def _raise(reason: str, platform: str) -> None:
    raise ValueError(
        f"attention='flash' cannot run on {platform}: {reason}. Set ModelConfig.attention='xla', "
        "or interpret=True to run the TPU kernel in Pallas interpret mode (tests on CPU)"
    )


def _unavailable_lowering(ctx, x, *, reason):
    _raise(reason, "/".join(ctx.module_context.platforms))


mlir.register_lowering(_unavailable_p, _unavailable_lowering)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _unavailable(reason: str, q: jax.Array) -> jax.Array:
    return _unavailable_p.bind(q, reason=reason)


def _unavailable_fwd(reason: str, q: jax.Array) -> tuple[jax.Array, None]:
    return _unavailable(reason, q), None


def _unavailable_bwd(reason: str, _res: None, g: jax.Array) -> tuple[jax.Array]:
    return (_unavailable(reason, g),)


_unavailable.defvjp(_unavailable_fwd, _unavailable_bwd)


# --------------------------------------------------------------------------------------------
# The TPU kernel.


def _padded(n: int) -> int:
    return BLOCK * math.ceil(n / BLOCK)  # the backward kernels need whole 128-wide blocks


def _block_sizes(m: int, n: int) -> tpu_flash.BlockSizes:
    bq, bk = min(BLOCK, m), min(BLOCK, n)
    return tpu_flash.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )  # fmt: skip


def _interpreted(fn):
    """``fn`` with its forward and its backward traced under Pallas's TPU interpret mode."""

    def call(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def fwd(*args):
        with pltpu.force_tpu_interpret_mode():
            out, vjp = jax.vjp(fn, *args)
        return out, vjp

    def bwd(vjp, g):
        with pltpu.force_tpu_interpret_mode():
            return vjp(g)

    wrapped = jax.custom_vjp(call)
    wrapped.defvjp(fwd, bwd)
    return wrapped


def _tpu_attention(
    q_BxMxHxK: jax.Array,
    k_BxNxGxK: jax.Array,
    v_BxNxGxK: jax.Array,
    bias_HxMxN: jax.Array | None,
    causal: bool,
    interpret: bool,
) -> jax.Array:
    """Pallas TPU flash attention in the block's layout; ``bias`` already holds any mask."""
    b, m, h, kd = q_BxMxHxK.shape
    n, g = k_BxNxGxK.shape[1], k_BxNxGxK.shape[2]
    mp, np_ = (_padded(n), _padded(n)) if causal else (_padded(m), _padded(n))
    q = jnp.pad(q_BxMxHxK, ((0, 0), (0, mp - m), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    def heads(x: jax.Array) -> jax.Array:  # BxNxGxK -> BxHxNpxK, kv head g serving h = g*R + r
        x = jnp.pad(x, ((0, 0), (0, np_ - n), (0, 0), (0, 0)))
        return jnp.repeat(x, h // g, axis=2).transpose(0, 2, 1, 3)

    args = [q, heads(k_BxNxGxK), heads(v_BxNxGxK)]
    if bias_HxMxN is not None:
        fill = 0.0 if causal else MASK_VALUE  # causal: padded keys are past every real query
        bias = jnp.pad(bias_HxMxN.astype(jnp.float32), ((0, 0), (0, mp - m), (0, np_ - n)),
                       constant_values=fill)  # fmt: skip
        args.append(jnp.broadcast_to(bias[None], (b, h, mp, np_)))
    fn = functools.partial(
        tpu_flash.flash_attention, causal=causal, sm_scale=1.0, block_sizes=_block_sizes(mp, np_)
    )
    if interpret:
        fn = _interpreted(fn)
    out = fn(*args)
    return out[:, :, :m].transpose(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------
# The GPU kernel (cuDNN through jax.nn).

CUDNN_DTYPES = ("bfloat16", "float16")


def _gpu_visible() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _cudnn_attention(
    q_BxMxHxK: jax.Array,
    k_BxNxGxK: jax.Array,
    v_BxNxGxK: jax.Array,
    alibi_HxMxN: jax.Array | None,
    mask_MxN: jax.Array | None,
) -> jax.Array:
    """cuDNN fused attention (causal unless an explicit mask is given; native GQA)."""
    bias = None if alibi_HxMxN is None else alibi_HxMxN[None].astype(q_BxMxHxK.dtype)
    mask = None if mask_MxN is None else mask_MxN[None, None]
    return jax.nn.dot_product_attention(
        q_BxMxHxK, k_BxNxGxK, v_BxNxGxK, bias=bias, mask=mask, is_causal=mask is None,
        scale=1.0, implementation="cudnn",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------


def flash_causal_attention(
    q_BxMxHxK: jax.Array,
    k_BxNxGxK: jax.Array,
    v_BxNxGxK: jax.Array,
    spec: AttentionSpec,
    q_pos_M: jax.Array | None = None,
) -> jax.Array:
    """``causal_attention`` (q already scaled; keys at 0..N-1; queries at ``q_pos_M``, default
    0..N-1) by the platform's fused kernel. BxMxHxK in ``spec.dtype``."""
    if spec.compute_dtype == "float64":
        raise ValueError(
            "attention='flash' has no float64 kernel: set compute_dtype='float32'/'bfloat16' "
            "or attention='xla'"
        )
    dtype = spec.dtype
    q, k, v = (x.astype(dtype) for x in (q_BxMxHxK, k_BxNxGxK, v_BxNxGxK))
    m, n = q.shape[1], k.shape[1]
    causal = q_pos_M is None
    if causal and m != n:
        raise ValueError(f"causal attention without q_pos needs M == N, got M={m}, N={n}")
    k_pos = jnp.arange(n)
    q_pos = k_pos if causal else q_pos_M
    alibi = attention_bias(q_pos, k_pos, spec)  # HxMxN or None
    visible = None if causal else q_pos[:, None] >= k_pos[None, :]
    body = functools.partial(_dispatch, spec=spec, causal=causal)
    return _per_shard(body, spec, q, k, v, alibi, visible).astype(dtype)


HEAD_AXIS = "tensor"
"""The mesh axis that shards attention heads (``rt_jax.train.sharding``); every other mesh axis
is taken to shard the batch."""


def _per_shard(body, spec: AttentionSpec, q, k, v, alibi, visible) -> jax.Array:
    """``body`` as is, or inside ``jax.shard_map`` over the context's mesh: Mosaic and cuDNN
    calls cannot be partitioned automatically. Batch over the non-head axes, heads over
    ``HEAD_AXIS`` (when it divides the kv heads)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return body(q, k, v, alibi, visible)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    heads = HEAD_AXIS if sizes.get(HEAD_AXIS, 1) > 1 else None
    if heads is not None and spec.n_kv_heads % sizes[HEAD_AXIS]:
        heads = None  # replicate the heads: each shard computes all of them for its batch rows
    batch = tuple(a for a in mesh.axis_names if a != HEAD_AXIS and sizes[a] > 1) or None
    if batch is not None and q.shape[0] % math.prod(sizes[a] for a in batch):
        raise ValueError(
            f"attention='flash' under a mesh needs the batch ({q.shape[0]}) divisible by the "
            f"batch axes {batch} of mesh {sizes}: change the batch size or use attention='xla'"
        )
    P = jax.sharding.PartitionSpec
    qkv = P(batch, None, heads, None)
    specs = (qkv, qkv, qkv, None if alibi is None else P(heads), None if visible is None else P())
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(
        q, k, v, alibi, visible
    )


def _dispatch(q, k, v, alibi, visible, *, spec: AttentionSpec, causal: bool) -> jax.Array:
    """The fused kernel for the platform the program is lowered for (one shard's arrays)."""
    if spec.interpret:
        return _tpu_attention(q, k, v, _tpu_bias(alibi, visible), causal, True)

    def tpu(q, k, v, alibi, visible):
        return _tpu_attention(q, k, v, _tpu_bias(alibi, visible), causal, False)

    branches = {"tpu": tpu}
    if _gpu_visible():
        if spec.compute_dtype in CUDNN_DTYPES:
            branches["cuda"] = _cudnn_attention
        else:
            reason = f"cuDNN attention needs compute_dtype in {CUDNN_DTYPES}"
            branches["cuda"] = lambda q, *_: _unavailable(reason, q)
    else:
        branches["cuda"] = lambda q, *_: _unavailable("no GPU is visible to this process", q)

    def default(q, *_):
        return _unavailable("there is a fused kernel for TPU and CUDA GPUs only", q)

    return jax.lax.platform_dependent(q, k, v, alibi, visible, default=default, **branches)


def _tpu_bias(alibi_HxMxN: jax.Array | None, visible_MxN: jax.Array | None) -> jax.Array | None:
    """The TPU kernel's additive bias: ALiBi plus (for explicit query positions) the mask."""
    if visible_MxN is None:
        return alibi_HxMxN
    mask = jnp.where(visible_MxN, 0.0, np.float32(MASK_VALUE))[None]
    return mask if alibi_HxMxN is None else alibi_HxMxN + mask
