"""The leaf kernels (``rt_tiles.leaf_tpu``, ``rt_tiles.leaf_bwd_tpu``): one Mosaic call per leaf
of the tiled forward and one per leaf of its backward.

Held to the jnp position loops they replace (``tiled_forward.leaf_positions`` and
``tiled_backward.leaf_backward_positions``, the references) in interpret mode on CPU: ALiBi, RoPE
(full and partial rotary dims) and no positions, MHA and GQA, batches that need padding to a
sublane multiple, float32 (tight) and bfloat16. The whole layer with both kernels (forward and
gradients) equals the oracle and the tiled path; a real Mosaic AOT compile with libtpu for v5e
contains both kernels with honest CostEstimates.
"""

import dataclasses
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rt_tiles import leaf_bwd_tpu, leaf_tpu
from rt_jax.config import ModelConfig
from rt_jax.models.lm import init_params, layer_function
from rt_jax.ops.pallas_tiles import LeafBackwardKernel, LeafKernel, pallas_tile_ops
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.tiled_backward import leaf_backward_positions
from rt_jax.ops.tiled_forward import leaf_positions
from rt_jax.ops.tiled_layout import _heads_to_lanes, _scalars_to_lanes


def _layer(position="alibi", n_kv=2, dtype="float32", leaf=8, rotary_pct=1.0, d=32, heads=4):
    cfg = ModelConfig(
        d_model=d,
        n_heads=heads,
        n_kv_heads=n_kv,
        n_layers=1,
        leaf_size=leaf,
        position=position,
        compute_dtype=dtype,
        rotary_pct=rotary_pct,
        impl="pallas",
        interpret=True,
    )
    params = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(0))["blocks"])
    return cfg, params, cfg.attention_spec()


def _leaf_inputs(seed, leaf, b, d, spec):
    ks = jax.random.split(jax.random.key(seed), 5)
    h, kd = spec.n_heads, spec.head_dim
    x = jax.random.normal(ks[0], (leaf, b, d))
    q = jax.random.normal(ks[1], (leaf, b, h, kd)).astype(spec.dtype)
    state = (
        jax.random.normal(ks[2], (leaf, b, h, kd)),
        jax.random.normal(ks[3], (leaf, b, h)),
        1 + jax.random.uniform(ks[4], (leaf, b, h)),
    )
    return x, q, state


CASES = [
    # position, kv heads, dtype, leaf, rotary_pct, batch
    ("alibi", 4, "float32", 8, 1.0, 2),
    ("rope", 2, "float32", 8, 0.5, 3),
    ("none", 1, "float32", 16, 1.0, 2),
    ("alibi", 2, "bfloat16", 16, 1.0, 2),
    ("rope", 4, "bfloat16", 16, 1.0, 9),
]


