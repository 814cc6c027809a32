"""In-place Fenwick-block Triton kernels (rt_tiles.fenwick_gpu) == the window path of the jnp tiles.

As test_pallas_fenwick for the TPU kernels: the reference is ``fenwick_calls`` with the jnp tile
ops (a window cut per block, ``tiles.merge_block``/``block_grads`` from the math), itself held to
the leaf-pair loops in test_pallas_blocks. Interpret mode on CPU (nothing here runs Triton); the
CUDA export of the whole layer checks that the leaf loops carry no window copies or switches.
"""

import collections
import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.rt_tiles import fenwick_gpu
from pallas_kernels.rt_tiles.config import GpuTileConfig
from rt_jax.ops import fenwick_calls
from rt_jax.ops.block import AttentionSpec, apply_rope, param_shapes
from rt_jax.ops.fenwick_calls import block_shape, fenwick_block_grads, fenwick_block_merge
from rt_jax.ops.pallas_tiles import pallas_tile_ops
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.tiles import JNP_TILE_OPS, SoftmaxState

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# RT_PALLAS_COMPILED=1 (`make gpu-check` on a GPU machine, never `make test`): compile the Triton
# kernels instead of interpreting them.
INTERPRET = os.environ.get("RT_PALLAS_COMPILED") != "1"


def _rope_leaves(x_nxBxXxLxK, theta=1e4):
    """RoPE by global position (leaf * L + row) on a leaf-major buffer, as the scan applies it."""
    n, b, x, leaf, kd = x_nxBxXxLxK.shape
    pos = jnp.arange(n * leaf)
    flat = jnp.moveaxis(x_nxBxXxLxK, 2, 3).transpose(1, 0, 2, 3, 4).reshape(b, n * leaf, x, kd)
    flat = apply_rope(flat, pos, theta).reshape(b, n, leaf, x, kd).transpose(1, 0, 3, 2, 4)
    return flat


def _buffers(seed, n, b, h, g, leaf, kd, dtype, position):
    ks = jax.random.split(jax.random.key(seed), 10)
    q = jax.random.normal(ks[0], (n, b, h, leaf, kd)) / np.sqrt(kd)
    k = jax.random.normal(ks[1], (n, b, g, leaf, kd))
    v = jax.random.normal(ks[2], (n, b, g, leaf, kd)).astype(dtype)
    if position == "rope":
        q, k = _rope_leaves(q), _rope_leaves(k)
    q, k = q.astype(dtype), k.astype(dtype)
    state = SoftmaxState(
        jax.random.normal(ks[3], (n, b, h, leaf, kd)),
        jax.random.normal(ks[4], (n, b, h, leaf)) + 3,
        jnp.exp(jax.random.normal(ks[5], (n, b, h, leaf))),
    )
    gr = jax.random.normal(ks[6], (n, b, h, leaf, kd)).astype(dtype)
    lse = jax.random.normal(ks[7], (n, b, h, leaf)) + 4
    delta = jax.random.normal(ks[8], (n, b, h, leaf))
    grads = (
        jax.random.normal(ks[9], (n, b, h, leaf, kd)),
        jnp.ones((n, b, g, leaf, kd)),
        -jnp.ones((n, b, g, leaf, kd)),
    )
    return q, k, v, state, (q, k, v, gr, lse, delta), grads


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        scale = float(np.max(np.abs(y))) + 1.0
        np.testing.assert_allclose(x, y, atol=tol * scale, rtol=0)
        assert np.isfinite(x).all()


