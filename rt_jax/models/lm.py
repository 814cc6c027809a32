"""The language model: embedding -> scanned stack of blocks -> final LayerNorm -> untied head.

``init_params`` and ``forward`` are pure functions on a parameter pytree; ``LanguageModel`` is a thin
Flax NNX module that owns those parameters (so ``model(tokens)`` works and Optax/Orbax see ordinary
``nnx.Param`` leaves). ``init_params``, ``forward``, ``loss_sums`` and ``eval_sums`` run any model
family through its registered ``ModelFamily`` (``rt_jax.models.family``); the rest are the
building blocks every family shares. Blocks are stored stacked along a leading layer axis and run with
``jax.lax.scan``, so compile time does not grow with depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rt_jax.config import ModelConfig
from rt_jax.models.family import get_family
from rt_jax.ops.block import AttentionSpec, Params, layer_norm, param_shapes
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.transformer import transformer_layer

LayerFn = Callable[[Params, jax.Array, AttentionSpec], jax.Array]
PyTree = Any


def layer_function(config: ModelConfig) -> LayerFn:
    """The pure per-layer function (params, x_BxNxD, spec) -> z_BxNxD for this config.

    Raises ValueError when the named implementation cannot run here (no silent fallback).
    """
    if config.block_type == "transformer":
        return transformer_layer
    if config.impl == "reference":
        return recurrent_layer_reference
    if config.impl == "tiled":
        from rt_jax.ops.tiled import recurrent_layer_tiled

        def tiled(params: Params, x: jax.Array, spec: AttentionSpec) -> jax.Array:
            return recurrent_layer_tiled(params, x, spec, leaf_size=config.leaf_size)

        return tiled
    if config.impl == "pallas":
        from rt_jax.ops.pallas_tiles import pallas_tile_ops
        from rt_jax.ops.tiled import recurrent_layer_tiled

        tile_ops = pallas_tile_ops(interpret=config.interpret)

        def pallas(params: Params, x: jax.Array, spec: AttentionSpec) -> jax.Array:
            return recurrent_layer_tiled(
                params, x, spec, leaf_size=config.leaf_size, tile_ops=tile_ops
            )

        return pallas
    raise ValueError(f"unknown impl {config.impl!r}")


def _truncated_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)


def init_params(config: ModelConfig, key: jax.Array) -> PyTree:
    """Random parameters for ``config``, by its model family (standard: ``init_standard_params``)."""
    return get_family(config).init_params(config, key)


def init_standard_params(config: ModelConfig, key: jax.Array) -> PyTree:
    """Random parameters with the reference code's "mitchell" truncated-normal init.

    sigma = 1/sqrt(D) for the embedding, w_q, w_kv, w_ff_in and the head; 1/sqrt(2 D (l+1)) for
    w_o and 1/sqrt(2 F (l+1)) for w_ff_out (l = 0-based layer); norm weights 1; cutoff +-3 sigma.
    NeoX blocks: biases (``b_*``, ``*_norm_bias``, ``ln_f_bias``) 0.
    """
    d, f, n_layers = config.d_model, config.mlp_hidden, config.n_layers
    shapes = param_shapes(d, f, config.attention_spec())
    k_embed, k_head, k_blocks = jax.random.split(key, 3)
    layer_keys = jax.random.split(k_blocks, n_layers)
    depth = jnp.arange(1, n_layers + 1, dtype=jnp.float32)

    def one_layer(k: jax.Array, l1: jax.Array) -> dict[str, jax.Array]:
        keys = dict(zip(shapes, jax.random.split(k, len(shapes)), strict=True))
        out = {}
        for name, shape in shapes.items():
            if name.endswith("norm"):
                out[name] = jnp.ones(shape, jnp.float32)
            elif name.startswith("b_") or name.endswith("_bias"):
                out[name] = jnp.zeros(shape, jnp.float32)
            elif name == "w_o":
                out[name] = _truncated_normal(keys[name], shape, 1.0) / jnp.sqrt(2.0 * d * l1)
            elif name == "w_ff_out":
                out[name] = _truncated_normal(keys[name], shape, 1.0) / jnp.sqrt(2.0 * f * l1)
            else:
                out[name] = _truncated_normal(keys[name], shape, d**-0.5)
        return out

    params = {
        "embed": _truncated_normal(k_embed, (config.embedding_size, d), d**-0.5),
        "blocks": jax.vmap(one_layer)(layer_keys, depth),
        "ln_f": jnp.ones((d,), jnp.float32),
        "head": _truncated_normal(k_head, (d, config.embedding_size), d**-0.5),
    }
    if config.block_style == "neox":
        params["ln_f_bias"] = jnp.zeros((d,), jnp.float32)
    return params


def check_tokens(tokens: Any, vocab_size: int) -> None:
    """Raise ValueError unless tokens is a (B, N) integer array with ids in [0, vocab_size).

    Traced values are checked for shape and dtype only (their contents are not known yet).
    """
    shape = np.shape(tokens)
    dtype = tokens.dtype if hasattr(tokens, "dtype") else np.asarray(tokens).dtype
    if len(shape) != 2:
        raise ValueError(f"tokens must have shape (batch, seq_len), got shape {shape}")
    if shape[1] == 0:
        raise ValueError("tokens must have at least one position")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {dtype}")
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {lo}, max {hi}. "
            "Check the tokenizer's vocabulary against ModelConfig.vocab_size"
        )


def embed(params: PyTree, tokens_BxN: jax.Array) -> jax.Array:
    """Token embeddings (float32 residual stream; float64 when the embedding is float64)."""
    table = params["embed"]
    return jnp.take(table, tokens_BxN, axis=0).astype(jnp.promote_types(table.dtype, jnp.float32))


def run_blocks(params: PyTree, x_BxNxD: jax.Array, config: ModelConfig) -> jax.Array:
    """All layers, scanned over the stacked block parameters."""
    spec = config.attention_spec()
    fn = layer_function(config)
    if config.remat:
        fn = jax.checkpoint(fn, static_argnums=(2,))

    def body(x: jax.Array, layer_params: Params) -> tuple[jax.Array, None]:
        return fn(layer_params, x, spec), None

    x, _ = jax.lax.scan(body, x_BxNxD, params["blocks"])
    return x


def head(params: PyTree, x_BxNxD: jax.Array, config: ModelConfig) -> jax.Array:
    """Final LayerNorm and the untied LM head; float32 logits over embedding_size rows."""
    h = layer_norm(x_BxNxD, params["ln_f"], config.norm_eps, params.get("ln_f_bias"))
    dtype = jnp.dtype(config.compute_dtype)
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    logits = jnp.matmul(h.astype(dtype), params["head"].astype(dtype), preferred_element_type=acc)
    return logits.astype(jnp.promote_types(acc, jnp.float32))


def forward(params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits (B, N, embedding_size) in float32 for integer tokens (B, N).

    For LRT models these are the exact recurrent logits (the memory carried token by token).
    """
    check_tokens(tokens_BxN, config.vocab_size)
    return get_family(config).forward(params, tokens_BxN, config)