@pytest.mark.parametrize("position,n_kv,dtype,leaf,rotary_pct,batch", CASES)
def test_leaf_kernel_equals_jnp_position_loop(position, n_kv, dtype, leaf, rotary_pct, batch):
    _, params, spec = _layer(position, n_kv, dtype, leaf, rotary_pct)
    x, q, state = _leaf_inputs(leaf + batch, leaf, batch, 32, spec)
    start = 3 * leaf  # leaf 3: RoPE sees positions past the first leaf
    kernel = LeafKernel(interpret=True)
    assert kernel.supports(params, jnp.zeros((batch, 4 * leaf, 32)), spec, leaf)
    weights = kernel.prepare(params, spec, jnp.float32)
    got = jax.jit(lambda x, q, st: kernel(weights, x, q, st, start, spec))(x, q, state)
    want = jax.jit(lambda x, q, st: leaf_positions(params, spec, start, x, q, st))(x, q, state)
    tol = 2e-6 if dtype == "float32" else 2e-2
    for name, a, b in zip(("z", "lse", "k", "v"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0, err_msg=name)


def _leaf_bwd_inputs(seed, leaf, b, d, f, spec):
    ks = iter(jax.random.split(jax.random.key(seed), 12))
    h, g, kd = spec.n_heads, spec.n_kv_heads, spec.head_dim

    def normal(*shape, dtype=jnp.float32, scale=1.0):
        return (scale * jax.random.normal(next(ks), shape)).astype(dtype)

    q = normal(leaf, b, h, kd, dtype=spec.dtype, scale=0.5)
    lse = 1 + jax.random.uniform(next(ks), (leaf, b, h))
    # dz_up, z, k_pre, x1, hidden_pre, att, k, v, dk_cross, dv_cross
    ys = (normal(leaf, b, d), normal(leaf, b, d), normal(leaf, b, g * kd), normal(leaf, b, d),
          normal(leaf, b, f), normal(leaf, b, h, kd),
          normal(leaf, b, g, kd, dtype=spec.dtype, scale=0.5),
          normal(leaf, b, g, kd, dtype=spec.dtype), normal(leaf, b, g, kd),
          normal(leaf, b, g, kd))  # fmt: skip
    return q, lse, ys


@pytest.mark.parametrize("position,n_kv,dtype,leaf,rotary_pct,batch", CASES)
def test_leaf_backward_kernel_equals_jnp_reverse_loop(
    position, n_kv, dtype, leaf, rotary_pct, batch
):
    """bf16: the kernel rounds the cotangents entering each weight matmul to bf16 (what XLA:TPU's
    default precision does with the reference's f32 x bf16 products; on CPU the reference keeps
    them f32), so its tolerance is looser than the forward's."""
    _, params, spec = _layer(position, n_kv, dtype, leaf, rotary_pct)
    f = params["w_ff_in"].shape[1]
    q, lse, ys = _leaf_bwd_inputs(leaf + batch, leaf, batch, 32, f, spec)
    start = 3 * leaf
    kernel = LeafBackwardKernel(interpret=True)
    assert kernel.supports(params, jnp.zeros((batch, 4 * leaf, 32)), spec, leaf)
    weights = kernel.prepare(params, spec, jnp.float32)
    got = jax.jit(lambda q, lse, ys: kernel(weights, q, lse, ys, start, spec))(q, lse, ys)
    g = spec.n_kv_heads

    def reference(q, lse, ys):
        q_side, lse_side = _heads_to_lanes(q, g), _scalars_to_lanes(lse, g)
        return leaf_backward_positions(params, spec, start, q_side, lse_side, ys, lanes=True)

    want = jax.jit(reference)(q, lse, ys)
    tol = 2e-6 if dtype == "float32" else 3e-2
    names = ("dz", "dhidden", "dx1", "g", "delta", "dk", "dv")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, atol=tol * scale, rtol=0, err_msg=name)


def test_layer_uses_the_leaf_kernels_only_where_they_apply():
    """Whole sublane tiles of the compute dtype (the in-place Fenwick kernels' rule), TPU ops.
    The gradient's jaxpr holds the backward twice (``platform_dependent``: its CPU and default
    branches, both with the kernel), each with one backward call in the leaf scan's body."""

    def calls(cfg, params, spec, tile_ops):
        x = jnp.zeros((2, 2 * cfg.leaf_size + 3, cfg.d_model))
        fn = lambda p, x: jnp.sum(  # noqa: E731
            recurrent_layer_tiled(p, x, spec, leaf_size=cfg.leaf_size, tile_ops=tile_ops)
        )
        text = str(jax.make_jaxpr(jax.grad(fn))(params, x))
        return text.count("rt_leaf_forward"), text.count("rt_leaf_backward")

    ops = pallas_tile_ops(interpret=True)
    assert calls(*_layer(leaf=8), ops) == (1, 2)  # the leaf scans' bodies: one call per leaf
    assert calls(*_layer(leaf=4), ops) == (0, 0)  # 4 float32 rows: not a sublane tile
    assert calls(*_layer(dtype="bfloat16", leaf=8), ops) == (0, 0)  # bf16 packs 16 rows
    assert calls(*_layer(dtype="bfloat16", leaf=16), ops) == (1, 2)
    assert calls(*_layer(leaf=8), pallas_tile_ops(interpret=True, leaf_kernel=False)) == (0, 0)
    gpu = pallas_tile_ops(interpret=True, backend="gpu")
    assert gpu.leaf_forward is None and gpu.leaf_backward is None
    # a layer whose weights do not fit the kernels' VMEM budget keeps the jnp loops
    big = (32, 16, 8192, 32768, leaf_tpu.LeafSpec(64, 64, 128), jnp.bfloat16, jnp.float32,
           jnp.float32)  # fmt: skip
    assert not leaf_tpu.fits(*big) and not leaf_bwd_tpu.fits(*big)