@pytest.mark.parametrize(
    "n,h,g,leaf,dtype,position,config",
    [
        # GQA, ALiBi, leaf 8 (one 16-row chunk masked to the leaf); m = 4 truncated
        (6, 4, 2, 8, jnp.float32, "alibi", None),
        # MHA, ALiBi, leaf 40 in 16-row query / 32-row key chunks (ragged last chunk of a leaf,
        # positions of later chunks); m = 4 and m = 6 truncated
        (7, 2, 2, 40, jnp.float32, "alibi", GpuTileConfig(block_q=16, block_k=32)),
        # bf16 operands, GQA 4:1, RoPE (applied to the buffers), leaf 16 (whole chunks)
        (5, 4, 1, 16, jnp.bfloat16, "rope", None),
        # no position bias, leaf 4 (the tiny presets' leaf), bf16, GQA
        (6, 4, 2, 4, jnp.bfloat16, "none", None),
    ],
)
def test_gpu_in_place_kernels_equal_window_path_for_every_block(
    n, h, g, leaf, dtype, position, config
):
    """Every m in [0, n], batch 2: the state and (dq, dK, dV) equal the window path's; empty
    blocks (m = 0, m = n) leave every buffer bit-identical."""
    kd = 16
    spec = AttentionSpec(n_heads=h, n_kv_heads=g, head_dim=kd, position=position)
    q, k, v, state, tensors, grads = _buffers(n + h + leaf, n, 2, h, g, leaf, kd, dtype, position)

    @jax.jit
    def kernel(m):
        st = fenwick_gpu.fenwick_merge(q, k, v, tuple(state), m, spec, config=config,
                                       interpret=INTERPRET)  # fmt: skip
        gr = fenwick_gpu.fenwick_grads(tensors, grads, m, spec, config=config,
                                       interpret=INTERPRET)  # fmt: skip
        return st, gr

    @jax.jit
    def reference(m):
        st = fenwick_block_merge(JNP_TILE_OPS, spec, leaf, q, k, v, state, m)
        return tuple(st), fenwick_block_grads(JNP_TILE_OPS, spec, leaf, tensors, grads, m)

    for m in range(n + 1):
        got, want = kernel(jnp.int32(m)), reference(jnp.int32(m))
        _close(got, want, TOL[dtype])
        if block_shape(m, n) is None:
            _close(got, (tuple(state), grads), 0.0)


def test_gpu_in_place_kernels_use_the_shards_global_heads():
    """head_offset 2 on heads 2, 3 of 4 (a head-sharded call) equals those heads of the full call."""
    n, leaf = 5, 8
    spec = AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=16, position="alibi")
    q, k, v, state, tensors, grads = _buffers(3, n, 2, 4, 2, leaf, 16, jnp.float32, "alibi")
    half = lambda a, s: a[:, :, s:]  # noqa: E731
    merge = jax.jit(functools.partial(fenwick_gpu.fenwick_merge, spec=spec, interpret=INTERPRET))
    grad = jax.jit(functools.partial(fenwick_gpu.fenwick_grads, spec=spec, interpret=INTERPRET))
    m = jnp.int32(4)
    full = merge(q, k, v, tuple(state), m)
    part = merge(half(q, 2), half(k, 1), half(v, 1), tuple(half(a, 2) for a in state), m,
                 head_offset=2)  # fmt: skip
    _close(part, tuple(half(a, 2) for a in full), 1e-6)
    full = grad(tensors, grads, m)
    sub = tuple(half(a, 2 if a.shape[2] == 4 else 1) for a in tensors)
    part = grad(sub, (half(grads[0], 2), half(grads[1], 1), half(grads[2], 1)), m, head_offset=2)
    _close(part, (half(full[0], 2), half(full[1], 1), half(full[2], 1)), 1e-6)


def test_gpu_block_plan_is_the_schedules_block_and_head_dim_is_checked():
    n = 11
    for m in range(n + 1):
        m_, ks, kc, tq, hoff = (int(a) for a in fenwick_gpu.block_plan(m, n, 3))
        shape = block_shape(m, n)
        assert hoff == 3
        if shape is None:
            assert kc == tq == 0
        else:
            assert (kc, tq, ks, m_) == (shape[0], shape[1], m - shape[0], m)
    assert fenwick_gpu.largest_block(11) == 8 and fenwick_gpu.largest_block(1) == 0
    q = jnp.zeros((4, 1, 2, 8, 24))
    spec = AttentionSpec(n_heads=2, n_kv_heads=2, head_dim=24)
    with pytest.raises(ValueError, match="head_dim >= 16, got 24"):
        fenwick_gpu.fenwick_merge(q, q, q, (q, q[..., 0], q[..., 0]), 1, spec, interpret=True)


