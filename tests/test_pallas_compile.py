"""Compile the tile kernels for real targets from this CPU machine, at the paper's layer shape.

TPU: ahead-of-time Mosaic compile with libtpu for v5e:2x2 and v6e:2x2 inside ``jax.shard_map``
under the topology's abstract mesh (works with JAX_PLATFORMS=cpu; no TPU needed). GPU: export the
Triton kernels for platforms=("cuda",) and serialize them.

libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) unless ALLOW_MULTIPLE_LIBTPU_LOAD is
set; without it a second process compiling for TPU at the same time (another test run, an
experiment) fails with "Internal error when accessing libtpu multi-process lockfile".
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.experimental import topologies
from jax.sharding import PartitionSpec as P

from pallas_kernels.rt_tiles import gpu, tpu
from pallas_kernels.rt_tiles.config import GPU_H100, TPU_V5E, TPU_V6E, TpuTileConfig
from rt_jax.ops.block import AttentionSpec
from rt_jax.ops.tiles import SoftmaxState

# The reference code's 150M layer: D = 1024, 16 heads of 64; 8 sequences per chip.
SPEC = AttentionSpec(n_heads=16, n_kv_heads=16, head_dim=64, compute_dtype="bfloat16")
BATCH_PER_CHIP = 8
# (T, S): a leaf tile of the scan (leaf 32), a whole Fenwick block at N = 4096, a ragged tile.
TILES = [(32, 32), (2048, 2048), (100, 300)]
SD = jax.ShapeDtypeStruct


def _shapes(b, t, s):
    h, g, kd = SPEC.n_heads, SPEC.n_kv_heads, SPEC.head_dim
    bf, f32 = jnp.bfloat16, jnp.float32
    q, kv = SD((b, h, t, kd), bf), SD((b, g, s, kd), bf)
    stat = SD((b, h, t), f32)
    pos = (SD((t,), jnp.int32), SD((s,), jnp.int32))
    merge_args = (q, kv, kv, SD((b, h, t, kd), f32), stat, stat) + pos
    grads_args = (q, kv, kv, q, stat, stat) + pos
    return merge_args, grads_args


def _tpu_compile(topology, fn, args):
    topo = topologies.get_topology_desc(topology, platform="tpu")
    mesh = topologies.make_mesh(topo, (len(topo.devices),), ("data",))
    specs = (P("data"),) * 6 + (P(), P())
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("data"), check_vma=False)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(sharded).lower(*args).compile()


def _tpu_fns(config):
    def merge(q, k, v, acc, mx, den, qp, kp):
        out = tpu.merge(q, k, v, SoftmaxState(acc, mx, den), qp, kp, SPEC, config=config)
        return tuple(out)

    def grads(q, k, v, g, lse, delta, qp, kp):
        return tpu.grads(q, k, v, g, lse, delta, qp, kp, SPEC, config=config)

    return merge, grads


@pytest.mark.parametrize("topology,config", [("v5e:2x2", TPU_V5E), ("v6e:2x2", TPU_V6E)])
def test_tpu_kernels_compile_at_paper_shape(topology, config):
    merge, grads = _tpu_fns(config)
    for t, s in TILES:
        merge_args, grads_args = _shapes(4 * BATCH_PER_CHIP, t, s)
        for fn, args in ((merge, merge_args), (grads, grads_args)):
            compiled = _tpu_compile(topology, fn, args)
            assert "tpu_custom_call" in compiled.as_text()


def test_tpu_compile_catches_vmem_overflow():
    """Holding 8192 keys resident in the grads kernel overflows v5e's scoped VMEM: a real compile."""
    _, grads = _tpu_fns(TpuTileConfig(max_resident_keys=8192))
    _, grads_args = _shapes(4 * BATCH_PER_CHIP, 8192, 8192)
    with pytest.raises(Exception, match="CompileTimeScopedVmemOom"):
        _tpu_compile("v5e:2x2", grads, grads_args)


def test_gpu_kernels_export_for_cuda():
    def merge(q, k, v, acc, mx, den, qp, kp):
        out = gpu.merge(q, k, v, SoftmaxState(acc, mx, den), qp, kp, SPEC, config=GPU_H100)
        return tuple(out)

    def grads(q, k, v, g, lse, delta, qp, kp):
        return gpu.grads(q, k, v, g, lse, delta, qp, kp, SPEC, config=GPU_H100)

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    # jax >= 0.11 asks the abstract mesh which GPU the Triton lowering targets (no GPU here).
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    target = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    for t, s in TILES:
        merge_args, grads_args = _shapes(BATCH_PER_CHIP, t, s)
        for fn, args, n_kernels in ((merge, merge_args, 1), (grads, grads_args, 2)):
            with jax.sharding.use_abstract_mesh(target):
                exported = export.export(
                    jax.jit(fn), platforms=("cuda",), disabled_checks=[triton]
                )(*args)
            assert exported.mlir_module().count("__gpu$xla.gpu.triton") == n_kernels
            blob = exported.serialize()
            assert export.deserialize(blob).platforms == ("cuda",)
