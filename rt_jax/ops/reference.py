"""Token-by-token Recurrent Transformer layer: the oracle every fast path is tested against.

A ``lax.scan`` over positions t carries the persistent K/V buffer. At step t the query attends to the
persistent pairs of positions s < t (from this layer's outputs) and to its own temporary pair (from
its input), then the residual + MLP gives z_t, and kv_projection(z_t) is written into the buffer.
Memory and traffic are O(N^2); differentiate it with plain ``jax.grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    alibi_slopes,
    group_queries,
    kv_projection,
    post_attention,
    pre_attention,
)


def recurrent_layer_reference(params: Params, x_BxNxD: jax.Array, spec: AttentionSpec) -> jax.Array:
    """One RT layer, sequential over positions. Returns z (BxNxD, dtype of x)."""
    b, n, d = x_BxNxD.shape
    pos_N = jnp.arange(n)
    q, k_tmp, v_tmp = pre_attention(params, x_BxNxD, pos_N, spec)
    q = group_queries(q, spec)  # BxNxGxRxK
    acc = jnp.float64 if x_BxNxD.dtype == jnp.float64 else jnp.float32
    slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).reshape(
        spec.n_kv_heads, spec.group_size
    )
    k_buf = jnp.zeros((n, b, spec.n_kv_heads, spec.head_dim), k_tmp.dtype)
    v_buf = jnp.zeros_like(k_buf)

    def step(carry, inputs):
        k_buf, v_buf = carry
        t, x_t, q_t, k_tmp_t, v_tmp_t = inputs  # x_t BxD, q_t BxGxRxK, k_tmp_t BxGxK
        logits = jnp.einsum("bgrk,sbgk->bgrs", q_t, k_buf, preferred_element_type=acc)
        self_logit = jnp.einsum("bgrk,bgk->bgr", q_t, k_tmp_t, preferred_element_type=acc)
        if spec.position == "alibi":
            dist = (t - jnp.arange(n)).astype(acc)
            logits = logits - slopes[None, :, :, None].astype(acc) * dist
        logits = jnp.where(jnp.arange(n) < t, logits, -jnp.inf)
        all_logits = jnp.concatenate([logits, self_logit[..., None]], axis=-1)
        probs = jax.nn.softmax(all_logits, axis=-1)
        att = jnp.einsum("bgrs,sbgk->bgrk", probs[..., :n], v_buf.astype(acc))
        att = att + probs[..., n, None] * v_tmp_t[:, :, None, :].astype(acc)
        att = att.reshape(b, 1, spec.n_heads, spec.head_dim).astype(spec.dtype)
        z_t = post_attention(params, x_t[:, None], att, spec)
        k_t, v_t = kv_projection(params, z_t, t[None], spec)
        k_buf = k_buf.at[t].set(k_t[:, 0])
        v_buf = v_buf.at[t].set(v_t[:, 0])
        return (k_buf, v_buf), z_t[:, 0]

    inputs = (pos_N,) + tuple(jnp.swapaxes(a, 0, 1) for a in (x_BxNxD, q, k_tmp, v_tmp))
    _, z_NxBxD = jax.lax.scan(step, (k_buf, v_buf), inputs)
    return jnp.swapaxes(z_NxBxD, 0, 1)