@pytest.mark.parametrize("position,n_kv,rotary_pct", [("rope", 2, 0.5), ("alibi", 1, 1.0)])
def test_pallas_layer_with_leaf_kernel_equals_oracle(position, n_kv, rotary_pct):
    """Both leaf kernels in the layer (forward and backward): value and gradients."""
    cfg, params, spec = _layer(position, n_kv, leaf=8, rotary_pct=rotary_pct)
    x = jax.random.normal(jax.random.key(1), (2, 29, 32))
    w = jax.random.normal(jax.random.key(2), (2, 29, 32))

    def loss(layer):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(w * layer(p, x, spec)), (0, 1)))

    pallas = loss(layer_function(cfg))(params, x)
    tiled = loss(layer_function(dataclasses.replace(cfg, impl="tiled")))(params, x)
    oracle = loss(recurrent_layer_reference)(params, x)
    for other in (tiled, oracle):
        np.testing.assert_allclose(float(pallas[0]), float(other[0]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(pallas[1]), jax.tree.leaves(other[1]), strict=True):
            scale = float(jnp.max(jnp.abs(b))) + 1e-6
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)


def _cost_estimate(hlo_text: str, kernel: str) -> dict[str, float]:
    """The CostEstimate attached to ``kernel``'s Mosaic custom calls (one distinct value)."""
    (est,) = {
        m.group(1)
        for line in hlo_text.splitlines()
        if f"{kernel}/pallas_call" in line
        for m in [re.search(r'"cost_estimate"\s*:\s*\{([^}]*)\}', line)]
        if m
    }
    return {k: float(v) for k, v in re.findall(r'"(\w+)"\s*:\s*"?([0-9.eE+]+)', est)}


