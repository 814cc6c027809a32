"""Tiled Recurrent Transformer layer: Fenwick schedule over leaves, memory-lean custom backward.

The public entry point and its ``jax.custom_vjp``; the pieces live in three modules that can each
be read alone (docs/tiled.md walks through them):

* ``rt_jax.ops.tiled_layout``: leaf-major / position-major layouts, padding, Fenwick-level views.
* ``rt_jax.ops.tiled_forward``: the forward (leaf scan, per-position pull step, Fenwick merges).
* ``rt_jax.ops.tiled_backward``: the backward (one causal recompute pass, reverse scan with the
  per-position pull of dK/dV, mirrored dK/dV tiles, dq in one causal pass after the scan).

Residuals of the custom backward: the layer input x, its output z and the per-query log-sum-exp.
No array with two sequence-length axes exists in either direction (see docs/tiled.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rt_jax.ops.block import AttentionSpec, Params
from rt_jax.ops.tiled_backward import _backward, _causal_dq, _causal_merge, _grad_leaf_tiles
from rt_jax.ops.tiled_forward import _forward_padded, _merge_leaf_tiles
from rt_jax.ops.tiles import JNP_TILE_OPS, TileOps

# The tile-level pieces are re-exported for the tests that hold them to leaf x leaf loops.
__all__ = [
    "_causal_dq",
    "_causal_merge",
    "_grad_leaf_tiles",
    "_merge_leaf_tiles",
    "recurrent_layer_tiled",
]

_REQUIRED = (
    "attn_norm",
    "w_q",
    "q_norm",
    "w_kv",
    "k_norm",
    "w_o",
    "ff_norm",
    "w_ff_in",
    "w_ff_out",
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _tiled_layer(
    params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf: int, tile_ops: TileOps
) -> jax.Array:
    return _forward_padded(params, x_BxNxD, spec, leaf, tile_ops)[0]


def _tiled_layer_fwd(params, x_BxNxD, spec, leaf, tile_ops):
    z, lse = _forward_padded(params, x_BxNxD, spec, leaf, tile_ops)
    return z, (params, x_BxNxD, z, lse)


def _tiled_layer_bwd(spec, leaf, tile_ops, residuals, dz):
    params, x, z, lse = residuals
    # The per-position pull in the lane layout on accelerators, as matvecs on CPU (docs/tiled.md);
    # chosen by the platform the program is lowered for (an AOT TPU compile from a CPU host too).
    return jax.lax.platform_dependent(
        params,
        x,
        z,
        lse,
        dz,
        cpu=functools.partial(_backward, spec=spec, leaf=leaf, tile_ops=tile_ops, lanes=False),
        default=functools.partial(_backward, spec=spec, leaf=leaf, tile_ops=tile_ops, lanes=True),
    )


_tiled_layer.defvjp(_tiled_layer_fwd, _tiled_layer_bwd)


def _check_inputs(params: Params, x_BxNxD: jax.Array, spec: AttentionSpec, leaf_size: int) -> None:
    if not isinstance(leaf_size, int) or isinstance(leaf_size, bool) or leaf_size <= 0:
        raise ValueError(f"leaf_size must be a positive int, got {leaf_size!r}")
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if getattr(x_BxNxD, "ndim", None) != 3 or x_BxNxD.shape[1] == 0:
        raise ValueError(
            f"x must have shape (batch, seq_len >= 1, d_model), got {getattr(x_BxNxD, 'shape', None)}"
        )
    if not jnp.issubdtype(x_BxNxD.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got {x_BxNxD.dtype}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}: pass one layer's parameters")
    d = x_BxNxD.shape[-1]
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    expected = {"w_q": (d, q_dim), "w_kv": (d, 2 * kv_dim), "w_o": (q_dim, d)}
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(params[name].shape)}, expected {shape} for "
                f"d_model={d} and {spec}: make spec match the parameters"
            )


def recurrent_layer_tiled(
    params: Params,
    x_BxNxD: jax.Array,
    spec: AttentionSpec,
    *,
    leaf_size: int = 32,
    tile_ops: TileOps = JNP_TILE_OPS,
) -> jax.Array:
    """One Recurrent Transformer layer, Fenwick-tiled, with a memory-lean custom backward. BxNxD."""
    _check_inputs(params, x_BxNxD, spec, leaf_size)
    return _tiled_layer(dict(params), x_BxNxD, spec, leaf_size, tile_ops)
