"""The language model: embedding -> scanned stack of blocks -> final LayerNorm -> untied head.

``init_params`` and ``forward`` are pure functions on a parameter pytree; ``LanguageModel`` is a thin
Flax NNX module that owns those parameters (so ``model(tokens)`` works and Optax/Orbax see ordinary
``nnx.Param`` leaves). Blocks are stored stacked along a leading layer axis and run with
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
    """Random parameters with the reference code's "mitchell" truncated-normal init.

    sigma = 1/sqrt(D) for the embedding, w_q, w_kv, w_ff_in and the head; 1/sqrt(2 D (l+1)) for
    w_o and 1/sqrt(2 F (l+1)) for w_ff_out (l = 0-based layer); norm weights 1; cutoff +-3 sigma.
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
            elif name == "w_o":
                out[name] = _truncated_normal(keys[name], shape, 1.0) / jnp.sqrt(2.0 * d * l1)
            elif name == "w_ff_out":
                out[name] = _truncated_normal(keys[name], shape, 1.0) / jnp.sqrt(2.0 * f * l1)
            else:
                out[name] = _truncated_normal(keys[name], shape, d**-0.5)
        return out

    return {
        "embed": _truncated_normal(k_embed, (config.embedding_size, d), d**-0.5),
        "blocks": jax.vmap(one_layer)(layer_keys, depth),
        "ln_f": jnp.ones((d,), jnp.float32),
        "head": _truncated_normal(k_head, (d, config.embedding_size), d**-0.5),
    }


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
    h = layer_norm(x_BxNxD, params["ln_f"], config.norm_eps)
    dtype = jnp.dtype(config.compute_dtype)
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    logits = jnp.matmul(h.astype(dtype), params["head"].astype(dtype), preferred_element_type=acc)
    return logits.astype(jnp.promote_types(acc, jnp.float32))


def forward(params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits (B, N, embedding_size) in float32 for integer tokens (B, N)."""
    check_tokens(tokens_BxN, config.vocab_size)
    return head(params, run_blocks(params, embed(params, tokens_BxN), config), config)


class Blocks(nnx.Module):
    """Owner of the stacked (n_layers, ...) block parameters, one ``nnx.Param`` per name."""

    def __init__(self, stacked: dict[str, jax.Array]):
        self.names = tuple(stacked)
        for name, value in stacked.items():
            setattr(self, name, nnx.Param(value))

    def params(self) -> dict[str, jax.Array]:
        """The stacked parameters as a plain dict of arrays."""
        return {name: getattr(self, name)[...] for name in self.names}


class LanguageModel(nnx.Module):
    """A Transformer or Recurrent Transformer LM; ``model(tokens_BxN)`` returns float32 logits."""

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
        layer_function(config)  # fail fast on an impl that cannot run here
        self.config = config
        self.embed = nnx.Param(params["embed"])
        self.blocks = Blocks(params["blocks"])
        self.ln_f = nnx.Param(params["ln_f"])
        self.head = nnx.Param(params["head"])

    def params(self) -> PyTree:
        """Parameters as the plain pytree that ``forward`` takes."""
        return {
            "embed": self.embed[...],
            "blocks": self.blocks.params(),
            "ln_f": self.ln_f[...],
            "head": self.head[...],
        }

    def __call__(self, tokens_BxN: jax.Array) -> jax.Array:
        """Logits (B, N, embedding_size), float32."""
        return forward(self.params(), tokens_BxN, self.config)
