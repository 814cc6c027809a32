"""Pallas tile kernels (TPU and GPU variants, interpret mode) against the jnp tile references."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.rt_tiles import gpu, reference, tpu
from pallas_kernels.rt_tiles.api import tile_kernels
from pallas_kernels.rt_tiles.config import GpuTileConfig, TpuTileConfig
from rt_jax.ops.block import AttentionSpec, apply_rope
from rt_jax.ops.pallas_tiles import pallas_tile_ops

# Small blocks so that every case has partial query blocks, several key chunks and (TPU) a key
# block split over two resident calls.
TPU_SMALL = TpuTileConfig(block_q=128, block_k=128, max_resident_keys=256)
GPU_SMALL = GpuTileConfig(block_q=16, block_k=32)
# RT_PALLAS_COMPILED=1 (set by `make gpu-check` on a GPU machine, never by `make test`): compile
# the GPU kernels instead of interpreting them (run with -k "gpu and not tpu").
GPU_INTERPRET = os.environ.get("RT_PALLAS_COMPILED") != "1"
KERNELS = {
    "tpu": (functools.partial(tpu.merge, config=TPU_SMALL, interpret=True),
            functools.partial(tpu.grads, config=TPU_SMALL, interpret=True)),
    "gpu": (functools.partial(gpu.merge, config=GPU_SMALL, interpret=GPU_INTERPRET),
            functools.partial(gpu.grads, config=GPU_SMALL, interpret=GPU_INTERPRET)),
}  # fmt: skip
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# (backend, dtype, position, heads, kv heads, T, S)
CASES = [
    ("tpu", jnp.float32, "alibi", 4, 2, 150, 300),
    ("tpu", jnp.bfloat16, "rope", 2, 2, 40, 70),
    ("gpu", jnp.float32, "alibi", 4, 2, 37, 70),
    ("gpu", jnp.bfloat16, "rope", 4, 1, 20, 45),
]


def _inputs(seed, dtype, position, h, g, t, s, kd=16, b=2):
    """Fresh random tile inputs: scaled queries after keys, RoPE applied before the kernel."""
    ks = jax.random.split(jax.random.key(seed), 8)
    spec = AttentionSpec(n_heads=h, n_kv_heads=g, head_dim=kd, position=position)
    k_pos = jnp.arange(s) + 3
    q_pos = jnp.arange(t) + s + 11
    q = jax.random.normal(ks[0], (b, t, h, kd)) / np.sqrt(kd)
    k = jax.random.normal(ks[1], (b, s, g, kd))
    v = jax.random.normal(ks[2], (b, g, s, kd)).astype(dtype)
    if position == "rope":
        q, k = apply_rope(q, q_pos, 1e4), apply_rope(k, k_pos, 1e4)
    q = jnp.swapaxes(q, 1, 2).astype(dtype)
    k = jnp.swapaxes(k, 1, 2).astype(dtype)
    state = reference.SoftmaxState(
        jax.random.normal(ks[3], (b, h, t, kd)),
        jax.random.normal(ks[4], (b, h, t)),
        jnp.exp(jax.random.normal(ks[5], (b, h, t))),
    )
    return spec, q, k, v, state, q_pos, k_pos, ks[6]


def _close(actual, expected, tol):
    scale = float(jnp.max(jnp.abs(expected))) + 1.0
    assert bool(jnp.all(jnp.isfinite(actual))), "kernel left non-finite values"
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=tol * scale, rtol=0)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(str(x) for x in (c[0], jnp.dtype(c[1]).name) + c[2:])
)
def test_merge_matches_reference(case):
    backend, dtype, position, h, g, t, s = case
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(CASES.index(case), dtype, position, h, g, t, s)
    out = KERNELS[backend][0](q, k, v, state, q_pos, k_pos, spec)
    ref = reference.merge_block(q, k, v, state, q_pos, k_pos, spec)
    for a, r in zip(out, ref, strict=True):
        chex.assert_equal_shape([a, r])
        assert a.dtype == jnp.float32
        _close(a, r, TOL[dtype])


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(str(x) for x in (c[0], jnp.dtype(c[1]).name) + c[2:])
)
def test_grads_match_reference_and_autodiff(case):
    """The grads kernel == block_grads, and == jax.vjp of softmax attention over the tile alone."""
    backend, dtype, position, h, g, t, s = case
    spec, q, k, v, _, q_pos, k_pos, key = _inputs(
        100 + CASES.index(case), dtype, position, h, g, t, s
    )
    r = h // g

    def attention(q, k, v):
        logits = reference.tile_logits(q, k, q_pos, k_pos, spec)
        p = jax.nn.softmax(logits, axis=-1)
        vh = jnp.repeat(v.astype(jnp.float32), r, axis=1)
        return jnp.einsum("bhts,bhsk->bhtk", p, vh), jax.nn.logsumexp(logits, axis=-1)

    (att, lse), vjp = jax.vjp(attention, q, k, v)
    g_out = jax.random.normal(key, att.shape)
    delta = jnp.sum(att * g_out, axis=-1)
    dq, dk, dv = KERNELS[backend][1](q, k, v, g_out.astype(dtype), lse, delta, q_pos, k_pos, spec)
    ref = reference.block_grads(q, k, v, g_out.astype(dtype), lse, delta, q_pos, k_pos, spec)
    for a, b_ in zip((dq, dk, dv), ref, strict=True):
        chex.assert_equal_shape([a, b_])
        _close(a, b_, TOL[dtype])
    if dtype == jnp.float32:
        auto = vjp((g_out, jnp.zeros_like(lse)))
        for a, b_ in zip((dq, dk, dv), auto, strict=True):
            _close(a, b_, 1e-4)


def test_tpu_and_gpu_kernels_agree_on_odd_tile():
    """Both lowerings give the same state on a tile whose sizes divide no block size."""
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(9, jnp.float32, "alibi", 2, 1, 131, 259)
    a = KERNELS["tpu"][0](q, k, v, state, q_pos, k_pos, spec)
    b = KERNELS["gpu"][0](q, k, v, state, q_pos, k_pos, spec)
    for x, y in zip(a, b, strict=True):
        _close(x, y, 2e-5)


def test_tpu_interpreter_with_nan_filled_memory():
    """Mosaic's own interpreter fills unwritten buffers with NaN: every output element is written.

    grads on a ragged tile (partial query block, key block split over two resident calls); merge
    on an aligned tile (its in-place state aliasing trips a shape check of this interpreter on
    padded blocks, see docs/kernels.md).
    """
    strict = pltpu.InterpretParams(uninitialized_memory="nan")
    spec, q, k, v, state, q_pos, k_pos, key = _inputs(21, jnp.float32, "alibi", 2, 1, 200, 300, b=1)
    lse = reference.merge_block(q, k, v, state, q_pos, k_pos, spec)
    lse = lse.max + jnp.log(lse.den)
    g_out = jax.random.normal(key, q.shape)
    delta = jax.random.normal(key, lse.shape)
    out = tpu.grads(q, k, v, g_out, lse, delta, q_pos, k_pos, spec, config=TPU_SMALL,
                    interpret=strict)  # fmt: skip
    ref = reference.block_grads(q, k, v, g_out, lse, delta, q_pos, k_pos, spec)
    for a, r in zip(out, ref, strict=True):
        _close(a, r, 2e-5)
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(22, jnp.float32, "alibi", 2, 1, 128, 256, b=1)
    out = tpu.merge(q, k, v, state, q_pos, k_pos, spec, config=TPU_SMALL, interpret=strict)
    ref = reference.merge_block(q, k, v, state, q_pos, k_pos, spec)
    for a, r in zip(out, ref, strict=True):
        _close(a, r, 2e-5)


def test_one_call_per_fenwick_block_equals_leaf_tiles():
    """The block granularity (whole Fenwick block, keys resident) == the scan's leaf x leaf calls."""
    leaf, n_leaves = 8, 4
    t = s = leaf * n_leaves
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(23, jnp.float32, "alibi", 4, 2, t, s)
    merge = KERNELS["tpu"][0]
    block = merge(q, k, v, state, q_pos, k_pos, spec)
    tiles = []
    for j in range(n_leaves):
        qs = slice(j * leaf, (j + 1) * leaf)
        st = reference.SoftmaxState(state.acc[:, :, qs], state.max[:, :, qs], state.den[:, :, qs])
        for i in range(n_leaves):
            ks = slice(i * leaf, (i + 1) * leaf)
            st = reference.merge_block(
                q[:, :, qs], k[:, :, ks], v[:, :, ks], st, q_pos[qs], k_pos[ks], spec
            )
        tiles.append(st.acc / st.den[..., None])
    _close(block.acc / block.den[..., None], jnp.concatenate(tiles, axis=2), 2e-5)


