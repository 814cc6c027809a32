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