def test_leaf_kernel_compiles_for_v5e_in_the_layer(tmp_path):
    """Real Mosaic compile (libtpu, from this CPU) of the layer's forward + backward at a small
    shape (bf16, leaf 16, 4 leaves) with both leaf kernels; each CostEstimate counts every operand
    and output once (weights in the compute dtype) and at least the weight matmuls' FLOPs."""
    from experiments.tpu_cost import LayerShape, estimate_layer

    b, n, d, h, f, leaf = 8, 64, 256, 4, 512, 16
    shape = LayerShape(batch=b, seq_len=n, d_model=d, n_heads=h, n_kv_heads=2, ff=f,
                       position="rope", leaf=leaf, impl="pallas")  # fmt: skip
    hlo = tmp_path / "layer.hlo"
    row = estimate_layer(shape, "recurrent", "v5e:1x1", hlo_out=hlo)
    kernels = {p["kernel"]: p for p in row["pallas"]}
    for name in ("rt_leaf_forward", "rt_leaf_backward"):
        assert kernels[name]["has_cost_estimate"], name
        assert kernels[name]["calls"] == n // leaf, name
    text = hlo.read_text()
    hk, gk = d, d // 2  # 4 heads of 64; 2 kv heads
    weights = hk * d + 2 * d * f + 2 * d * gk
    bf16, f32 = 2, 4
    cost = _cost_estimate(text, "rt_leaf_forward")
    expected = (
        weights * bf16  # w_o, w_ff_in, w_ff_out, w_k, w_v: once per call
        + (2 * d + gk) * f32  # norms
        + hk * h * f32  # head indicator E
        + gk * hk * bf16
        + gk * gk * bf16  # GQA repeat, rotate-half
        + 2 * leaf * gk * f32  # cos, sin tables
        + leaf * b * (d * f32 + hk * bf16 + hk * f32 + 2 * h * f32)  # x, q, acc, max, den
        + leaf * b * (d * f32 + h * f32 + 2 * gk * bf16)  # z, lse, k, v
    )
    assert cost["bytes_accessed"] == expected
    assert 2 * leaf * b * weights <= cost["flops"] <= 2 * (2 * leaf * b * weights)
    cost = _cost_estimate(text, "rt_leaf_backward")
    expected = (
        weights * bf16  # the five transposed weight matrices: once per call
        + (2 * d + gk) * f32  # norms
        + hk * h * f32  # head indicator E
        + gk * hk * (bf16 + f32)  # GQA repeat (bf16), its transpose (f32)
        + gk * gk * bf16  # rotate-half^T
        + 2 * leaf * gk * f32  # cos, sin tables
        + leaf * b * (hk * bf16 + h * f32)  # q, lse
        + leaf * b * (3 * d + 3 * gk + f + hk) * f32  # dz_up, z, x1, k_pre, dK/dV cross, hid, att
        + leaf * b * 2 * gk * bf16  # k, v
        + leaf * b * (2 * d + f + hk + h + 2 * gk) * f32  # dz, dx1, dhidden, g, delta, dk, dv
    )
    assert cost["bytes_accessed"] == expected
    assert 2 * leaf * b * weights <= cost["flops"] <= 2 * (2 * leaf * b * weights)


def test_leaf_kernel_refuses_neox_and_unpadded_batches():
    cfg, params, spec = _layer()
    with pytest.raises(ValueError, match="OLMo"):
        LeafKernel(True).supports(params, jnp.zeros((2, 16, 32)), dataclasses.replace(
            spec, block_style="neox"), 8)  # fmt: skip
    kernel = LeafKernel(True)
    weights = kernel.prepare(params, spec, jnp.float32)
    x, q, state = _leaf_inputs(0, 8, 2, 32, spec)
    lspec = leaf_tpu.LeafSpec(4, 2, 8, "alibi")
    flat = (q.reshape(8, 2, 32), state[0].reshape(8, 2, 32), state[1], state[2])
    with pytest.raises(ValueError, match="multiple of 8"):
        leaf_tpu.leaf_forward(x, flat[0], flat[1:], weights, None, lspec, interpret=True)
    bwd = LeafBackwardKernel(True).prepare(params, spec, jnp.float32)
    q, lse, ys = _leaf_bwd_inputs(0, 8, 2, 32, params["w_ff_in"].shape[1], spec)
    ys = tuple(a.reshape(8, 2, -1) for a in ys)
    with pytest.raises(ValueError, match="multiple of 8"):
        leaf_bwd_tpu.leaf_backward(q.reshape(8, 2, 32), lse, ys, bwd, None, lspec, interpret=True)
    with pytest.raises(ValueError, match="OLMo"):
        LeafBackwardKernel(True).supports(params, jnp.zeros((2, 16, 32)), dataclasses.replace(
            spec, block_style="neox"), 8)  # fmt: skip


