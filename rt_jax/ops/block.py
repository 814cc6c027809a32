"""Per-position pieces of a Transformer / Recurrent Transformer layer, as pure functions.

Two block styles (``AttentionSpec.block_style``). ``"olmo"`` (the default; the reference code's
OLMo block, pre-norm, sequential residual, shared by both block types):

    h      = LN_attn(x)
    q      = LN_q(h @ w_q)                       # QK-norm over the full q vector, then head split
    k, v   = split(h @ w_kv);  k = LN_k(k)       # V is not normalised
    x'     = x + att @ w_o
    z      = x' + GELU(LN_ff(x') @ w_ff_in) @ w_ff_out

``"neox"`` (GPT-NeoX / Pythia, the MeSH paper's backbone): parallel residual, biases on every
projection, LayerNorms with a bias, no QK-norm:

    q      = LN_attn(x) @ w_q + b_q;   k, v = split(LN_attn(x) @ w_kv + b_kv)
    z      = x + (att @ w_o + b_o) + GELU(LN_ff(x) @ w_ff_in + b_ff_in) @ w_ff_out + b_ff_out

With ``position="rope"`` the rotary embedding turns the first ``rotary_dims`` =
int(head_dim * rotary_pct) dimensions of every head (rotate-half within them; Pythia: 0.25) and
passes the rest through, in either style.

A Transformer layer attends with (q_t, k_s, v_s) for s <= t, all from the layer input. A Recurrent
Transformer layer uses a *temporary* pair (k_t, v_t) from x_t for s = t, and *persistent* pairs from
the layer's own output, ``kv_projection(params, z_s)``, for s < t.

Shapes are named in the variables: B batch, N positions, D width, H query heads, G kv heads,
K head dim, F MLP width. Layer norms run in float32; matmuls in ``spec.compute_dtype`` with float32
accumulation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, jax.Array]
"""One layer's parameters: the keys of ``PARAM_SHAPES``."""

POSITION_KINDS = ("alibi", "rope", "none")
BLOCK_STYLES = ("olmo", "neox")
DTYPES = ("float32", "bfloat16", "float64")
ATTENTIONS = ("xla", "flash")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static description of one layer's attention (hashable, so it can be a jit static arg)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    position: str = "alibi"
    alibi_bias_max: float = 8.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    compute_dtype: str = "float32"
    attention: str = "xla"  # causal attention: "xla" (einsums) or "flash" (fused kernel)
    interpret: bool = False  # attention="flash": run the TPU kernel in Pallas interpret mode
    block_style: str = "olmo"  # "olmo" (pre-norm, QK-norm) or "neox" (parallel residual, biases)
    rotary_pct: float = 1.0  # position="rope": fraction of each head's dims that rotate

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.n_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"heads and head_dim must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "choose n_kv_heads that divides n_heads"
            )
        if self.position not in POSITION_KINDS:
            raise ValueError(f"position={self.position!r}: expected one of {POSITION_KINDS}")
        if self.block_style not in BLOCK_STYLES:
            raise ValueError(f"block_style={self.block_style!r}: expected one of {BLOCK_STYLES}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct!r}: expected a fraction in (0, 1]")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.position == "rope" and (self.rotary_dims < 2 or self.rotary_dims % 2):
            raise ValueError(
                f"RoPE needs an even number >= 2 of rotary dims; int(head_dim={self.head_dim} * "
                f"rotary_pct={self.rotary_pct}) = {self.rotary_dims}: change rotary_pct or the heads"
            )
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: expected one of {DTYPES}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTIONS}")

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head the rotary embedding turns: int(head_dim * rotary_pct)."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def neox(self) -> bool:
        """Whether this is the GPT-NeoX block (parallel residual, biases, no QK-norm)."""
        return self.block_style == "neox"

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def dtype(self) -> jnp.dtype:
        """The matmul dtype."""
        return jnp.dtype(self.compute_dtype)


