"""One tile call per Fenwick block (instead of one per leaf pair) for the tiled RT scan.

Drop-ins for the leaf x leaf loops of ``rt_jax.ops.tiled`` on a Fenwick block, used when
``TileOps.block_calls`` is set (the Pallas tile ops set it): a kernel then keeps the whole key block
resident and the layer's kernel traffic is Theta(N log N) instead of Theta(N^2 / leaf). Arrays are
the scan's leaf-major ones (n x B x X x L (x K)); a block of T leaves becomes one B x X x (T L) (x K)
view, and ``lax.switch`` picks the static T = lowbit(m). Blocks that would run past the last leaf
are shifted left to fit, with the leaves before m masked out. On XLA:CPU the switch copies the
carried state in every branch, which is why the jnp tile ops keep the leaf-pair loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rt_jax.ops.block import AttentionSpec
from rt_jax.ops.tiles import SoftmaxState, TileOps


def _window(a_nxBxXxL_: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Leaves [start, start + size) of a leaf-major array as one B x X x (size L) (x K) block."""
    w = jax.lax.dynamic_slice_in_dim(a_nxBxXxL_, start, size, axis=0)
    w = jnp.moveaxis(w, 0, 2)
    return w.reshape(w.shape[:2] + (size * w.shape[3],) + w.shape[4:])


def _unwindow(w_BxXxM_: jax.Array, size: int) -> jax.Array:
    """Inverse of ``_window``: B x X x (size L) (x K) -> size x B x X x L (x K)."""
    b, x, m = w_BxXxM_.shape[:3]
    w = w_BxXxM_.reshape((b, x, size, m // size) + w_BxXxM_.shape[3:])
    return jnp.moveaxis(w, 2, 0)


def _level(m: jax.Array) -> jax.Array:
    """1 + log2(lowbit(m)) for m > 0, and 0 for m = 0 (the no-op branch)."""
    low = m & -m
    return jnp.where(m > 0, jax.lax.population_count(low - 1) + 1, 0)


def _n_levels(n: int) -> int:
    return max(1, (n - 1).bit_length())


def fenwick_block_merge(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    q_l: jax.Array,
    k_l: jax.Array,
    v_l: jax.Array,
    state: SoftmaxState,
    m: jax.Array,
) -> SoftmaxState:
    """Merge key leaves [m - T, m) into query leaves [m, min(m + T, n)) in one call (T = lowbit(m))."""
    n = q_l.shape[0]

    def branch(t: int):
        def run(state: SoftmaxState) -> SoftmaxState:
            # A window of t leaves that fits in [0, n); leaves before m in it are left unchanged.
            qs, ks = jnp.minimum(m, n - t), m - t
            offs = jnp.arange(t * leaf)
            keep = qs + offs // leaf >= m
            st_w = SoftmaxState(*(_window(a, qs, t) for a in state))
            new = tile_ops.merge(
                _window(q_l, qs, t),
                _window(k_l, ks, t),
                _window(v_l, ks, t),
                st_w,
                qs * leaf + offs,
                ks * leaf + offs,
                spec,
            )
            out = []
            for old_w, new_w, full in zip(st_w, new, state, strict=True):
                mask = keep.reshape((1, 1, -1) + (1,) * (new_w.ndim - 3))
                merged = jnp.where(mask, new_w.astype(old_w.dtype), old_w)
                out.append(jax.lax.dynamic_update_slice_in_dim(full, _unwindow(merged, t), qs, 0))
            return SoftmaxState(*out)

        return run

    branches = [lambda s: s] + [branch(1 << lvl) for lvl in range(_n_levels(n))]
    return jax.lax.switch(_level(m), branches, state)


def fenwick_block_grads(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mirrored block m: (dq, dK, dV) of query leaves [m, m + T) x key leaves [m - T, m), one call."""
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    n = q_l.shape[0]

    def branch(t: int):
        def run(grads):
            dq_l, dk_l, dv_l = grads
            qs, ks = jnp.minimum(m, n - t), m - t
            offs = jnp.arange(t * leaf)
            keep = qs + offs // leaf >= m
            # Leaves before m in the window take no part: zero g, delta and an infinite lse.
            g_w = jnp.where(keep[:, None], _window(g_l, qs, t), 0)
            delta_w = jnp.where(keep, _window(delta_l, qs, t), 0)
            lse_w = jnp.where(keep, _window(lse_l, qs, t), jnp.inf)
            dq, dk, dv = tile_ops.grads(
                _window(q_l, qs, t),
                _window(k_l, ks, t),
                _window(v_l, ks, t),
                g_w,
                lse_w,
                delta_w,
                qs * leaf + offs,
                ks * leaf + offs,
                spec,
            )
            dq = jnp.where(keep[:, None], dq, 0).astype(dq_l.dtype)
            dq_l = jax.lax.dynamic_update_slice_in_dim(
                dq_l, jax.lax.dynamic_slice_in_dim(dq_l, qs, t, 0) + _unwindow(dq, t), qs, 0
            )
            dk_l = jax.lax.dynamic_update_slice_in_dim(
                dk_l, jax.lax.dynamic_slice_in_dim(dk_l, ks, t, 0) + _unwindow(dk, t), ks, 0
            )
            dv_l = jax.lax.dynamic_update_slice_in_dim(
                dv_l, jax.lax.dynamic_slice_in_dim(dv_l, ks, t, 0) + _unwindow(dv, t), ks, 0
            )
            return dq_l, dk_l, dv_l

        return run

    branches = [lambda s: s] + [branch(1 << lvl) for lvl in range(_n_levels(n))]
    return jax.lax.switch(_level(m), branches, tuple(grads))
