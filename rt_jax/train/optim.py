"""The reference optimizer: global-norm clipping, then AdamW with warmup + cosine schedule."""

from __future__ import annotations

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


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay) at the scheduled rate."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=jnp.float32,
        ),
    )
