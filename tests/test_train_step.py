"""The sharded train step: equals the unsharded step, microbatching equals the full batch,
the loss ignores padding rows, bf16 compute keeps float32 master weights, RT tiled trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rt_jax.models.lm import cross_entropy_sums
from rt_jax.train.config import MeshConfig, apply_overrides, get_preset
from rt_jax.train.sharding import make_mesh
from rt_jax.train.step import build_train_step


def _batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg.data.batch_size, cfg.data.seq_len + 1)
    return [rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32) for _ in range(n)]


def _run(cfg, mesh, batches, *, aot=False, key="loss"):
    ts = build_train_step(cfg, mesh)
    step = ts.step.lower(ts.abstract_state, ts.batch_spec).compile() if aot else ts.step
    state = ts.init()
    losses = []
    for tokens in batches:
        state, metrics = step(
            state, {"tokens": jax.device_put(tokens, ts.batch_sharding["tokens"])}
        )
        losses.append([float(metrics[k]) for k in ("loss", "total_loss")])
    losses = np.asarray(losses)
    return losses[:, 0] if key == "loss" else losses, jax.device_get(state["params"]), state


def test_sharded_step_equals_unsharded():
    cfg = apply_overrides(get_preset("tiny"), ["model.n_heads=4", "model.embedding_size=264"])
    batches = _batches(cfg, 2)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    loss8, params8, state8 = _run(cfg, mesh, batches, aot=True)
    loss1, params1, _ = _run(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), batches)
    np.testing.assert_allclose(loss8, loss1, rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), params8, params1)
    specs = {k: v.sharding.spec for k, v in state8["params"]["blocks"].items()}
    assert specs["w_q"] == P(None, "fsdp", "tensor") and specs["w_o"] == P(None, "tensor", "fsdp")
    assert specs["attn_norm"] == P(None, None)
    assert state8["params"]["embed"].sharding.spec == P("tensor", "fsdp")
    mu = state8["opt_state"][1][0].mu
    assert mu["blocks"]["w_ff_in"].sharding.spec == P(None, "fsdp", "tensor")
    assert loss8[-1] < loss8[0]


def test_microbatch_accumulation_equals_full_batch():
    cfg = apply_overrides(get_preset("tiny"), ["z_loss=0.01"])
    batches = _batches(cfg, 2, seed=1)
    mesh = make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
    loss_full, params_full, _ = _run(cfg, mesh, batches, key="both")
    micro = apply_overrides(cfg, ["microbatches=4"])
    loss_micro, params_micro, _ = _run(micro, mesh, batches, key="both")
    np.testing.assert_allclose(loss_micro, loss_full, rtol=2e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=3e-6), params_micro, params_full
    )
    ce, total = loss_full[0]
    assert total > ce + 0.01 * 20.0  # z-loss adds 0.01 * mean(log Z^2); log Z ~ log(257) at init
    with pytest.raises(ValueError, match="not divisible by the mesh's data\\*fsdp = 4"):
        build_train_step(micro, make_mesh(MeshConfig(4, 1, 1), jax.devices()[:4]))


def test_cross_entropy_ignores_padding_rows():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 5, 12))
    targets = jnp.asarray([[0, 1, 2, 3, 9], [9, 8, 7, 6, 5]])
    padded = logits.at[..., 10:].set(50.0)  # padding rows must get no probability
    ce, _ = cross_entropy_sums(padded, targets, vocab_size=10)
    real = logits[..., :10]
    expected = jnp.sum(
        jax.nn.logsumexp(real, -1) - jnp.take_along_axis(real, targets[..., None], -1)[..., 0]
    )
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    grad = jax.grad(lambda x: cross_entropy_sums(x, targets, 10)[0])(padded)
    assert np.all(np.asarray(grad[..., 10:]) == 0.0)


def test_bf16_compute_keeps_float32_master_weights():
    cfg = apply_overrides(get_preset("tiny"), ["model.n_layers=1"])
    batches = _batches(cfg, 1, seed=2)
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    loss32, _, _ = _run(cfg, mesh, batches)
    loss16, params16, _ = _run(
        apply_overrides(cfg, ["model.compute_dtype=bfloat16"]), mesh, batches
    )
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params16))
    np.testing.assert_allclose(loss16, loss32, rtol=1e-2)


def test_recurrent_tiled_step_matches_reference():
    over = [
        "model.block_type=recurrent",
        "model.n_layers=1",
        "data.seq_len=16",
        "data.batch_size=4",
    ]
    cfg = apply_overrides(get_preset("tiny"), over + ["model.impl=tiled", "model.leaf_size=4"])
    ref = apply_overrides(cfg, ["model.impl=reference"])
    batches = _batches(cfg, 2, seed=3)
    mesh = make_mesh(MeshConfig(2, 1, 1), jax.devices()[:2])
    loss_t, params_t, _ = _run(cfg, mesh, batches)
    loss_r, params_r, _ = _run(ref, mesh, batches)
    np.testing.assert_allclose(loss_t, loss_r, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params_t, params_r)
