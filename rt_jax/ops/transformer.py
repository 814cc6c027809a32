"""The baseline causal Transformer layer with the same parameters as the Recurrent Transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    attention_bias,
    group_queries,
    post_attention,
    pre_attention,
)
from rt_jax.ops.flash_attention import flash_causal_attention


def causal_attention(
    q_BxMxHxK: jax.Array,
    k_BxNxGxK: jax.Array,
    v_BxNxGxK: jax.Array,
    spec: AttentionSpec,
    q_pos_M: jax.Array | None = None,
) -> jax.Array:
    """Causal softmax attention (q already scaled) with the spec's bias; float32 softmax. BxMxHxK.

    Keys sit at positions 0..N-1; queries at ``q_pos_M`` (default 0..N-1, M = N) see keys at
    positions <= their own. ``spec.attention="flash"`` runs the platform's fused kernel instead
    (``rt_jax.ops.flash_attention``); this einsum form is its reference.
    """
    if spec.attention == "flash":
        return flash_causal_attention(q_BxMxHxK, k_BxNxGxK, v_BxNxGxK, spec, q_pos_M)
    b, m, h, kd = q_BxMxHxK.shape
    n = k_BxNxGxK.shape[1]
    acc = jnp.float64 if q_BxMxHxK.dtype == jnp.float64 else jnp.float32
    q = group_queries(q_BxMxHxK, spec)
    logits = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxNxGxK, preferred_element_type=acc)
    k_pos = jnp.arange(n)
    q_pos = k_pos if q_pos_M is None else q_pos_M
    bias = attention_bias(q_pos, k_pos, spec)
    if bias is not None:
        logits = logits + bias.reshape(spec.n_kv_heads, spec.group_size, m, n).astype(acc)
    logits = jnp.where(q_pos[:, None] >= k_pos[None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxNxGxK.dtype)
    att = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxNxGxK, preferred_element_type=acc)
    return att.reshape(b, m, h, kd).astype(spec.dtype)


def transformer_layer(params: Params, x_BxNxD: jax.Array, spec: AttentionSpec) -> jax.Array:
    """One pre-norm Transformer layer (causal attention + MLP). Returns BxNxD."""
    pos_N = jnp.arange(x_BxNxD.shape[1])
    q, k, v = pre_attention(params, x_BxNxD, pos_N, spec)
    return post_attention(params, x_BxNxD, causal_attention(q, k, v, spec), spec)