LAYER_D, LAYER_H, LAYER_G, LAYER_KD = 64, 4, 2, 16


def _layer_params(spec, key=0):
    shapes = param_shapes(LAYER_D, 2 * LAYER_D, spec)
    keys = jax.random.split(jax.random.key(key), len(shapes))
    return {
        name: (1.0 + 0.3 * jax.random.normal(k, shape)) if name.endswith("norm")
        else jax.random.normal(k, shape) / np.sqrt(shape[0])
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }  # fmt: skip


def test_gpu_pallas_layer_runs_in_place_and_equals_tiled_forward_and_backward():
    """recurrent_layer_tiled with the GPU Pallas ops (interpret; compiled under RT_PALLAS_COMPILED): loss and all gradients equal the
    jnp tiled layer (GQA, ALiBi, batch 2, N = 45 at leaf 8: a ragged last leaf, 6 leaves)."""
    spec = AttentionSpec(n_heads=LAYER_H, n_kv_heads=LAYER_G, head_dim=LAYER_KD)
    ops = pallas_tile_ops(interpret=INTERPRET, backend="gpu")
    q_l = jnp.zeros((6, 2, LAYER_H, 8, LAYER_KD))
    assert fenwick_calls.in_place(ops, q_l) and ops.fenwick_grads.backend == "gpu"
    params = _layer_params(spec)
    x = jax.random.normal(jax.random.key(1), (2, 45, LAYER_D))
    w = jax.random.normal(jax.random.key(2), (2, 45, LAYER_D))

    def loss(tile_ops):
        def f(p, x):
            z = recurrent_layer_tiled(p, x, spec, leaf_size=8, tile_ops=tile_ops)
            return jnp.sum(w * z)

        return jax.jit(jax.value_and_grad(f, (0, 1)))

    pallas_fn = loss(ops)
    kernels = collections.Counter(
        re.findall(r"name=(rt_\w+)", str(pallas_fn.trace(params, x).jaxpr))
    )
    assert set(kernels) == {"rt_fenwick_merge_gpu", "rt_fenwick_dkdv_gpu", "rt_fenwick_dq_gpu"}
    pallas = pallas_fn(params, x)
    tiled = loss(JNP_TILE_OPS)(params, x)
    np.testing.assert_allclose(float(pallas[0]), float(tiled[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pallas[1]), jax.tree.leaves(tiled[1]), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)


def test_gpu_in_place_layer_sharded_over_a_mesh_equals_unsharded_tiled():
    """On 8 fake CPU devices, mesh (data, fsdp, tensor) = (2, 2, 2): the GPU in-place kernels run
    under shard_map (batch over data x fsdp, heads over tensor, so the ALiBi head offset of each
    shard matters); loss and gradients equal the unsharded jnp tiled layer."""
    from rt_jax.train.config import MeshConfig
    from rt_jax.train.sharding import make_mesh

    mesh = make_mesh(MeshConfig(2, 2, 2))
    spec = AttentionSpec(n_heads=LAYER_H, n_kv_heads=LAYER_G, head_dim=LAYER_KD)
    params = _layer_params(spec, key=3)
    x = jax.random.normal(jax.random.key(4), (4, 40, LAYER_D))
    w = jax.random.normal(jax.random.key(5), (4, 40, LAYER_D))

    def loss(tile_ops, p, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jnp.sum(w * recurrent_layer_tiled(p, x, spec, leaf_size=8, tile_ops=tile_ops))

    ops = pallas_tile_ops(interpret=INTERPRET, backend="gpu")
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    sharded = jax.jit(jax.value_and_grad(functools.partial(loss, ops), (0, 1)))(
        params, jax.device_put(x, batch)
    )
    plain = jax.jit(jax.value_and_grad(functools.partial(loss, JNP_TILE_OPS), (0, 1)))(params, x)
    np.testing.assert_allclose(float(sharded[0]), float(plain[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(plain[1]), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)


# ----------------------------------------------------------------------------- CUDA export

N_LEAVES, LEAF, BATCH = 8, 16, 2
_TENSOR = re.compile(r"tensor<((?:\d+x)+)[a-z0-9]+>")


def _dims(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in m.group(1)[:-1].split("x")) for m in _TENSOR.finditer(text)]


def _leaf_major(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 4 and shape[:2] == (N_LEAVES, BATCH)


def window_ops_in_leaf_loops(stablehlo: str) -> list[str]:
    """Ops of the exported module that move more than one leaf of a leaf-major buffer
    (n x B x ...): a dynamic_slice cutting, or a dynamic_update_slice writing back, a window of
    several leaves, and a ``case`` (lax.switch) whose results include such a buffer."""
    found = []
    for line in stablehlo.splitlines():
        shapes = _dims(line)
        if " = stablehlo.dynamic_slice " in line and _leaf_major(shapes[0]) and shapes[-1][0] > 1:
            found.append(line.strip()[:200])
        if (
            " = stablehlo.dynamic_update_slice " in line
            and _leaf_major(shapes[0])
            and (shapes[1][0] > 1)
        ):
            found.append(line.strip()[:200])
        if line.lstrip().startswith("}) : (tensor<i32>) ->"):  # the end of a stablehlo.case
            if any(_leaf_major(s) for s in _dims(line.split("->", 1)[1])):
                found.append(line.strip()[:200])
    return found


def _export_layer_for_cuda(window: bool):
    """The RT layer's loss and gradients (bf16 matmuls, GQA, leaf 16, 8 leaves) for cuda."""
    spec = AttentionSpec(n_heads=LAYER_H, n_kv_heads=LAYER_G, head_dim=LAYER_KD,
                         compute_dtype="bfloat16")  # fmt: skip
    sd = jax.ShapeDtypeStruct
    params = {k: sd(s, jnp.float32) for k, s in param_shapes(LAYER_D, 2 * LAYER_D, spec).items()}
    x = sd((BATCH, N_LEAVES * LEAF, LAYER_D), jnp.float32)
    # jax >= 0.11 asks the abstract mesh which GPU the Triton lowering targets (no GPU here).
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    target = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with jax.sharding.use_abstract_mesh(target):
        ops = pallas_tile_ops(interpret=False)  # the target's backend: gpu, compiled
        assert ops.name == "pallas-gpu-compiled"
        if window:
            ops = dataclasses.replace(ops, fenwick_merge=None, fenwick_grads=None)

        def loss(p, x):
            z = recurrent_layer_tiled(p, x, spec, leaf_size=LEAF, tile_ops=ops)
            return jnp.sum(z.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.value_and_grad(loss, (0, 1)))
        return export.export(fn, platforms=("cuda",), disabled_checks=[triton])(params, x)


def test_gpu_layer_exports_for_cuda_with_in_place_kernels_and_no_window_copies():
    """Forward + backward of the layer lower to Triton for cuda; every Triton call takes the
    whole leaf-major K buffer with its outputs aliased to the state/gradient buffers, and no op
    around them cuts or writes back a window of leaves or switches over block shapes (the same
    check finds them on the window path)."""
    exported = _export_layer_for_cuda(window=False)
    text = exported.mlir_module()
    calls = [line for line in text.splitlines() if "@__gpu$xla.gpu.triton" in line]
    names = collections.Counter(re.findall(r'name = "(rt_\w+)"', text))
    assert names == {"rt_fenwick_merge_gpu": 2, "rt_fenwick_dkdv_gpu": 1, "rt_fenwick_dq_gpu": 1}
    k_buffer = (N_LEAVES, BATCH, LAYER_G, LEAF, LAYER_KD)
    assert len(calls) == 4 and all(k_buffer in _dims(c.rsplit("} : (", 1)[1]) for c in calls)
    # state (merge: 3), dK + dV (2), dq (1) aliased to the results: written where they lie
    assert sorted(c.count("operand_index =") for c in calls) == [1, 2, 3, 3]
    assert window_ops_in_leaf_loops(text) == []
    assert export.deserialize(exported.serialize()).platforms == ("cuda",)
    window_text = _export_layer_for_cuda(window=True).mlir_module()
    assert "rt_tile_merge_gpu" in window_text
    assert len(window_ops_in_leaf_loops(window_text)) > 10
