"""The standard family: embedding -> scanned stack of Transformer or RT blocks -> head.

``StandardFamily`` implements ``rt_jax.models.family.ModelFamily`` for models with neither an LRT
memory nor a loop layout. The other families subclass it and override what they change, so the
defaults here (cross-entropy training and validation sums of ``forward``, no extra parameters or
FLOPs, no carried decoding state) are the interface's defaults.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from rt_jax.config import ModelConfig
from rt_jax.models.family import PartitionRules, register_family
from rt_jax.models.flops import TRAIN_FACTOR, forward_flops_per_token
from rt_jax.models.kv_cache import KVCache, prefilled_cache, write_cache_entries
from rt_jax.models.lm import (
    cross_entropy_sums,
    embed,
    head,
    init_standard_params,
    layer_function,
    run_blocks,
)
from rt_jax.ops.decode import decode_layer, prefill_layer

PyTree = Any

PARTITION_RULES: PartitionRules = (
    (r"^embed$", ("vocab", "embed")),
    (r"^head$", ("embed", "vocab")),
    (r"^ln_f$", ("norm",)),
    (r"^blocks/w_q$", ("layers", "embed", "heads")),
    (r"^blocks/w_kv$", ("layers", "embed", "heads")),
    (r"^blocks/w_o$", ("layers", "heads", "embed")),
    (r"^blocks/w_ff_in$", ("layers", "embed", "mlp")),
    (r"^blocks/w_ff_out$", ("layers", "mlp", "embed")),
    (r"^blocks/\w+_norm$", ("layers", "norm")),
    # NeoX blocks: biases of the projections and LayerNorms, and the final LayerNorm's bias.
    (r"^ln_f_bias$", ("norm",)),
    (r"^blocks/\w+_norm_bias$", ("layers", "norm")),
    (r"^blocks/b_(q|kv)$", ("layers", "heads")),
    (r"^blocks/b_(o|ff_out)$", ("layers", "embed")),
    (r"^blocks/b_ff_in$", ("layers", "mlp")),
)
"""Logical axes of the standard parameters; blocks are stacked on a leading "layers" axis."""


def embed_inputs(params: PyTree, tokens: jax.Array, config: ModelConfig) -> jax.Array:
    """Token embeddings, times sqrt(D) when ``config.embed_scale`` (the MeSH paper's setting)."""
    x = embed(params, tokens)
    return x * math.sqrt(config.d_model) if config.embed_scale else x


def depth_aware_outputs(params: PyTree, config: ModelConfig, depth: int) -> PyTree:
    """``params`` (the standard init) with w_o and w_ff_out of every stored layer rescaled from the
    per-layer std c/sqrt(l+1) to c/sqrt(depth): 1/sqrt(2 fan_in depth), the paper's depth-aware
    1/sqrt(2 N_compute) on our 1/sqrt(fan_in) base."""
    rescale = jnp.sqrt(jnp.arange(1, config.n_layers + 1, dtype=jnp.float32) / depth)
    blocks = dict(params["blocks"])
    for name in ("w_o", "w_ff_out"):
        blocks[name] = blocks[name] * rescale[:, None, None]
    return {**params, "blocks": blocks}


def init_params(config: ModelConfig, key: jax.Array) -> PyTree:
    """The "mitchell" init (``lm.init_standard_params``); ``output_init="depth"`` rescales the
    output projections to the depth-aware std with depth = n_layers."""
    params = init_standard_params(config, key)
    if config.output_init == "depth":
        params = depth_aware_outputs(params, config, config.n_layers)
    return params


def forward(params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """Logits (B, N, embedding_size), float32: embed -> blocks -> final norm and head."""
    x = embed_inputs(params, tokens_BxN, config)
    return head(params, run_blocks(params, x, config), config)


def prefill(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    config: ModelConfig,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
    """Right-padded prompts through every layer with the model's own layer implementation:
    logits of each row's last prompt token (B, E) and the filled cache."""
    spec = config.attention_spec()
    fn = layer_function(config)
    recurrent = config.block_type == "recurrent"

    def body(x: jax.Array, layer_params: PyTree) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        z, k, v = prefill_layer(layer_params, x, fn, spec, recurrent=recurrent)
        return z, (k, v)

    x_BxPxD, (k, v) = jax.lax.scan(body, embed_inputs(params, tokens_BxP, config), params["blocks"])
    b = tokens_BxP.shape[0]
    last_BxD = x_BxPxD[jnp.arange(b), lengths_B - 1]
    logits = head(params, last_BxD, config)
    return logits, prefilled_cache(config, k, v, lengths_B, cache_size)


def decode_step(
    params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """One token per row at its next position (``rt_jax.ops.decode``): logits (B, E), cache."""
    spec = config.attention_spec()
    recurrent = config.block_type == "recurrent"
    pos_B = cache.lengths

    def body(x: jax.Array, layer: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        layer_params, k_l, v_l = layer
        z, k_new, v_new = decode_layer(layer_params, x, k_l, v_l, pos_B, spec, recurrent=recurrent)
        return z, (k_new, v_new)

    x_BxD, (k_new, v_new) = jax.lax.scan(
        body, embed_inputs(params, tokens_B, config), (params["blocks"], cache.k, cache.v)
    )
    logits = head(params, x_BxD, config)
    return logits, KVCache(
        write_cache_entries(cache.k, k_new, pos_B),
        write_cache_entries(cache.v, v_new, pos_B),
        pos_B + 1,
        cache.memory,
    )


class StandardFamily:
    """The standard family, and the defaults every other family inherits."""

    name = "standard"

    def validate(self, config: ModelConfig, seq_len: int | None = None) -> None:
        """Raise ValueError when the named layer implementation cannot run here."""
        del seq_len
        layer_function(config)

    def init_params(self, config: ModelConfig, key: jax.Array) -> PyTree:
        """The "mitchell" truncated-normal init (``init_params``)."""
        return init_params(config, key)

    def forward(self, params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
        """Exact logits (B, N, embedding_size)."""
        return forward(params, tokens_BxN, config)

    def loss_sums(
        self, params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
    ) -> tuple[jax.Array, jax.Array]:
        """``cross_entropy_sums`` of this family's ``forward``."""
        logits = self.forward(params, inputs_BxN, config)
        return cross_entropy_sums(logits, targets_BxN, config.vocab_size)

    def eval_sums(
        self, params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
    ) -> dict[str, jax.Array]:
        """``ce_sum`` of this family's ``forward``."""
        logits = self.forward(params, inputs_BxN, config)
        return {"ce_sum": cross_entropy_sums(logits, targets_BxN, config.vocab_size)[0]}

    def prefill(
        self,
        params: PyTree,
        tokens_BxP: jax.Array,
        lengths_B: jax.Array,
        config: ModelConfig,
        cache_size: int,
    ) -> tuple[jax.Array, KVCache]:
        """Logits of each row's last prompt token and the cache."""
        return prefill(params, tokens_BxP, lengths_B, config, cache_size)

    def decode_step(
        self, params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
    ) -> tuple[jax.Array, KVCache]:
        """One decode step."""
        return decode_step(params, cache, tokens_B, config)

    def cache_state_width(self, config: ModelConfig) -> int:
        """No state carried between tokens besides the KV pairs."""
        del config
        return 0

    def extra_params(self, config: ModelConfig) -> int:
        """No parameters beyond the standard ones."""
        del config
        return 0

    def extra_forward_flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        """No FLOPs beyond the layers and the head."""
        del config, seq_len
        return 0.0

    def train_flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        """3x the forward (one training pass)."""
        return TRAIN_FACTOR * forward_flops_per_token(config, seq_len)

    def partition_rules(self) -> PartitionRules:
        """The standard parameters' rules."""
        return PARTITION_RULES


FAMILY = register_family(StandardFamily())
