"""One tile call per Fenwick block (instead of one per leaf pair) for the tiled RT scan.

Drop-ins for the leaf x leaf loops of ``rt_jax.ops.tiled`` on a Fenwick block, used when
``TileOps.block_calls`` is set (the Pallas tile ops set it): a kernel then keeps the whole key block
resident and the layer's kernel traffic is Theta(N log N) instead of Theta(N^2 / leaf). Arrays are
the scan's leaf-major ones (n x B x X x L (x K)); block m (T = lowbit(m)) joins key leaves
[m - T, m) with query leaves [m, min(m + T, n)), viewed as B x X x (T L) (x K) windows.

When the tile ops carry in-place block kernels (``TileOps.fenwick_merge``/``fenwick_grads``, the
Mosaic TPU kernels of ``pallas_kernels.rt_tiles.fenwick_tpu`` or the Triton GPU kernels of
``fenwick_gpu``) the block is handed to them as it lies: one call per leaf step with m as an
operand, state/gradients aliased, no window and no ``lax.switch``. Otherwise (the jnp reference,
and the TPU kernels on leaves that are not whole sublane tiles) windows are cut per block:
exactly the schedule's tiles are computed: the window sizes are static per branch of a
``lax.switch``, one branch per (T, query leaves) pair that occurs for this n (a level's full block
and, at most once per level, its tail truncated at the last leaf, at its true size); m = 0 and
m >= n (nothing left to merge into) take the empty branch. ``block_shapes(n)`` lists the calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def in_place(tile_ops: TileOps, q_l: jax.Array) -> bool:
    """Whether the tile ops' in-place block kernels take these leaf-major buffers (their
    ``supports(q_l)``, when they have one: the Mosaic kernels need leaves of whole sublane tiles,
    the Triton ones take every leaf)."""
    fn = tile_ops.fenwick_merge
    return fn is not None and getattr(fn, "supports", lambda _: True)(q_l)


def block_shape(m: int, n: int) -> tuple[int, int] | None:
    """(key leaves T, query leaves) of Fenwick block m among n leaves, None when it is empty."""
    if m <= 0 or m >= n:
        return None
    t = m & -m
    return t, min(t, n - m)


@functools.cache
def block_shapes(n: int) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """The distinct block shapes among n leaves and, for m in [0, n], the branch of block m.

    Branch 0 is the empty block; branch i > 0 is shape i - 1.
    """
    shapes: list[tuple[int, int]] = []
    branch = [0] * (n + 1)
    for m in range(n + 1):
        shape = block_shape(m, n)
        if shape is None:
            continue
        if shape not in shapes:
            shapes.append(shape)
        branch[m] = 1 + shapes.index(shape)
    return tuple(shapes), tuple(branch)


def _branch_index(m: jax.Array, n: int) -> jax.Array:
    _, branch = block_shapes(n)
    table = jnp.asarray(np.asarray(branch, np.int32))
    return table[jnp.clip(m, 0, n)]


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
    if in_place(tile_ops, q_l):
        return SoftmaxState(*tile_ops.fenwick_merge(q_l, k_l, v_l, tuple(state), m, spec))
    n = q_l.shape[0]
    shapes, _ = block_shapes(n)

    def branch(t: int, tq: int):
        def run(state: SoftmaxState) -> SoftmaxState:
            ks = m - t
            new = tile_ops.merge(
                _window(q_l, m, tq),
                _window(k_l, ks, t),
                _window(v_l, ks, t),
                SoftmaxState(*(_window(a, m, tq) for a in state)),
                m * leaf + jnp.arange(tq * leaf),
                ks * leaf + jnp.arange(t * leaf),
                spec,
            )
            return SoftmaxState(
                *(
                    jax.lax.dynamic_update_slice_in_dim(
                        full, _unwindow(w.astype(full.dtype), tq), m, 0
                    )
                    for full, w in zip(state, new, strict=True)
                )
            )

        return run

    branches = [lambda s: s] + [branch(t, tq) for t, tq in shapes]
    return jax.lax.switch(_branch_index(m, n), branches, state)


def fenwick_block_grads(
    tile_ops: TileOps,
    spec: AttentionSpec,
    leaf: int,
    tensors: tuple[jax.Array, ...],
    grads: tuple[jax.Array, jax.Array, jax.Array],
    m: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mirrored block m: (dq, dK, dV) of query leaves [m, m + T) x key leaves [m - T, m), one call."""
    if in_place(tile_ops, tensors[0]):
        return tuple(tile_ops.fenwick_grads(tuple(tensors), tuple(grads), m, spec))
    q_l, k_l, v_l, g_l, lse_l, delta_l = tensors
    n = q_l.shape[0]
    shapes, _ = block_shapes(n)

    def add(full: jax.Array, start: jax.Array, w: jax.Array, size: int) -> jax.Array:
        old = jax.lax.dynamic_slice_in_dim(full, start, size, 0)
        return jax.lax.dynamic_update_slice_in_dim(
            full, old + _unwindow(w.astype(full.dtype), size), start, 0
        )

    def branch(t: int, tq: int):
        def run(grads):
            dq_l, dk_l, dv_l = grads
            ks = m - t
            dq, dk, dv = tile_ops.grads(
                _window(q_l, m, tq),
                _window(k_l, ks, t),
                _window(v_l, ks, t),
                _window(g_l, m, tq),
                _window(lse_l, m, tq),
                _window(delta_l, m, tq),
                m * leaf + jnp.arange(tq * leaf),
                ks * leaf + jnp.arange(t * leaf),
                spec,
            )
            return add(dq_l, m, dq, tq), add(dk_l, ks, dk, t), add(dv_l, ks, dv, t)

        return run

    branches = [lambda s: s] + [branch(t, tq) for t, tq in shapes]
    return jax.lax.switch(_branch_index(m, n), branches, tuple(grads))
