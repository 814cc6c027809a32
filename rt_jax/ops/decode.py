"""One layer of autoregressive decoding with a KV cache, for both block types, as pure functions.

Prefill runs a whole layer over the prompt in parallel (any implementation of the layer) and returns
the pairs to cache: for a Recurrent Transformer layer the *persistent* pairs
``kv_projection(z)`` of the layer's outputs, for a Transformer layer the usual pairs of its inputs.

A decode step moves one new position t (per sequence; positions may differ across the batch) through
one layer. Both block types do the same thing with a different pair to append:

    q_t, k_t^x, v_t^x = pre_attention(x_t)                      # from the layer input
    att_t = Attn(cached pairs s < t, (k_t^x, v_t^x), q_t)        # the self pair is always separate
    z_t   = post_attention(x_t, att_t)
    append  (k_t^x, v_t^x)          Transformer: the self pair is the cached pair
            kv_projection(z_t)      Recurrent Transformer: one extra D -> 2 G K projection

Every projection, norm and the MLP are the functions of ``rt_jax.ops.block`` that the forward uses,
so decoding and the forward cannot drift apart. The cache of one layer is head-major,
B x G x S x K (G kv heads: GQA caches only the kv heads); entries s >= t are masked, so right-padded
garbage and unused slots are never read.
"""

from __future__ import annotations

from collections.abc import Callable

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

LayerFn = Callable[[Params, jax.Array, AttentionSpec], jax.Array]


def prefill_layer(
    params: Params,
    x_BxNxD: jax.Array,
    layer_fn: LayerFn,
    spec: AttentionSpec,
    *,
    recurrent: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Layer output z (BxNxD) and the pairs to cache, k and v of shape BxGxNxK (head-major)."""
    z_BxNxD = layer_fn(params, x_BxNxD, spec)
    pos_N = jnp.arange(x_BxNxD.shape[1])
    k, v = kv_projection(params, z_BxNxD if recurrent else x_BxNxD, pos_N, spec)
    return z_BxNxD, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def cached_attention(
    q_BxHxK: jax.Array,
    k_cache_BxGxSxK: jax.Array,
    v_cache_BxGxSxK: jax.Array,
    k_self_BxGxK: jax.Array,
    v_self_BxGxK: jax.Array,
    pos_B: jax.Array,
    spec: AttentionSpec,
) -> jax.Array:
    """Attention of one query per sequence over cached pairs s < pos plus its self pair. BxHxK.

    The query is already scaled; ALiBi adds -slope * (t - s) to cached logits and 0 to the self
    logit (its diagonal); the softmax runs in float32 (float64 for float64 inputs).
    """
    b, h, kd = q_BxHxK.shape
    s_len = k_cache_BxGxSxK.shape[2]
    acc = jnp.float64 if q_BxHxK.dtype == jnp.float64 else jnp.float32
    q = group_queries(q_BxHxK[:, None], spec)[:, 0]  # BxGxRxK
    logits = jnp.einsum("bgrk,bgsk->bgrs", q, k_cache_BxGxSxK, preferred_element_type=acc)
    self_logit = jnp.einsum("bgrk,bgk->bgr", q, k_self_BxGxK, preferred_element_type=acc)
    s_pos = jnp.arange(s_len)
    if spec.position == "alibi":
        slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).reshape(
            spec.n_kv_heads, spec.group_size
        )
        dist_BxS = (pos_B[:, None] - s_pos[None, :]).astype(acc)
        logits = logits - slopes[None, :, :, None].astype(acc) * dist_BxS[:, None, None, :]
    valid_BxS = s_pos[None, :] < pos_B[:, None]
    logits = jnp.where(valid_BxS[:, None, None, :], logits, -jnp.inf)
    m = jnp.maximum(jnp.max(logits, axis=-1), self_logit)  # finite: the self logit always counts
    p = jnp.exp(logits - m[..., None])
    p_self = jnp.exp(self_logit - m)
    den = jnp.sum(p, axis=-1) + p_self
    att = jnp.einsum(
        "bgrs,bgsk->bgrk",
        p.astype(v_cache_BxGxSxK.dtype),
        v_cache_BxGxSxK,
        preferred_element_type=acc,
    )
    att = (att + p_self[..., None] * v_self_BxGxK[:, :, None, :].astype(acc)) / den[..., None]
    return att.reshape(b, h, kd).astype(spec.dtype)


def decode_layer(
    params: Params,
    x_BxD: jax.Array,
    k_cache_BxGxSxK: jax.Array,
    v_cache_BxGxSxK: jax.Array,
    pos_B: jax.Array,
    spec: AttentionSpec,
    *,
    recurrent: bool,
    qkv: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] = pre_attention,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new position per sequence through one layer: (z_BxD, k_new_BxGxK, v_new_BxGxK).

    ``pos_B`` is each sequence's position t (also the number of valid cache entries). The caller
    writes the returned pair at index t of the cache. ``qkv(params, x_1xBxD, pos_B, spec)`` makes
    the queries and the self pair (default ``pre_attention``; LRT passes its memory-mixed one, so
    both families decode through this one function).
    """
    # The batch plays the role of the position axis here, so each row gets its own position.
    x_1xBxD = x_BxD[None]
    q, k_self, v_self = qkv(params, x_1xBxD, pos_B, spec)  # 1xBxHxK, 1xBxGxK
    att_BxHxK = cached_attention(
        q[0], k_cache_BxGxSxK, v_cache_BxGxSxK, k_self[0], v_self[0], pos_B, spec
    )
    z_1xBxD = post_attention(params, x_1xBxD, att_BxHxK[None], spec)
    if recurrent:
        k_new, v_new = kv_projection(params, z_1xBxD, pos_B, spec)
    else:
        k_new, v_new = k_self, v_self
    return z_1xBxD[0], k_new[0], v_new[0]
