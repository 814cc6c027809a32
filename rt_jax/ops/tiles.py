"""Tile operations of the tiled schedule: the contract between the scan and its kernels.

Every tile joins a block of queries with a block of keys that lies *entirely before* it (no mask
inside a tile; the ALiBi bias comes from the positions). Layout is head-major, the usual one for
attention kernels: queries and per-query state B x H x T x K, keys and values B x G x S x K with
G kv heads (H = G * R; query head h uses kv head h // R). ``q`` is already scaled by 1/sqrt(K).

* ``merge_block``: the forward online-softmax update of the queries' running state.
* ``block_grads``: the backward contribution of one tile given the queries' final log-sum-exp,
  the attention-output gradient g and delta = <att, g>.

These jnp versions are the references; ``pallas_kernels`` provides drop-in kernels with the same
signatures. A ``TileOps`` pair is what ``recurrent_layer_tiled`` takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rt_jax.ops.block import AttentionSpec, alibi_slopes


class SoftmaxState(NamedTuple):
    """Running online-softmax state of a block of queries (float32)."""

    acc: jax.Array  # B x H x T x K: sum_s exp(logit_s - max) v_s
    max: jax.Array  # B x H x T
    den: jax.Array  # B x H x T: sum_s exp(logit_s - max)


def _acc_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def tile_logits(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: AttentionSpec,
) -> jax.Array:
    """Biased logits B x H x T x S (float32, or float64 for float64 inputs)."""
    b, h, t, kd = q_BxHxTxK.shape
    g = k_BxGxSxK.shape[1]
    acc = _acc_dtype(q_BxHxTxK)
    q = q_BxHxTxK.reshape(b, g, h // g, t, kd)
    logits = jnp.einsum("bgrtk,bgsk->bgrts", q, k_BxGxSxK, preferred_element_type=acc)
    logits = logits.reshape(b, h, t, -1)
    if spec.position == "alibi":
        dist = (q_pos_T[:, None] - k_pos_S[None, :]).astype(acc)
        slopes = alibi_slopes(spec.n_heads, spec.alibi_bias_max).astype(acc)
        logits = logits - slopes[None, :, None, None] * dist[None, None]
    return logits


def _weighted_values(p_BxHxTxS: jax.Array, v_BxGxSxK: jax.Array) -> jax.Array:
    b, h, t, s = p_BxHxTxS.shape
    g = v_BxGxSxK.shape[1]
    p = p_BxHxTxS.reshape(b, g, h // g, t, s)
    out = jnp.einsum("bgrts,bgsk->bgrtk", p, v_BxGxSxK.astype(p.dtype))
    return out.reshape(b, h, t, -1)


def merge_block(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    state: SoftmaxState,
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: AttentionSpec,
) -> SoftmaxState:
    """Add the keys/values of an earlier block into the queries' online-softmax state."""
    logits = tile_logits(q_BxHxTxK, k_BxGxSxK, q_pos_T, k_pos_S, spec)
    new_max = jnp.maximum(state.max, logits.max(axis=-1))
    rescale = jnp.exp(state.max - new_max)
    p = jnp.exp(logits - new_max[..., None])
    acc = state.acc * rescale[..., None] + _weighted_values(p, v_BxGxSxK)
    den = state.den * rescale + p.sum(axis=-1)
    return SoftmaxState(acc, new_max, den)


def block_grads(
    q_BxHxTxK: jax.Array,
    k_BxGxSxK: jax.Array,
    v_BxGxSxK: jax.Array,
    g_BxHxTxK: jax.Array,
    lse_BxHxT: jax.Array,
    delta_BxHxT: jax.Array,
    q_pos_T: jax.Array,
    k_pos_S: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient contributions (dq, dk, dv) of one tile, probabilities recomputed from lse.

    With P = exp(logits - lse): dv = P^T g, dS = P * (g v^T - delta), dk = dS^T q, dq = dS k.
    Returns float32 (float64 for float64 inputs) dq B x H x T x K, dk and dv B x G x S x K.
    """
    b, h, t, kd = q_BxHxTxK.shape
    g_heads = k_BxGxSxK.shape[1]
    r = h // g_heads
    acc = _acc_dtype(q_BxHxTxK)
    p = jnp.exp(tile_logits(q_BxHxTxK, k_BxGxSxK, q_pos_T, k_pos_S, spec) - lse_BxHxT[..., None])
    p5 = p.reshape(b, g_heads, r, t, -1)
    g5 = g_BxHxTxK.astype(acc).reshape(b, g_heads, r, t, kd)
    q5 = q_BxHxTxK.astype(acc).reshape(b, g_heads, r, t, kd)
    dv = jnp.einsum("bgrts,bgrtk->bgsk", p5, g5)
    dp = jnp.einsum("bgrtk,bgsk->bgrts", g5, v_BxGxSxK.astype(acc))
    ds = p5 * (dp - delta_BxHxT.reshape(b, g_heads, r, t)[..., None])
    dk = jnp.einsum("bgrts,bgrtk->bgsk", ds, q5)
    dq = jnp.einsum("bgrts,bgsk->bgrtk", ds, k_BxGxSxK.astype(acc)).reshape(b, h, t, kd)
    return dq, dk, dv


MergeFn = Callable[..., SoftmaxState]
GradFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TileOps:
    """The two tile operations a tiled RT layer needs (jnp references or Pallas kernels)."""

    merge: MergeFn = merge_block
    grads: GradFn = block_grads
    name: str = "jnp"
    block_calls: bool = False
    """Call ``merge``/``grads`` once per Fenwick block (True) or once per leaf pair (False)."""
    fenwick_merge: Callable | None = None
    """With ``block_calls``: ``(q_l, k_l, v_l, state, m, spec) -> state``, block m merged in
    place on the leaf-major buffers (``rt_jax.ops.fenwick_calls``; a ``supports(q_l)`` method, if
    present, says which buffers it takes); None: windows + ``merge``."""
    fenwick_grads: Callable | None = None
    """With ``block_calls``: ``(tensors, (dq_l, dk_l, dv_l), m, spec) -> grads``, in place."""
    leaf_forward: Callable | None = None
    """The forward's per-leaf pull step as one kernel call (``rt_jax.ops.pallas_tiles.LeafKernel``:
    ``supports``, ``prepare``, call); None, or ``supports`` False: the jnp position loop."""
    leaf_backward: Callable | None = None
    """The backward's per-leaf reverse position loop as one kernel call
    (``rt_jax.ops.pallas_tiles.LeafBackwardKernel``: ``supports``, ``prepare``, call); None, or
    ``supports`` False: ``tiled_backward.leaf_backward_positions``."""


JNP_TILE_OPS = TileOps()