def param_shapes(d_model: int, mlp_hidden: int, spec: AttentionSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters (identical for both block types; by block style)."""
    q_dim = spec.n_heads * spec.head_dim
    kv_dim = spec.n_kv_heads * spec.head_dim
    if spec.neox:
        return {
            "attn_norm": (d_model,),
            "attn_norm_bias": (d_model,),
            "w_q": (d_model, q_dim),
            "b_q": (q_dim,),
            "w_kv": (d_model, 2 * kv_dim),
            "b_kv": (2 * kv_dim,),
            "w_o": (q_dim, d_model),
            "b_o": (d_model,),
            "ff_norm": (d_model,),
            "ff_norm_bias": (d_model,),
            "w_ff_in": (d_model, mlp_hidden),
            "b_ff_in": (mlp_hidden,),
            "w_ff_out": (mlp_hidden, d_model),
            "b_ff_out": (d_model,),
        }
    return {
        "attn_norm": (d_model,),
        "w_q": (d_model, q_dim),
        "q_norm": (q_dim,),
        "w_kv": (d_model, 2 * kv_dim),
        "k_norm": (kv_dim,),
        "w_o": (q_dim, d_model),
        "ff_norm": (d_model,),
        "w_ff_in": (d_model, mlp_hidden),
        "w_ff_out": (mlp_hidden, d_model),
    }


def layer_norm(
    x: jax.Array, weight: jax.Array, eps: float, bias: jax.Array | None = None
) -> jax.Array:
    """LayerNorm with a learnable weight (and optional bias), in float32 (float64 stays float64)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(acc)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    out = (x - mean) * jax.lax.rsqrt(var + eps) * weight.astype(acc)
    return out if bias is None else out + bias.astype(acc)


def _norm(params: Params, name: str, x: jax.Array, spec: AttentionSpec) -> jax.Array:
    """The block's LayerNorm ``name`` (with its ``name_bias`` in the NeoX style)."""
    bias = params[f"{name}_bias"] if spec.neox else None
    return layer_norm(x, params[name], spec.norm_eps, bias)


def _linear(params: Params, x: jax.Array, name: str, spec: AttentionSpec) -> jax.Array:
    """x @ w_name (+ b_name in the NeoX style), float32 accumulation."""
    out = _matmul(x, params[f"w_{name}"], spec.dtype)
    return out + params[f"b_{name}"].astype(out.dtype) if spec.neox else out


def _matmul(x: jax.Array, w: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ w in ``dtype`` with float32 accumulation (float64 stays float64)."""
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=acc)


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> jax.Array:
    """ALiBi slopes 2^(-(h+1) * max / H) for h = 0..H-1 (the reference code's definition)."""
    h = jnp.arange(1, n_heads + 1, dtype=jnp.float32)
    return jnp.exp2(-h * alibi_bias_max / n_heads)


def attention_bias(q_pos: jax.Array, k_pos: jax.Array, spec: AttentionSpec) -> jax.Array | None:
    """Additive logit bias of shape (H, Nq, Nk) for ALiBi (-slope * |t - s|), else None."""
    if spec.position != "alibi":
        return None
    dist = jnp.abs(q_pos[:, None] - k_pos[None, :]).astype(jnp.float32)
    return -alibi_slopes(spec.n_heads, spec.alibi_bias_max)[:, None, None] * dist[None]


def apply_rope(
    x_BxNxHxK: jax.Array, pos_N: jax.Array, theta: float, rotary_dims: int | None = None
) -> jax.Array:
    """Rotary embedding (rotate-half convention) of each vector by its own position, on the first
    ``rotary_dims`` dimensions of each head (None = all); the rest pass through."""
    r = x_BxNxHxK.shape[-1] if rotary_dims is None else rotary_dims
    half = r // 2
    acc = jnp.promote_types(x_BxNxHxK.dtype, jnp.float32)  # float32, or float64 for float64 input
    freq = theta ** (-jnp.arange(half, dtype=acc) / half)
    angle = pos_N.astype(acc)[:, None] * freq[None, :]  # N x r/2
    cos = jnp.cos(angle)[None, :, None, :]
    sin = jnp.sin(angle)[None, :, None, :]
    x = x_BxNxHxK.astype(acc)
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BxNxHxK.dtype)


def _split_heads(x_BxNxE: jax.Array, n: int) -> jax.Array:
    b, t, e = x_BxNxE.shape
    return x_BxNxE.reshape(b, t, n, e // n)


def kv_projection(
    params: Params, y_BxNxD: jax.Array, pos_N: jax.Array, spec: AttentionSpec
) -> tuple[jax.Array, jax.Array]:
    """Keys and values of positions whose (input or output) state is y: k, v of shape BxNxGxK.

    Used for the Transformer's keys, the RT temporary pair (y = x) and the RT persistent pair
    (y = z): the same attn_norm, w_kv and k_norm in every case.
    """
    dtype = spec.dtype
    kv = _linear(params, _norm(params, "attn_norm", y_BxNxD, spec), "kv", spec)
    kv_dim = spec.n_kv_heads * spec.head_dim
    k = kv[..., :kv_dim]
    if not spec.neox:
        k = layer_norm(k, params["k_norm"], spec.norm_eps)
    v = kv[..., kv_dim:].astype(dtype)
    k = _split_heads(k.astype(dtype), spec.n_kv_heads)
    v = _split_heads(v, spec.n_kv_heads)
    if spec.position == "rope":
        k = apply_rope(k, pos_N, spec.rope_theta, spec.rotary_dims)
    return k, v


def query_projection(
    params: Params, x_BxNxD: jax.Array, pos_N: jax.Array, spec: AttentionSpec
) -> jax.Array:
    """Queries BxNxHxK, already multiplied by 1/sqrt(head_dim)."""
    dtype = spec.dtype
    q = _linear(params, _norm(params, "attn_norm", x_BxNxD, spec), "q", spec)
    if not spec.neox:
        q = layer_norm(q, params["q_norm"], spec.norm_eps)
    q = _split_heads(q, spec.n_heads)
    if spec.position == "rope":
        q = apply_rope(q, pos_N, spec.rope_theta, spec.rotary_dims)
    return (q * (1.0 / math.sqrt(spec.head_dim))).astype(dtype)


def pre_attention(
    params: Params, x_BxNxD: jax.Array, pos_N: jax.Array, spec: AttentionSpec
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v) from the layer input: q BxNxHxK (scaled), k and v BxNxGxK."""
    q = query_projection(params, x_BxNxD, pos_N, spec)
    k, v = kv_projection(params, x_BxNxD, pos_N, spec)
    return q, k, v


def post_attention(
    params: Params, x_BxNxD: jax.Array, att_BxNxHxK: jax.Array, spec: AttentionSpec
) -> jax.Array:
    """Layer output; float32 like the residual. OLMo: z = x' + MLP(LN_ff(x')) with
    x' = x + att @ w_o. NeoX (parallel): z = x + (att @ w_o + b_o) + MLP(LN_ff(x))."""
    b, t, h, k = att_BxNxHxK.shape
    attn_out = _linear(params, att_BxNxHxK.reshape(b, t, h * k), "o", spec).astype(x_BxNxD.dtype)
    x1 = x_BxNxD + attn_out
    hidden = _linear(
        params, _norm(params, "ff_norm", x_BxNxD if spec.neox else x1, spec), "ff_in", spec
    )
    hidden = jax.nn.gelu(hidden, approximate=False)
    return x1 + _linear(params, hidden, "ff_out", spec).astype(x_BxNxD.dtype)


def group_queries(q_BxNxHxK: jax.Array, spec: AttentionSpec) -> jax.Array:
    """Reshape queries to BxNxGxRxK (R = query heads per kv head) for GQA-aware einsums."""
    b, t, _, k = q_BxNxHxK.shape
    return q_BxNxHxK.reshape(b, t, spec.n_kv_heads, spec.group_size, k)