def test_cpu_needs_interpret_and_named_backend_must_fit():
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_tile_ops(interpret=False)
    with pytest.raises(ValueError, match="unknown Pallas backend"):
        tile_kernels("cuda-graphs", interpret=True)
    with pytest.raises(ValueError, match="needs a GpuTileConfig"):
        tile_kernels("gpu", interpret=True, config=TpuTileConfig())
    with pytest.raises(ValueError, match="multiple of 128"):
        TpuTileConfig(block_q=100)
    with pytest.raises(ValueError, match="power of two"):
        GpuTileConfig(block_k=48)
    ops = pallas_tile_ops(interpret=True, backend="gpu")
    assert ops.name == "pallas-gpu-interpret"


def test_kernel_inside_shard_map_equals_unsharded():
    """Data-parallel over the 8 fake CPU devices: each shard runs the kernel on its batch rows."""
    devices = jax.devices()
    assert len(devices) == 8
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(3, jnp.float32, "alibi", 2, 2, 24, 40, b=8)
    ops = pallas_tile_ops(interpret=True, backend="tpu", config=TPU_SMALL)
    mesh = jax.make_mesh((8,), ("data",))
    d = P("data")

    def local(q, k, v, acc, mx, den):
        out = ops.merge(q, k, v, reference.SoftmaxState(acc, mx, den), q_pos, k_pos, spec)
        return tuple(out)

    args = [jax.device_put(a, NamedSharding(mesh, d)) for a in (q, k, v, *state)]
    sharded = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(d,) * 6, out_specs=(d,) * 3, check_vma=False)
    )(*args)
    assert len(sharded[0].sharding.device_set) == 8
    plain = local(q, k, v, *state)
    for a, b in zip(sharded, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_configs_follow_the_device_kind_and_the_tile_size():
    from pallas_kernels.rt_tiles import config as cfg

    assert cfg.tpu_config_for("TPU v5 lite") is cfg.TPU_V5E
    assert cfg.tpu_config_for("TPU v6 lite") is cfg.TPU_V6E
    assert cfg.tpu_config_for("TPU v5") is cfg.TPU_V5P
    assert len({cfg.TPU_V5E, cfg.TPU_V6E, cfg.TPU_V5P}) == 3
    assert all(c.vmem_limit_bytes for c in (cfg.TPU_V5E, cfg.TPU_V6E, cfg.TPU_V5P))
    assert cfg.gpu_config_for_tile(32, 32).block_q == 32
    assert cfg.gpu_config_for_tile(2048, 2048).num_warps == 8
    with pytest.raises(ValueError, match="vmem_limit_bytes"):
        TpuTileConfig(vmem_limit_bytes=-1)


def test_kernels_use_the_global_head_of_a_shard_for_alibi():
    """head_offset = the shard's first global head: slopes of heads 2, 3 of 4 on a 2-head slice."""
    spec, q, k, v, state, q_pos, k_pos, _ = _inputs(31, jnp.float32, "alibi", 4, 4, 24, 40)
    full = reference.merge_block(q, k, v, state, q_pos, k_pos, spec)
    part = [a[:, 2:] for a in (q, k, v)] + [reference.SoftmaxState(*(a[:, 2:] for a in state))]
    for backend in ("tpu", "gpu"):
        out = KERNELS[backend][0](*part, q_pos, k_pos, spec, head_offset=2)
        for a, r in zip(out, full, strict=True):
            _close(a, r[:, 2:], 2e-5)
