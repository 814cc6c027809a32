"""The Pallas layer on a device mesh: kernels under shard_map inside the sharded train step.

On fake CPU devices (interpret mode) a (data, fsdp, tensor) = (1, 2, 2) Pallas train step
equals the unsharded tiled step (loss, gradient norm, parameters after the step) and on
(2, 2, 2) its gradients equal the tiled ones; for v5e:2x2 and v6e:2x2 the same train step with compiled
kernels (interpret=False) AOT-compiles with libtpu from this CPU host.
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rt_jax.models.lm import loss_sums
from rt_jax.ops.pallas_tiles import tile_partition
from rt_jax.train.config import MeshConfig, apply_overrides, get_preset
from rt_jax.train.sharding import make_mesh, param_shardings
from rt_jax.train.step import build_train_step

# 4 heads (ALiBi, so the head offset of each tensor shard matters), 2 kv heads, 3 leaves of 4.
SMALL = [
    "model.block_type=recurrent",
    "model.n_layers=1",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.embedding_size=264",
    "model.leaf_size=4",
    "data.seq_len=12",
    "data.batch_size=4",
]


def _cfg(impl, *extra):
    return apply_overrides(get_preset("tiny"), SMALL + [f"model.impl={impl}", *extra])


def _batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg.data.batch_size, cfg.data.seq_len + 1)
    return [rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32) for _ in range(n)]


def _run(cfg, mesh, batches):
    ts = build_train_step(cfg, mesh)
    state, out = ts.init(), []
    for tokens in batches:
        state, metrics = ts.step(
            state, {"tokens": jax.device_put(tokens, ts.batch_sharding["tokens"])}
        )
        out.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return np.asarray(out), jax.device_get(state["params"])


def test_tile_partition_uses_axes_that_divide():
    mesh = make_mesh(MeshConfig(2, 2, 2)).abstract_mesh
    assert tile_partition(mesh, 4, 4, 2) == (("data", "fsdp"), "tensor")
    assert tile_partition(mesh, 2, 4, 1) == (("data",), None)  # 1 kv head: heads stay whole
    assert tile_partition(mesh, 3, 6, 6) == ((), "tensor")


def test_sharded_pallas_step_equals_unsharded_tiled_step():
    batches = _batches(_cfg("tiled"), 1)
    mesh = make_mesh(MeshConfig(1, 2, 2), jax.devices()[:4])  # batch over fsdp, heads over tensor
    pallas, params_p = _run(_cfg("pallas", "model.interpret=true"), mesh, batches)
    tiled, params_t = _run(
        _cfg("tiled"), make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), batches
    )
    np.testing.assert_allclose(pallas, tiled, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params_p, params_t)


@pytest.mark.parametrize(
    "extra",
    [[], ["model.leaf_size=8", "data.seq_len=24"]],  # leaf 8: the in-place Fenwick kernels
    ids=["window-calls", "in-place"],
)
def test_sharded_pallas_gradients_equal_tiled(extra):
    cfg_p = _cfg("pallas", "model.interpret=true", *extra)
    cfg_t = _cfg("tiled", *extra)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    ts = build_train_step(cfg_t, mesh)
    params = ts.init()["params"]
    tokens = jax.device_put(_batches(cfg_t, 1, seed=4)[0], ts.batch_sharding["tokens"])

    def grads(model_cfg):
        def loss(p, t):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return loss_sums(p, t[:, :-1], t[:, 1:], model_cfg)[0]

        shardings = (param_shardings(params, mesh), NamedSharding(mesh, P(("data", "fsdp"))))
        return jax.jit(jax.value_and_grad(loss), in_shardings=shardings)(params, tokens)

    (lp, gp), (lt, gt) = grads(cfg_p.model), grads(cfg_t.model)
    np.testing.assert_allclose(float(lp), float(lt), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gt), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, rtol=0)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_pallas_train_step_aot_compiles_for_tpu(topology):
    import libtpu  # noqa: F401  (a test dependency; compiles for TPU need it)
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology, platform="tpu")
    mesh = make_mesh(MeshConfig(2, 1, 2), topo.devices)
    cfg = _cfg("pallas", "model.interpret=false", "model.compute_dtype=bfloat16")
    ts = build_train_step(cfg, mesh)
    compiled = ts.step.lower(ts.abstract_state, ts.batch_spec).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 2  # merge (fwd) and grads (bwd) kernels
