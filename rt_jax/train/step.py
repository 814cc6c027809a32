"""The sharded train step: loss, microbatch gradient accumulation, Optax update, under ``jax.jit``.

The state is a plain pytree ``{"params", "opt_state", "step", "rng"}`` (float32 parameters; the
model's ``compute_dtype`` sets the matmul precision). ``build_train_step`` returns the jitted step
with explicit in/out shardings over a ("data", "fsdp", "tensor") mesh, so
``step.lower(abstract_state, batch_spec).compile()`` works for any mesh, including TPU topologies
described from a CPU host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rt_jax.models.lm import eval_sums, init_params, loss_sums
from rt_jax.train import sharding as shd
from rt_jax.train.config import TrainConfig
from rt_jax.train.optim import learning_rate_schedule, make_optimizer

PyTree = Any


def split_tokens(tokens_BxNp1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inputs (B, N) and next-token targets (B, N) from a (B, N+1) batch."""
    return tokens_BxNp1[:, :-1], tokens_BxNp1[:, 1:]


def init_state(cfg: TrainConfig, optimizer: optax.GradientTransformation) -> PyTree:
    """A fresh train state from ``cfg.seed`` (pure; jit it with output shardings)."""
    key = jax.random.key(cfg.seed)
    k_params, k_rng = jax.random.split(key)
    params = init_params(cfg.model, k_params)
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(k_rng),
    }


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A compiled-on-demand train step and everything needed to feed or lower it."""

    step: Any  # jitted (state, batch) -> (state, metrics); state donated
    init: Callable[[], PyTree]  # jitted () -> sharded fresh state
    eval_step: Any  # jitted (params, batch) -> {"ce_sum", "tokens"}
    abstract_state: PyTree  # ShapeDtypeStruct pytree with shardings
    state_shardings: PyTree
    batch_spec: dict[str, jax.ShapeDtypeStruct]
    batch_sharding: dict[str, NamedSharding]
    mesh: Mesh
    schedule: optax.Schedule


def check_mesh_batch(cfg: TrainConfig, mesh: Mesh) -> None:
    """ValueError unless each microbatch splits evenly over the mesh's batch axes."""
    shards = shd.batch_shards(mesh)
    if cfg.micro_batch_size() % shards:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} / microbatches={cfg.microbatches} = "
            f"{cfg.micro_batch_size()} sequences per microbatch is not divisible by the mesh's "
            f"data*fsdp = {shards} batch shards: change data.batch_size, microbatches or "
            "mesh.data/mesh.fsdp"
        )
    if cfg.data.batch_size % jax.process_count():
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the "
            f"{jax.process_count()} processes: change data.batch_size"
        )


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced under ``mesh``'s abstract mesh, so kernels that must run per shard
    (``attention="flash"``, the ``impl="pallas"`` tile kernels) can wrap themselves in
    ``jax.shard_map``."""

    def traced(*args: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def build_train_step(cfg: TrainConfig, mesh: Mesh) -> TrainStep:
    """The jitted, sharded train step for ``cfg`` on ``mesh`` (see the module docstring)."""
    check_mesh_batch(cfg, mesh)
    model_cfg = cfg.model
    optimizer = make_optimizer(cfg)
    schedule = learning_rate_schedule(cfg)
    n_micro = cfg.microbatches
    seq_len = cfg.data.seq_len
    global_tokens = cfg.data.batch_size * seq_len

    abstract = jax.eval_shape(lambda: init_state(cfg, optimizer))
    p_shardings = shd.param_shardings(abstract["params"], mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = {
        "params": p_shardings,
        "opt_state": shd.tree_shardings_like_params(abstract["opt_state"], p_shardings, mesh),
        "step": replicated,
        "rng": replicated,
    }
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_shardings
    )
    tokens_sharding = shd.batch_sharding(mesh)
    batch_sharding = {"tokens": tokens_sharding}
    batch_spec = {
        "tokens": jax.ShapeDtypeStruct(
            (cfg.data.batch_size, seq_len + 1), jnp.int32, sharding=tokens_sharding
        )
    }

    def loss_fn(params: PyTree, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        inputs, targets = split_tokens(tokens)
        ce_sum, z_sum = loss_sums(params, inputs, targets, model_cfg)
        ce = ce_sum / global_tokens
        return ce + cfg.z_loss * z_sum / global_tokens, ce

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params: PyTree, tokens: jax.Array) -> tuple[jax.Array, jax.Array, PyTree]:
        if n_micro == 1:
            (total, ce), grads = grad_fn(params, tokens)
            return total, ce, grads
        b = tokens.shape[0]
        # Row r of microbatch m is global row r * n_micro + m: every device keeps its rows.
        micro = tokens.reshape(b // n_micro, n_micro, -1).swapaxes(0, 1)

        def body(carry: tuple, mb: jax.Array) -> tuple[tuple, None]:
            total, ce, acc = carry
            mb = jax.lax.with_sharding_constraint(mb, tokens_sharding)
            (t, c), g = grad_fn(params, mb)
            acc = jax.tree.map(jnp.add, acc, g)
            return (total + t, ce + c, acc), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zeros = jax.lax.with_sharding_constraint(zeros, p_shardings)
        (total, ce, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros), micro
        )
        return total, ce, grads

    def train_step(state: PyTree, batch: dict[str, jax.Array]) -> tuple[PyTree, dict]:
        params = state["params"]
        total, ce, grads = gradients(params, batch["tokens"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        metrics = {
            "loss": ce,
            "total_loss": total,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
        }
        new_state = {
            "params": new_params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": rng,
        }
        return new_state, metrics

    step = jax.jit(
        _under_mesh(train_step, mesh),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    init = jax.jit(lambda: init_state(cfg, optimizer), out_shardings=state_shardings)

    def eval_fn(params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        inputs, targets = split_tokens(batch["tokens"])
        sums = eval_sums(params, inputs, targets, model_cfg)
        return {**sums, "tokens": jnp.asarray(targets.size, jnp.float32)}

    eval_step = jax.jit(
        _under_mesh(eval_fn, mesh),
        in_shardings=(p_shardings, batch_sharding),
        out_shardings=replicated,
    )
    return TrainStep(
        step=step,
        init=init,
        eval_step=eval_step,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_spec=batch_spec,
        batch_sharding=batch_sharding,
        mesh=mesh,
        schedule=schedule,
    )