@pytest.mark.parametrize("position,n_kv", [("alibi", 16), ("rope", 4)])
def test_leaf_kernel_compiles_for_v5e_at_the_cost_shape(position, n_kv):
    """The kernel alone at experiments/tpu_cost's layer shape (16 sequences per chip, leaf 32,
    D = 1024, 16 heads of 64, F = 4096, bf16): it fits v5e's VMEM (a real Mosaic compile)."""
    import numpy as onp
    from jax.sharding import Mesh, SingleDeviceSharding

    from experiments.tpu_cost import tpu_devices

    leaf, b, d, f, h, kd = 32, 16, 1024, 4096, 16, 64
    hk, gk = h * kd, n_kv * kd
    dev = tpu_devices("v5e:1x1")[0]
    sharding = SingleDeviceSharding(dev)

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    bf, f32 = jnp.bfloat16, jnp.float32
    spec = leaf_tpu.LeafSpec(h, n_kv, kd, position)
    weights = leaf_tpu.LeafWeights(
        sd((hk, d), bf), sd((d, f), bf), sd((f, d), bf), sd((d, gk), bf), sd((d, gk), bf),
        sd((1, d), f32), sd((1, d), f32), sd((1, gk), f32), sd((hk, h), f32),
        sd((gk, hk), bf) if n_kv != h else None,
        sd((gk, gk), bf) if position == "rope" else None,
        sd((1, 1, h), f32) if position == "alibi" else None,
    )  # fmt: skip
    rope = (sd((leaf, 1, gk), f32),) * 2 if position == "rope" else None
    state = (sd((leaf, b, hk), f32), sd((leaf, b, h), f32), sd((leaf, b, h), f32))
    args = (sd((leaf, b, d), f32), sd((leaf, b, hk), bf), state, weights, rope)
    fn = jax.jit(lambda x, q, st, w, rope: leaf_tpu.leaf_forward(x, q, st, w, rope, spec))
    with jax.sharding.use_abstract_mesh(Mesh(onp.array([dev]), ("data",)).abstract_mesh):
        text = fn.lower(*args).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1


@pytest.mark.parametrize("position,n_kv", [("alibi", 16), ("rope", 4)])
def test_leaf_backward_kernel_compiles_for_v5e_at_the_cost_shape(position, n_kv):
    """The backward kernel alone at experiments/tpu_cost's layer shape (16 sequences per chip,
    leaf 32, D = 1024, 16 heads of 64, F = 4096, bf16): it fits v5e's VMEM (a real Mosaic
    compile)."""
    import numpy as onp
    from jax.sharding import Mesh, SingleDeviceSharding

    from experiments.tpu_cost import tpu_devices

    leaf, b, d, f, h, kd = 32, 16, 1024, 4096, 16, 64
    hk, gk = h * kd, n_kv * kd
    dev = tpu_devices("v5e:1x1")[0]
    sharding = SingleDeviceSharding(dev)

    def sd(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    bf, f32 = jnp.bfloat16, jnp.float32
    spec = leaf_tpu.LeafSpec(h, n_kv, kd, position)
    assert leaf_bwd_tpu.fits(leaf, b, d, f, spec, bf, f32, f32)
    gqa = n_kv != h
    weights = leaf_bwd_tpu.LeafBackWeights(
        sd((d, hk), bf), sd((f, d), bf), sd((d, f), bf), sd((gk, d), bf), sd((gk, d), bf),
        sd((1, d), f32), sd((1, d), f32), sd((1, gk), f32), sd((hk, h), f32),
        sd((gk, hk), bf) if gqa else None, sd((hk, gk), f32) if gqa else None,
        sd((gk, gk), bf) if position == "rope" else None,
        sd((1, 1, h), f32) if position == "alibi" else None,
    )  # fmt: skip
    rope = (sd((leaf, 1, gk), f32),) * 2 if position == "rope" else None
    row = lambda x, dt=f32: sd((leaf, b, x), dt)  # noqa: E731
    ys = (row(d), row(d), row(gk), row(d), row(f), row(hk), row(gk, bf), row(gk, bf), row(gk),
          row(gk))  # fmt: skip
    fn = jax.jit(lambda q, lse, ys, w, rope: leaf_bwd_tpu.leaf_backward(q, lse, ys, w, rope, spec))
    with jax.sharding.use_abstract_mesh(Mesh(onp.array([dev]), ("data",)).abstract_mesh):
        text = fn.lower(row(hk, bf), row(h), ys, weights, rope).compile().as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 1
