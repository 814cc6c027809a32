"""attention="flash" (the platform's fused kernel) against attention="xla" (the einsum reference).

On CPU the TPU kernel (JAX's Pallas TPU flash attention) runs in Pallas's TPU interpret mode
(``interpret=True``); without it, and for CUDA on a machine without a GPU, lowering must fail with
a ValueError naming ``attention``. The TPU kernel is also compiled with libtpu for v5e inside a
small Transformer train step.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as P

from rt_jax.config import ModelConfig
from rt_jax.ops.block import AttentionSpec
from rt_jax.ops.transformer import causal_attention

KD = 16


def _inputs(b, m, n, h, g, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, m, h, KD), dtype) / np.sqrt(KD)  # pre-scaled, as the block
    k = jax.random.normal(ks[1], (b, n, g, KD), dtype)
    v = jax.random.normal(ks[2], (b, n, g, KD), dtype)
    ct = jax.random.normal(ks[3], (b, m, h, KD), jnp.float32)
    return q, k, v, ct


def _fwd_and_grads(spec, q, k, v, ct, q_pos=None, mesh=None):
    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, spec, q_pos), q, k, v)
        return out, vjp(ct.astype(out.dtype))

    @jax.jit
    def run(q, k, v):
        if mesh is None:
            return fwd_bwd(q, k, v)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step traces
            return fwd_bwd(q, k, v)

    if mesh is not None:  # the arrays live on the mesh's devices (replicated)
        q, k, v = jax.device_put((q, k, v), jax.sharding.NamedSharding(mesh, P()))
    return run(q, k, v)


def _assert_close(spec, args, q_pos=None, atol=2e-5, mesh=None):
    flash = dataclasses.replace(spec, attention="flash", interpret=True)
    out_x, grads_x = _fwd_and_grads(spec, *args, q_pos=q_pos)
    out_f, grads_f = _fwd_and_grads(flash, *args, q_pos=q_pos, mesh=mesh)
    assert out_f.dtype == out_x.dtype and out_f.shape == out_x.shape
    np.testing.assert_allclose(
        np.asarray(out_f, np.float32), np.asarray(out_x, np.float32), atol=atol
    )
    for name, a, b in zip("qkv", grads_f, grads_x, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, atol=4 * atol * scale, err_msg=f"d{name}")


@pytest.mark.parametrize(
    "position,h,g,n,dtype",
    [
        ("alibi", 4, 2, 8, "float32"),  # GQA, one (padded) block
        ("rope", 2, 2, 130, "float32"),  # MHA, N not a multiple of the 128 block: padded to 256
        ("none", 4, 1, 8, "bfloat16"),  # multi-query, bf16 inputs (float32 softmax in both)
    ],
)
def test_flash_equals_xla_forward_and_grads(position, h, g, n, dtype):
    spec = AttentionSpec(
        n_heads=h, n_kv_heads=g, head_dim=KD, position=position, compute_dtype=dtype
    )
    atol = 2e-5 if dtype == "float32" else 2e-2
    _assert_close(spec, _inputs(1, n, n, h, g, dtype=jnp.dtype(dtype)), atol=atol)


def test_flash_with_query_positions_under_a_mesh_equals_xla():
    """Queries at arbitrary positions over a K/V buffer (the LRT subset passes; mask via ab),
    traced under a (data=2, tensor=2) mesh: the kernel runs per shard inside shard_map."""
    spec = AttentionSpec(n_heads=4, n_kv_heads=2, head_dim=KD, position="alibi")
    q_pos = jnp.arange(1, 20, 3)
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=auto, devices=jax.devices()[:4])
    _assert_close(spec, _inputs(2, len(q_pos), 20, 4, 2, seed=1), q_pos=q_pos, mesh=mesh)


def test_flash_fails_fast_on_cpu_without_interpret():
    spec = AttentionSpec(n_heads=2, n_kv_heads=2, head_dim=KD, attention="flash")
    q, k, v, _ = _inputs(1, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="attention='flash' cannot run on cpu"):
        jax.jit(lambda q, k, v: causal_attention(q, k, v, spec))(q, k, v)


def test_flash_export_for_cuda_fails_fast_without_a_gpu():
    """cuDNN's attention can only be traced where the CUDA plugin sees a GPU: not here."""
    spec = AttentionSpec(
        n_heads=2, n_kv_heads=2, head_dim=KD, attention="flash", compute_dtype="bfloat16"
    )
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, dtype=jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: causal_attention(q, k, v, spec))
    with pytest.raises(ValueError, match="attention='flash' cannot run on cuda: no GPU"):
        export.export(fn, platforms=("cuda",))(q, k, v)


def test_config_checks_attention():
    with pytest.raises(ValueError, match="ModelConfig.attention"):
        ModelConfig(attention="splash")
    with pytest.raises(ValueError, match="ModelConfig.attention='flash' has no float64"):
        ModelConfig(attention="flash", compute_dtype="float64")
    with pytest.raises(ValueError, match="attention="):
        AttentionSpec(n_heads=2, n_kv_heads=2, head_dim=KD, attention="cudnn")
    spec = ModelConfig(attention="flash", interpret=True).attention_spec()
    assert spec.attention == "flash" and spec.interpret


def test_paper_presets_use_flash():
    from rt_jax.train.config import get_preset

    for name in ("paper-150m", "paper-300m"):
        assert get_preset(name).model.attention == "flash"


def test_transformer_train_step_with_flash_compiles_for_v5e():
    """The tiny preset's Transformer train step with attention="flash", Mosaic-compiled (libtpu)."""
    import libtpu  # noqa: F401  (a test dependency; compiles for TPU need it)
    from jax.experimental import topologies

    from experiments import aot_compile
    from rt_jax.train.sharding import make_mesh
    from rt_jax.train.step import build_train_step

    cfg = aot_compile._cell_config("tiny", ["model.attention=flash"], "transformer-2L", [])
    assert cfg.model.attention == "flash" and cfg.model.block_type == "transformer"
    devices = list(topologies.get_topology_desc("v5e:2x2", platform="tpu").devices)
    step = build_train_step(cfg, make_mesh(cfg.mesh, devices))
    compiled = step.step.lower(step.abstract_state, step.batch_spec).compile()
    hlo = compiled.as_text()
    # the forward kernel and the two backward kernels (dK/dV, dQ) of each scanned layer body
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3
    assert compiled.memory_analysis().temp_size_in_bytes > 0