def cross_entropy_sums(
    logits_BxNxE: jax.Array, targets_BxN: jax.Array, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token CE, sum of squared log-partition) over the real vocabulary.

    Logits of padding rows (index >= vocab_size) are masked to -inf, so they get no probability.
    """
    logits = logits_BxNxE.astype(jnp.promote_types(logits_BxNxE.dtype, jnp.float32))  # f64 stays
    if logits.shape[-1] > vocab_size:
        real = jnp.arange(logits.shape[-1]) < vocab_size
        logits = jnp.where(real, logits, -jnp.inf)
    lse_BxN = jax.nn.logsumexp(logits, axis=-1)
    target_BxN = jnp.take_along_axis(logits, targets_BxN[..., None], axis=-1)[..., 0]
    return jnp.sum(lse_BxN - target_BxN), jnp.sum(jnp.square(lse_BxN))


def loss_sums(
    params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """The training objective as (CE sum, squared-log-partition sum) on the scale of B*N tokens.

    Standard models: the sums of ``cross_entropy_sums`` over the forward's logits. A family may
    train with another objective (LRT: the mean over its parallel passes, rescaled to B*N tokens).
    """
    return get_family(config).loss_sums(params, inputs_BxN, targets_BxN, config)


def eval_sums(
    params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
) -> dict[str, jax.Array]:
    """Validation sums: ``ce_sum`` of the exact model, plus family extras (``ce_sum_<name>``)."""
    return get_family(config).eval_sums(params, inputs_BxN, targets_BxN, config)


class ParamDict(nnx.Module):
    """Owner of a (nested) dict of parameters: arrays become ``nnx.Param``, dicts submodules."""

    def __init__(self, tree: dict[str, Any]):
        self.names = tuple(tree)
        for name, value in tree.items():
            if isinstance(value, dict):
                setattr(self, name, ParamDict(value))
            else:
                setattr(self, name, nnx.Param(value))

    def params(self) -> dict[str, Any]:
        """The parameters as a plain (nested) dict of arrays."""
        out = {}
        for name in self.names:
            value = getattr(self, name)
            out[name] = value.params() if isinstance(value, ParamDict) else value[...]
        return out


Blocks = ParamDict
"""Owner of the stacked (n_layers, ...) block parameters (a ``ParamDict``)."""


class LanguageModel(nnx.Module):
    """Any model of this library; ``model(tokens_BxN)`` returns float32 logits.

    Owns the parameter pytree of ``init_params`` (top-level arrays as ``nnx.Param``, dicts such as
    the stacked ``blocks`` as ``ParamDict`` submodules).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs | None = None,
        params: PyTree | None = None,
    ):
        if params is None:
            if rngs is None:
                raise ValueError("LanguageModel needs rngs=nnx.Rngs(seed) or params=...")
            params = init_params(config, rngs.params())
        get_family(config).validate(config)  # fail fast on an impl that cannot run here
        self.config = config
        self.tree = ParamDict(params)

    def params(self) -> PyTree:
        """Parameters as the plain pytree that ``forward`` takes."""
        return self.tree.params()

    def __call__(self, tokens_BxN: jax.Array) -> jax.Array:
        """Logits (B, N, embedding_size), float32."""
        return forward(self.params(), tokens_BxN, self.config)
