"""The tile contract the kernels implement, with its jnp reference (no dependency on rt_jax).

A tile joins a block of queries with a block of keys that lies entirely before it (no mask inside
a tile; ALiBi comes from the positions). Layout is head-major: queries and per-query state
B x H x T x K, keys/values B x G x S x K with G kv heads (query head h uses kv head h // R,
R = H // G); ``q`` is already scaled by 1/sqrt(K). Accumulation is float32 (float64 for float64).

* ``merge_block``: the forward online-softmax update of the queries' running (acc, max, den).
* ``block_grads``: (dq, dk, dv) of one tile given the queries' final log-sum-exp, the output
  gradient g and delta = <att, g>; probabilities are recomputed as P = exp(logits - lse).

``TileSpec`` is the little the kernels need to know about the layer. Any object with the same
attributes works (``rt_jax.ops.block.AttentionSpec`` has them), so the kernels import nothing
from the library that uses them. ``head_offset`` is the global index of the first local query
head: a head-sharded caller (``shard_map`` over heads) passes ``axis_index * H_local`` so ALiBi
slopes stay those of the global heads.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

POSITIONS = ("alibi", "rope", "none")


class TileSpecLike(Protocol):
    """What a kernel reads from its spec."""

    n_heads: int
    group_size: int
    position: str
    alibi_bias_max: float


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Global head count, query heads per kv head, position kind and ALiBi's bias maximum."""

    n_heads: int
    group_size: int = 1
    position: str = "alibi"
    alibi_bias_max: float = 8.0

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.group_size <= 0 or self.n_heads % self.group_size:
            raise ValueError(
                f"TileSpec(n_heads={self.n_heads}, group_size={self.group_size}): n_heads must be "
                "a positive multiple of group_size"
            )
        if self.position not in POSITIONS:
            raise ValueError(f"TileSpec.position={self.position!r}: expected one of {POSITIONS}")

    @classmethod
    def of(cls, spec: TileSpecLike) -> TileSpec:
        """The kernel-facing part of any spec-like object."""
        return cls(spec.n_heads, spec.group_size, spec.position, float(spec.alibi_bias_max))


class TileState(NamedTuple):
    """Running online-softmax state of a block of queries."""

    acc: jax.Array  # B x H x T x K: sum_s exp(logit_s - max) v_s
    max: jax.Array  # B x H x T
    den: jax.Array  # B x H x T: sum_s exp(logit_s - max)


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Accumulation dtype for inputs of ``dtype``."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def alibi_slopes(n_heads: int, bias_max: float) -> jax.Array:
    """Slope of head h (0-based): 2^(-(h + 1) * bias_max / n_heads) (float32)."""
    h = jnp.arange(1, n_heads + 1, dtype=jnp.float32)
    return jnp.exp2(-h * bias_max / n_heads)


def tile_logits(q_BxHxTxK, k_BxGxSxK, q_pos_T, k_pos_S, spec: TileSpecLike, head_offset=0):
    """Biased logits B x H x T x S in the accumulation dtype."""
    b, h, t, kd = q_BxHxTxK.shape
    g = k_BxGxSxK.shape[1]
    acc = acc_dtype(q_BxHxTxK.dtype)
    q = q_BxHxTxK.reshape(b, g, h // g, t, kd)
    logits = jnp.einsum("bgrtk,bgsk->bgrts", q, k_BxGxSxK, preferred_element_type=acc)
    logits = logits.reshape(b, h, t, -1)
    if spec.position == "alibi":
        slopes = jax.lax.dynamic_slice_in_dim(
            alibi_slopes(spec.n_heads, spec.alibi_bias_max), head_offset, h
        ).astype(acc)
        dist = (q_pos_T[:, None] - k_pos_S[None, :]).astype(acc)
        logits = logits - slopes[None, :, None, None] * dist[None, None]
    return logits


def _rep_heads(a_BxGxSxK, r: int, dtype):
    return jnp.repeat(a_BxGxSxK.astype(dtype), r, axis=1)


def merge_block(q, k, v, state, q_pos_T, k_pos_S, spec: TileSpecLike, head_offset=0) -> TileState:
    """Fold the tile's keys/values into the queries' online-softmax state."""
    acc_old, max_old, den_old = state
    logits = tile_logits(q, k, q_pos_T, k_pos_S, spec, head_offset)
    r = q.shape[1] // k.shape[1]
    new_max = jnp.maximum(max_old, logits.max(axis=-1))
    rescale = jnp.exp(max_old - new_max)
    p = jnp.exp(logits - new_max[..., None])
    pv = jnp.einsum("bhts,bhsk->bhtk", p, _rep_heads(v, r, p.dtype))
    return TileState(acc_old * rescale[..., None] + pv, new_max, den_old * rescale + p.sum(-1))


def block_grads(q, k, v, g, lse, delta, q_pos_T, k_pos_S, spec: TileSpecLike, head_offset=0):
    """(dq, dk, dv) of one tile: dv = P^T g, dS = P (g v^T - delta), dk = dS^T q, dq = dS k."""
    b, h, t, kd = q.shape
    n_kv = k.shape[1]
    r = h // n_kv
    acc = acc_dtype(q.dtype)
    p = jnp.exp(tile_logits(q, k, q_pos_T, k_pos_S, spec, head_offset) - lse[..., None])
    g = g.astype(acc)
    ds = p * (jnp.einsum("bhtk,bhsk->bhts", g, _rep_heads(v, r, acc)) - delta[..., None])
    dq = jnp.einsum("bhts,bhsk->bhtk", ds, _rep_heads(k, r, acc))
    dk = jnp.einsum("bhts,bhtk->bhsk", ds, q.astype(acc)).reshape(b, n_kv, r, -1, kd).sum(2)
    dv = jnp.einsum("bhts,bhtk->bhsk", p, g).reshape(b, n_kv, r, -1, kd).sum(2)
    return dq, dk, dv
