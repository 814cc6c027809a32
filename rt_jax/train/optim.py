"""The reference optimizer: global-norm clipping, then AdamW with warmup + cosine schedule.

LRT models with ``model.memory.gate_lr_scale != 1`` get a second AdamW parameter group (Optax
``multi_transform``) for the memory pathway's scalars and gates (``lrt/gamma``, ``lrt/w_gate``)
at ``gate_lr_scale`` times the scheduled rate, as the LRT reference code gives gamma its own
learning rate; every other setting (betas, eps, weight decay, clipping) is shared.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from rt_jax.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from ``warmup_start_fraction*lr`` to ``lr``, then cosine to ``final*lr``.

    The warmup lasts ``round(warmup_fraction * steps)`` steps; the cosine ends at ``steps``.
    """
    warmup = int(round(cfg.warmup_fraction * cfg.steps))
    start = cfg.warmup_start_fraction * cfg.lr
    final = cfg.final_lr_fraction * cfg.lr
    decay = max(cfg.steps - warmup, 1)
    cosine = optax.cosine_decay_schedule(cfg.lr, decay, alpha=final / cfg.lr)
    if warmup == 0:
        return cosine
    linear = optax.linear_schedule(start, cfg.lr, warmup)
    return optax.join_schedules([linear, cosine], [warmup])


GATE_GROUP = "memory_gates"
"""Label of the LRT gate/gamma parameter group in ``multi_transform``."""
GATE_PARAMS = (("lrt", "gamma"), ("lrt", "w_gate"))
"""Parameter paths (top-level key, name) that form the gate group."""


def param_group_labels(params: Any) -> Any:
    """A pytree like ``params`` labelling each leaf ``GATE_GROUP`` (LRT gamma and gates) or
    "default"."""

    def label(path: tuple, _: Any) -> str:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        return GATE_GROUP if keys[:2] in GATE_PARAMS else "default"

    return jax.tree_util.tree_map_with_path(label, params)


def _adamw(cfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mu_dtype=jnp.float32,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay) at the scheduled rate; an LRT
    model with ``memory.gate_lr_scale != 1`` trains its gamma and gates in their own group."""
    schedule = learning_rate_schedule(cfg)
    memory = cfg.model.memory
    if not memory.enabled or memory.gate_lr_scale == 1.0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), _adamw(cfg, schedule))
    scale = float(memory.gate_lr_scale)
    groups = {
        "default": _adamw(cfg, schedule),
        GATE_GROUP: _adamw(cfg, lambda step: scale * schedule(step)),
    }
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform(groups, param_group_labels),
    )
