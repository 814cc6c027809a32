"""Layouts of the tiled RT layer: leaf-major tiles, per-position scan inputs, Fenwick-level views.

Positions are grouped into n leaves of L positions (N padded at the end to n L). Tiles are stored
leaf-major and head-major (n x B x H x L (x K)), so a tile is a plain index ``a[j]`` in the
B x H x T x K layout of ``rt_jax.ops.tiles``; per-position inputs of the scans are position-major
(n x L x B x ...). At Fenwick level t the leaves are grouped in chunks of 2t: the second half of
every chunk (queries) meets the first half (keys), and all chunks go into one batched tile call.

The per-position steps use a *lane* layout: batch x kv-heads flattened into the minor axis
(BG = B * G, b major), query heads of a group (R) and head dim (K) in front, e.g. a query R x K x BG,
a key K x BG, a leaf's keys L x K x BG. A query against its leaf's keys is then an elementwise
product over full vector registers reduced over a major axis, not a batch of 1 x K x L matvecs with
a half-empty minor axis (docs/tiled.md, "Per-position layout").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _lowbit(m: jax.Array) -> jax.Array:
    return jnp.bitwise_and(m, -m)


def _to_leaves_hm(a_BxNxHx_: jax.Array, n: int, leaf: int) -> jax.Array:
    """B x N x H (x K) -> n x B x H x L (x K): leaf-major, head-major tiles."""
    b, _, h, *rest = a_BxNxHx_.shape
    a = a_BxNxHx_.reshape(b, n, leaf, h, *rest)
    return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 2, 3)


def _from_leaves_hm(a_nxBxHxL_: jax.Array) -> jax.Array:
    """n x B x H x L (x K) -> B x N x H (x K)."""
    n, b, h, leaf, *rest = a_nxBxHxL_.shape
    a = jnp.moveaxis(jnp.moveaxis(a_nxBxHxL_, 3, 2), 0, 1)
    return a.reshape(b, n * leaf, h, *rest)


def _to_leaves_pm(a_BxNx_: jax.Array, n: int, leaf: int) -> jax.Array:
    """B x N x ... -> n x L x B x ...: leaf-major, position-major (what the scans iterate over)."""
    b, _, *rest = a_BxNx_.shape
    a = a_BxNx_.reshape(b, n, leaf, *rest)
    return jnp.moveaxis(a, 0, 2)


def _from_leaves_pm(a_nxLxBx_: jax.Array) -> jax.Array:
    """n x L x B x ... -> B x N x ...."""
    n, leaf, b, *rest = a_nxLxBx_.shape
    return jnp.moveaxis(a_nxLxBx_, 2, 0).reshape(b, n * leaf, *rest)


def _hm_leaf_to_pm(a_BxHxL_: jax.Array) -> jax.Array:
    """One leaf B x H x L (x K) -> L x B x H (x K)."""
    return jnp.moveaxis(a_BxHxL_, 2, 0)


def _pm_leaf_to_hm(a_LxBxH_: jax.Array) -> jax.Array:
    """One leaf L x B x H (x K) -> B x H x L (x K)."""
    return jnp.moveaxis(a_LxBxH_, 0, 2)


def _heads_to_lanes(a_xBxHxK: jax.Array, g: int) -> jax.Array:
    """... x B x H x K -> ... x R x K x BG (lane layout; h = g R + r, lane = b G + g)."""
    *lead, b, h, kd = a_xBxHxK.shape
    a = a_xBxHxK.reshape(*lead, b, g, h // g, kd)
    nl = len(lead)
    a = jnp.transpose(a, (*range(nl), nl + 2, nl + 3, nl, nl + 1))
    return a.reshape(*lead, h // g, kd, b * g)


def _lanes_to_heads(a_xRxKxBG: jax.Array, b: int) -> jax.Array:
    """Inverse of ``_heads_to_lanes``: ... x R x K x BG -> ... x B x H x K."""
    *lead, r, kd, bg = a_xRxKxBG.shape
    g = bg // b
    a = a_xRxKxBG.reshape(*lead, r, kd, b, g)
    nl = len(lead)
    a = jnp.transpose(a, (*range(nl), nl + 2, nl + 3, nl, nl + 1))
    return a.reshape(*lead, b, g * r, kd)


def _scalars_to_lanes(a_xBxH: jax.Array, g: int) -> jax.Array:
    """... x B x H -> ... x R x BG (one number per query head, lane layout)."""
    return _heads_to_lanes(a_xBxH[..., None], g)[..., 0, :]


def _lanes_to_scalars(a_xRxBG: jax.Array, b: int) -> jax.Array:
    """Inverse of ``_scalars_to_lanes``: ... x R x BG -> ... x B x H."""
    return _lanes_to_heads(a_xRxBG[..., None, :], b)[..., 0]


def _kv_to_lanes(a_xBxGxK: jax.Array) -> jax.Array:
    """... x B x G x K -> ... x K x BG (a key or value in lane layout)."""
    return _heads_to_lanes(a_xBxGxK, a_xBxGxK.shape[-2])[..., 0, :, :]


def _lanes_to_kv(a_xKxBG: jax.Array, b: int) -> jax.Array:
    """Inverse of ``_kv_to_lanes``: ... x K x BG -> ... x B x G x K."""
    return _lanes_to_heads(a_xKxBG[..., None, :, :], b)


def _pad_positions(a_BxNx_: jax.Array, n_pos: int, value: float = 0.0) -> jax.Array:
    pad = n_pos - a_BxNx_.shape[1]
    if pad == 0:
        return a_BxNx_
    widths = [(0, 0)] * a_BxNx_.ndim
    widths[1] = (0, pad)
    return jnp.pad(a_BxNx_, widths, constant_values=value)


def _level_halves(a_nxBxXxL_: jax.Array, t: int, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Fenwick level t: leaves in chunks of 2t; (first halves, second halves), each C x t x B x ...

    Padded leaves (past n) hold ``fill``; they only ever sit in second halves whose first half is
    real, or in chunks that are wholly padding, so they never reach a real query.
    """
    n = a_nxBxXxL_.shape[0]
    c = -(-n // (2 * t))
    widths = [(0, c * 2 * t - n)] + [(0, 0)] * (a_nxBxXxL_.ndim - 1)
    a = jnp.pad(a_nxBxXxL_, widths, constant_values=fill)
    a = a.reshape((c, 2, t) + a.shape[1:])
    return a[:, 0], a[:, 1]


def _chunk_block(a_CxTxBxXxL_: jax.Array) -> jax.Array:
    """C x t x B x X x L (x K) -> (C B) x X x (t L) (x K): one tile row block per chunk."""
    c, t, b, x, leaf, *rest = a_CxTxBxXxL_.shape
    a = jnp.moveaxis(a_CxTxBxXxL_, 1, 3)  # C x B x X x t x L
    return a.reshape(c * b, x, t * leaf, *rest)


def _unchunk_block(a_CBxXxM_: jax.Array, c: int, t: int) -> jax.Array:
    """Inverse of ``_chunk_block``."""
    cb, x, m, *rest = a_CBxXxM_.shape
    a = a_CBxXxM_.reshape(c, cb // c, x, t, m // t, *rest)
    return jnp.moveaxis(a, 3, 1)


def _key_leaves(a_CxTxBxGxLxK: jax.Array) -> jax.Array:
    """C x t x B x G x L x K -> t x (C B) x G x L x K: the scan runs over the t key leaves."""
    c, t, b, *rest = a_CxTxBxGxLxK.shape
    return jnp.moveaxis(a_CxTxBxGxLxK, 1, 0).reshape(t, c * b, *rest)


def _levels(n: int) -> list[int]:
    """Fenwick block sizes 1, 2, 4, ... < n (leaves)."""
    return [1 << lvl for lvl in range((n - 1).bit_length())] if n > 1 else []
