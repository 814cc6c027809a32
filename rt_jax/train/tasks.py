"""Training and scoring small models on the synthetic tasks of ``rt_jax.data.synthetic``.

Each step draws a fresh batch from the task generator (training seeds and held-out evaluation seeds
are disjoint), computes the masked cross-entropy of ``rt_jax.models.lm.forward`` on the scored
positions only, and applies the reference optimizer (``rt_jax.train.optim.make_optimizer``: clipping,
AdamW, warmup from 0.1*lr over 40% of the steps, cosine to 0.1*lr).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rt_jax.config import ModelConfig
from rt_jax.data.synthetic import TaskBatch, get_task, make_batch
from rt_jax.models.lm import forward, init_params
from rt_jax.train.config import TrainConfig
from rt_jax.train.optim import make_optimizer

_TRAIN_SEED_STRIDE = 1_000_000
_EVAL_SEED_BASE = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """One cell of the synthetic suite: a task, a model, a length, a seed and a budget."""

    task: str
    block_type: str = "recurrent"
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 16
    mlp_hidden: int = 512
    seq_len: int = 64
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    eval_batches: int = 4
    impl: str = "tiled"
    position: str = "alibi"

    def __post_init__(self) -> None:
        task = get_task(self.task)
        if self.seq_len < task.min_seq_len:
            raise ValueError(f"task {self.task!r} needs seq_len >= {task.min_seq_len}")
        for name in ("steps", "batch_size", "eval_batches", "n_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TaskRun.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < _TRAIN_SEED_STRIDE // 1000:
            raise ValueError(f"TaskRun.seed must lie in [0, 1000), got {self.seed}")

    def model_config(self) -> ModelConfig:
        """The language model for this cell; its vocabulary is the task's."""
        return ModelConfig(
            vocab_size=get_task(self.task).vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            mlp_hidden=self.mlp_hidden,
            block_type=self.block_type,
            impl=self.impl,
            position=self.position,
        )


def masked_loss_and_accuracy(
    params: Any, batch: TaskBatch, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and token accuracy over the scored positions of a batch."""
    logits = forward(params, batch.inputs, config)[..., : config.vocab_size]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
    mask = batch.mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == batch.targets).astype(jnp.float32)
    return (ce * mask).sum() / count, (correct * mask).sum() / count


def _batch(run: TaskRun, seed: int) -> TaskBatch:
    return TaskBatch(
        *(jnp.asarray(a) for a in make_batch(run.task, seed, run.batch_size, run.seq_len))
    )


def evaluate(params: Any, run: TaskRun) -> float:
    """Token accuracy on held-out sequences (scored positions only)."""
    config = run.model_config()
    score = jax.jit(lambda p, b: masked_loss_and_accuracy(p, b, config))
    correct = total = 0.0
    for i in range(run.eval_batches):
        batch = _batch(run, _EVAL_SEED_BASE + 1000 * run.seed + i)
        _, acc = score(params, batch)
        n = float(np.asarray(batch.mask).sum())
        correct += float(acc) * n
        total += n
    return correct / max(total, 1.0)


def accuracy_by_position(params: Any, run: TaskRun) -> np.ndarray:
    """Held-out token accuracy at each position (NaN where no sequence is scored there)."""
    config = run.model_config()
    logits_fn = jax.jit(lambda p, x: forward(p, x, config)[..., : config.vocab_size])
    correct = np.zeros(run.seq_len)
    count = np.zeros(run.seq_len)
    for i in range(run.eval_batches):
        batch = make_batch(
            run.task, _EVAL_SEED_BASE + 1000 * run.seed + i, run.batch_size, run.seq_len
        )
        pred = np.asarray(jnp.argmax(logits_fn(params, jnp.asarray(batch.inputs)), axis=-1))
        correct += ((pred == batch.targets) & batch.mask).sum(axis=0)
        count += batch.mask.sum(axis=0)
    with np.errstate(invalid="ignore"):
        return correct / count


def train_task(run: TaskRun) -> dict[str, Any]:
    """Train one cell; returns accuracy, final loss, a loss curve, seconds per step and params."""
    config = run.model_config()
    tx = make_optimizer(TrainConfig(model=config, steps=run.steps, lr=run.lr))
    params = init_params(config, jax.random.key(run.seed))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, acc), grads = jax.value_and_grad(masked_loss_and_accuracy, has_aux=True)(
            params, batch, config
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    curve = []
    start = time.perf_counter()
    for i in range(run.steps):
        batch = _batch(run, _TRAIN_SEED_STRIDE * (run.seed + 1) + i)
        params, opt_state, loss, acc = step(params, opt_state, batch)
        if i % max(run.steps // 20, 1) == 0 or i == run.steps - 1:
            curve.append({"step": i, "loss": float(loss), "train_accuracy": float(acc)})
    seconds = time.perf_counter() - start
    if not np.isfinite(curve[-1]["loss"]):
        raise FloatingPointError(f"{run}: loss became {curve[-1]['loss']}; lower the lr")
    return {
        "accuracy": evaluate(params, run),
        "final_loss": curve[-1]["loss"],
        "curve": curve,
        "seconds_per_step": seconds / run.steps,
        "params": params,
    }
