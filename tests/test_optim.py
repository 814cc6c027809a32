"""The optimizer's LRT parameter group: gamma and the gates train at gate_lr_scale x the rate."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rt_jax.config import MemoryConfig, ModelConfig
from rt_jax.models import lm
from rt_jax.train.config import TrainConfig
from rt_jax.train.optim import GATE_GROUP, make_optimizer, param_group_labels


def _cfg(scale: float, kind: str = "shared") -> TrainConfig:
    model = ModelConfig(
        vocab_size=11,
        d_model=8,
        n_heads=2,
        n_layers=2,
        block_type="transformer",
        memory=MemoryConfig(kind=kind, gate_lr_scale=scale),
    )
    return TrainConfig(model=model, steps=10, lr=1e-3, weight_decay=0.0, warmup_fraction=0.0)


def test_labels_cover_gamma_and_gates_only():
    params = lm.init_params(_cfg(5.0).model, jax.random.key(0))
    labels = param_group_labels(params)
    assert labels["lrt"]["gamma"] == labels["lrt"]["w_gate"] == GATE_GROUP
    others = [v for k, v in labels["lrt"].items() if k not in ("gamma", "w_gate")]
    others += jax.tree.leaves({k: v for k, v in labels.items() if k != "lrt"})
    assert others and all(v == "default" for v in others)


@pytest.mark.parametrize("scale", [5.0, 0.25])
def test_gate_group_steps_at_the_scaled_rate(scale):
    """One step from the same gradients: the gate group's Adam update is exactly ``scale`` times
    the single-group optimizer's (clipping is off: the gradients are small), the rest equal."""
    cfg = _cfg(scale)
    params = lm.init_params(cfg.model, jax.random.key(0))
    grads = jax.tree.map(lambda p: 1e-3 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
    plain = make_optimizer(dataclasses.replace(cfg, model=_cfg(1.0).model))
    grouped = make_optimizer(cfg)
    want, _ = plain.update(grads, plain.init(params), params)
    got, _ = grouped.update(grads, grouped.init(params), params)
    labels = param_group_labels(params)
    for path_labels, g, w in zip(
        jax.tree.leaves(labels), jax.tree.leaves(got), jax.tree.leaves(want), strict=True
    ):
        factor = scale if path_labels == GATE_GROUP else 1.0
        np.testing.assert_allclose(np.asarray(g), factor * np.asarray(w), rtol=1e-6, atol=1e-12)
    assert np.max(np.abs(np.asarray(got["lrt"]["gamma"]))) > 0


def test_no_group_without_memory_or_at_scale_one():
    """Scale 1 (and non-LRT models) keep the single-group optimizer state (checkpoints match)."""
    cfg = _cfg(1.0)
    params = lm.init_params(cfg.model, jax.random.key(0))

    def has_groups(c):
        state = make_optimizer(c).init(params)
        leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.MultiTransformState))
        return any(isinstance(s, optax.MultiTransformState) for s in leaves)

    assert has_groups(_cfg(3.0)) and not has_groups(cfg)
    with pytest.raises(ValueError, match="gate_lr_scale"):
        MemoryConfig(kind="shared", gate_lr_scale=0.0)
