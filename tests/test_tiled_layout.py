"""The lane layout of the tiled layer's per-position steps (rt_jax.ops.tiled_layout)."""

import numpy as np

from rt_jax.ops import tiled_layout as tl


def test_lane_layout_maps_heads_to_lanes_and_back():
    """lanes[..., r, k, b G + g] == a[..., b, g R + r, k] (query head h = g R + r), and inverses."""
    rng = np.random.default_rng(0)
    b, g, r, kd = 2, 3, 2, 5
    a = rng.standard_normal((4, b, g * r, kd)).astype(np.float32)
    lanes = np.asarray(tl._heads_to_lanes(a, g))
    assert lanes.shape == (4, r, kd, b * g)
    for bi in range(b):
        for gi in range(g):
            for ri in range(r):
                np.testing.assert_array_equal(lanes[:, ri, :, bi * g + gi], a[:, bi, gi * r + ri])
    np.testing.assert_array_equal(tl._lanes_to_heads(lanes, b), a)
    s = a[..., 0]
    np.testing.assert_array_equal(tl._scalars_to_lanes(s, g), lanes[..., 0, :])
    np.testing.assert_array_equal(tl._lanes_to_scalars(tl._scalars_to_lanes(s, g), b), s)
    kv = rng.standard_normal((4, b, g, kd)).astype(np.float32)
    kv_lanes = np.asarray(tl._kv_to_lanes(kv))
    np.testing.assert_array_equal(kv_lanes[:, :, 1 * g + 2], kv[:, 1, 2])
    np.testing.assert_array_equal(tl._lanes_to_kv(kv_lanes, b), kv)


def test_lane_and_matvec_backward_agree_float64():
    """The backward's per-position pull in the lane layout (accelerators) equals the matvec form
    (CPU) in float64: GQA, ALiBi, N not a multiple of the leaf."""
    import jax
    import jax.numpy as jnp

    from rt_jax.ops.block import AttentionSpec, param_shapes
    from rt_jax.ops.tiled_backward import _backward
    from rt_jax.ops.tiled_forward import _forward_padded
    from rt_jax.ops.tiles import JNP_TILE_OPS

    with jax.enable_x64(True):
        spec = AttentionSpec(4, 2, 4, position="alibi", compute_dtype="float64")
        shapes = param_shapes(16, 32, spec)
        keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
        params = {
            name: (1.0 if name.endswith("norm") else 0.0)
            + jax.random.normal(k, shape, jnp.float64) / np.sqrt(shape[0])
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }
        kx, kc = jax.random.split(jax.random.PRNGKey(1))
        x = jax.random.normal(kx, (2, 11, params["w_q"].shape[0]), jnp.float64)
        dz = jax.random.normal(kc, x.shape, jnp.float64)
        z, lse = _forward_padded(params, x, spec, 4, JNP_TILE_OPS)
        out = [
            _backward(params, x, z, lse, dz, spec, 4, JNP_TILE_OPS, lanes=lanes)
            for lanes in (True, False)
        ]
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
