"""Latent Recurrent Transformer (LRT, Huang et al. 2026) on the standard Transformer block.

The memory of position t is the source state of position t-1 (``memory.layer=-1``: the final
normalised state LN_f(x_L) that feeds the head; ``i >= 0``: the residual stream after layer i
under a parameter-free LayerNorm, so |m| <= sqrt(D) from any layer),
zero at t = 0 and after a ``memory.reset_token`` (document starts). Every layer l reads it, with
u = LN_attn(x) the layer's attention input:

    x      <- x + gamma_l * m                                   ResidualInjection (gamma init 0.1)
    g_loc, g_mem = split(2 * sigmoid(u @ W_g,l))                 per token and kv head (W_g init 0)
    k, v   = g_loc * split(u @ w_kv) + g_mem * split(m @ W_kvmem) KVProjection, then LN_k (+ RoPE)

and then runs the baseline layer unchanged (queries, attention, MLP). ``memory.kind="shared"`` uses one
W_kvmem for every layer (computed once per token), ``"layerwise"`` one per layer;
``memory.injection="kv"`` drops gamma, ``"residual"`` drops the gates and W_kvmem. With zero memory
and the gates at init, a layer equals ``transformer_layer`` exactly.

Three ways to run one model, all built from ``_run_layers`` (a scan over the stacked layers):

* exact (``forward``, ``prefill``, ``decode_step``): the true recurrence, token by token with a KV
  cache and the carried memory; all three call the same ``_token_step``.
* interleaved training (``memory.training="interleaved"``, S = ``memory.passes``): pass 0 runs the
  full sequence with zero memory and keeps every layer's K/V and the source states; then subsets
  s = 0..S-1 in order (positions p = s mod S, static strided slices) rerun with the latest memory,
  write their fresh K/V into the buffer and attend causally to the whole buffer.
* multi-refinement (``"refine"``, K = ``memory.passes``): K more full passes, each with the
  previous pass's shifted source states as memory.
* chunked (``"chunked"``, S = ``memory.passes`` contiguous chunks): as interleaved, with chunk s =
  positions [s*N/S, (s+1)*N/S) in order, so only a chunk's first position reads a refined memory.

Training loss: the mean over passes of each pass's mean cross-entropy (``memory.pass_weights``
weights them; ``memory.detach`` stops gradients through the memory between passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from rt_jax.models.family import PartitionRules, register_family
from rt_jax.models.flops import TRAIN_FACTOR, forward_flops_per_token
from rt_jax.models.kv_cache import KVCache, init_cache, prefilled_cache, write_cache_entries
from rt_jax.models.lm import cross_entropy_sums, embed, head, init_standard_params
from rt_jax.models.standard import PARTITION_RULES as STANDARD_RULES
from rt_jax.models.standard import StandardFamily
from rt_jax.ops.block import (
    AttentionSpec,
    Params,
    _matmul,
    apply_rope,
    layer_norm,
    post_attention,
    pre_attention,
    query_projection,
)
from rt_jax.ops.decode import decode_layer
from rt_jax.ops.transformer import causal_attention

if TYPE_CHECKING:
    from rt_jax.config import ModelConfig

PyTree = Any
PARAMS_KEY = "lrt"
"""Top-level key of the memory pathway's parameters in the model's parameter tree."""
GAMMA_INIT = 0.1
"""Initial ResidualInjection scale of every layer (the reference code's value)."""


def uses_residual(config: ModelConfig) -> bool:
    """Whether the memory is added to the residual stream (gamma)."""
    return config.memory.uses_residual()


def uses_kv(config: ModelConfig) -> bool:
    """Whether the memory is mixed into the keys and values (gates and W_kvmem)."""
    return config.memory.uses_kv()


def validate(config: ModelConfig, seq_len: int | None = None) -> None:
    """Raise ValueError unless training can run on ``seq_len`` positions (the config itself is
    checked by ``MemoryConfig``)."""
    if seq_len is not None:
        check_seq_len(config, seq_len)


def memory_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the memory pathway's parameters (the ``lrt`` subtree), by name."""
    n_layers, d = config.n_layers, config.d_model
    kv_dim = config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if uses_residual(config):
        shapes["gamma"] = (n_layers,)
    if uses_kv(config):
        shapes["w_gate"] = (n_layers, d, 2 * config.n_kv_heads)
        if config.memory.kind == "shared":
            shapes["w_kvmem_shared"] = (d, 2 * kv_dim)
        else:
            shapes["w_kvmem"] = (n_layers, d, 2 * kv_dim)
    return shapes


def extra_params(config: ModelConfig) -> int:
    """Parameters the memory pathway adds to the baseline Transformer."""
    return sum(math.prod(shape) for shape in memory_param_shapes(config).values())


def init_params(config: ModelConfig, key: jax.Array) -> PyTree:
    """The baseline's parameters (identical to a Transformer initialised with the same key) plus
    the ``lrt`` subtree: gamma 0.1, gates 0 (so 2*sigmoid = 1), W_kvmem initialised like w_kv."""
    params = init_standard_params(config, key)
    d = config.d_model
    memory_key = jax.random.fold_in(key, 0x4C5254)
    memory = {}
    for i, (name, shape) in enumerate(memory_param_shapes(config).items()):
        if name == "gamma":
            memory[name] = jnp.full(shape, GAMMA_INIT, jnp.float32)
        elif name == "w_gate":
            memory[name] = jnp.zeros(shape, jnp.float32)
        else:
            k = jax.random.fold_in(memory_key, i)
            memory[name] = d**-0.5 * jax.random.truncated_normal(k, -3.0, 3.0, shape, jnp.float32)
    return {**params, PARAMS_KEY: memory}


# --------------------------------------------------------------------------------------------
# One layer, as pure functions (``params`` = one layer's block parameters plus its memory ones).


def memory_kv(w_kvmem_Dx2C: jax.Array, mem_BxNxD: jax.Array, spec: AttentionSpec) -> jax.Array:
    """The memory's key/value contribution m @ W_kvmem: BxNx2C (keys then values, float32)."""
    return _matmul(mem_BxNxD, w_kvmem_Dx2C, spec.dtype)


def inject(params: Params, x_BxNxD: jax.Array, mem_BxNxD: jax.Array) -> jax.Array:
    """ResidualInjection x + gamma * m (x unchanged when the layer has no gamma)."""
    if "gamma" not in params:
        return x_BxNxD
    gamma = params["gamma"].astype(x_BxNxD.dtype)
    return x_BxNxD + gamma * mem_BxNxD.astype(x_BxNxD.dtype)


def lrt_qkv(
    params: Params,
    x_BxNxD: jax.Array,
    kv_mem_BxNx2C: jax.Array | None,
    pos_N: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v) of the (injected) layer input with the memory's K/V mixed in through the gates.

    ``kv_mem`` None (no KVProjection): the baseline's ``pre_attention``. The mix happens before
    LN_k and RoPE; queries get no memory term.
    """
    q, k, v, _ = _qkv_parts(params, x_BxNxD, kv_mem_BxNx2C, pos_N, spec)
    return q, k, v


def _qkv_parts(
    params: Params,
    x_BxNxD: jax.Array,
    kv_mem_BxNx2C: jax.Array | None,
    pos_N: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``lrt_qkv`` plus (the mixed keys before LN_k and RoPE BxNxC, the memory gates BxNxG), the
    state ``kv_refresh`` updates (None without KVProjection)."""
    if kv_mem_BxNx2C is None:
        q, k, v = pre_attention(params, x_BxNxD, pos_N, spec)
        return q, k, v, None
    b, n, _ = x_BxNxD.shape
    g, kd = spec.n_kv_heads, spec.head_dim
    q = query_projection(params, x_BxNxD, pos_N, spec)
    u = layer_norm(x_BxNxD, params["attn_norm"], spec.norm_eps)
    kv_loc = _matmul(u, params["w_kv"], spec.dtype).reshape(b, n, 2, g, kd)
    gates = 2.0 * jax.nn.sigmoid(_matmul(u, params["w_gate"], spec.dtype))  # BxNx2G
    g_loc = gates[..., :g].reshape(b, n, 1, g, 1)
    g_mem = gates[..., g:].reshape(b, n, 1, g, 1)
    kv_mem = kv_mem_BxNx2C.reshape(b, n, 2, g, kd).astype(kv_loc.dtype)
    kv = g_loc.astype(kv_loc.dtype) * kv_loc + g_mem.astype(kv_loc.dtype) * kv_mem
    k_pre = kv[:, :, 0].reshape(b, n, g * kd)
    k = finish_keys(params, k_pre, pos_N, spec)
    v = kv[:, :, 1].astype(spec.dtype)
    return q, k, v, (k_pre, gates[..., g:])


def finish_keys(
    params: Params, k_pre_BxNxC: jax.Array, pos_N: jax.Array, spec: AttentionSpec
) -> jax.Array:
    """Mixed keys -> attention keys: LN_k over the whole key vector, head split, RoPE. BxNxGxK."""
    b, n, _ = k_pre_BxNxC.shape
    k = layer_norm(k_pre_BxNxC, params["k_norm"], spec.norm_eps)
    k = k.astype(spec.dtype).reshape(b, n, spec.n_kv_heads, spec.head_dim)
    if spec.position == "rope":
        k = apply_rope(k, pos_N, spec.rope_theta)
    return k


def buffer_attention(
    q_BxMxHxK: jax.Array,
    k_BxNxGxK: jax.Array,
    v_BxNxGxK: jax.Array,
    q_pos_M: jax.Array,
    spec: AttentionSpec,
) -> jax.Array:
    """Attention of queries at positions ``q_pos`` over a K/V buffer of positions 0..N-1, causal
    (key position <= query position), with the spec's bias; float32 softmax. BxMxHxK."""
    return causal_attention(q_BxMxHxK, k_BxNxGxK, v_BxNxGxK, spec, q_pos_M)


def lrt_layer(
    params: Params, x_BxNxD: jax.Array, mem_BxNxD: jax.Array, spec: AttentionSpec
) -> jax.Array:
    """One LRT layer over a whole sequence given each position's memory (BxNxD). Returns BxNxD.

    ``params`` holds the block parameters plus this layer's ``gamma``, ``w_gate`` and ``w_kvmem``
    (the shared matrix for ``memory.kind="shared"``), as present. Zero memory with the gates at init
    gives ``transformer_layer`` exactly.
    """
    pos_N = jnp.arange(x_BxNxD.shape[1])
    kv_mem = memory_kv(params["w_kvmem"], mem_BxNxD, spec) if "w_kvmem" in params else None
    x = inject(params, x_BxNxD, mem_BxNxD)
    q, k, v = lrt_qkv(params, x, kv_mem, pos_N, spec)
    return post_attention(params, x, causal_attention(q, k, v, spec), spec)


# --------------------------------------------------------------------------------------------
# The stack of layers, shared by every way of running the model.

Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
"""(q, k, v, this layer's buffers) -> (attention output BxNxHxK, this layer's scan output)."""


def _run_layers(
    params: PyTree,
    x_BxNxD: jax.Array,
    mem_BxNxD: jax.Array,
    pos_N: jax.Array,
    config: ModelConfig,
    attend: Attend,
    layer_buffers: Any,
    *,
    collect_refresh: bool = False,
) -> tuple[jax.Array, jax.Array, Any]:
    """All layers over the positions ``pos_N`` given their memory: (x_L, source state, outputs).

    The source state is LN_f(x_L) (``memory.layer=-1``) or the output of layer ``memory.layer``
    under a parameter-free LayerNorm (``normalise_source``);
    ``layer_buffers`` (leading layer axis, or None) are scanned alongside the layers and handed to
    ``attend``, whose second result is stacked over layers. ``collect_refresh``: the outputs
    are (attend's, (mixed keys LxBxNxC, memory gates LxBxNxG)) for ``kv_refresh``.
    """
    spec = config.attention_spec()
    memory = params[PARAMS_KEY]
    per_layer = {k: v for k, v in memory.items() if k != "w_kvmem_shared"}
    layer_params = {**params["blocks"], **per_layer}
    shared_kv = None
    if "w_kvmem_shared" in memory:
        shared_kv = memory_kv(memory["w_kvmem_shared"], mem_BxNxD, spec)
    source_layer = config.memory.layer

    def body(carry: tuple, xs: tuple) -> tuple[tuple, Any]:
        x, src = carry
        p, index, buffers = xs
        kv_mem = shared_kv
        if "w_kvmem" in p:
            kv_mem = memory_kv(p["w_kvmem"], mem_BxNxD, spec)
        x = inject(p, x, mem_BxNxD)
        q, k, v, refresh = _qkv_parts(p, x, kv_mem, pos_N, spec)
        att, out = attend(q, k, v, buffers)
        z = post_attention(p, x, att, spec)
        if source_layer >= 0:
            src = jnp.where(index == source_layer, z, src)
        return (z, src), ((out, refresh) if collect_refresh else out)

    if config.remat:
        body = jax.checkpoint(body)
    src0 = jnp.zeros_like(x_BxNxD) if source_layer >= 0 else jnp.zeros((), x_BxNxD.dtype)
    xs = (layer_params, jnp.arange(config.n_layers), layer_buffers)
    (x, src), outs = jax.lax.scan(body, (x_BxNxD, src0), xs)
    if source_layer < 0:
        src = layer_norm(x, params["ln_f"], config.norm_eps)
    else:
        src = normalise_source(src, config.norm_eps)
    return x, src, outs


def normalise_source(z_BxNxD: jax.Array, eps: float) -> jax.Array:
    """The memory read from a layer i >= 0: a parameter-free LayerNorm of the residual stream
    (zero mean, unit variance over D, no weight), so every memory vector has an L2 norm of at
    most sqrt(D) whatever the recurrence does to the residual stream (see docs/lrt.md)."""
    return layer_norm(z_BxNxD, jnp.ones(z_BxNxD.shape[-1:], z_BxNxD.dtype), eps)


# --------------------------------------------------------------------------------------------
# The exact model: token by token, with a KV cache and the carried memory.


def _token_step(
    params: PyTree,
    k_cache_LxBxGxSxK: jax.Array,
    v_cache_LxBxGxSxK: jax.Array,
    mem_BxD: jax.Array,
    x_BxD: jax.Array,
    tokens_B: jax.Array,
    pos_B: jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row (embedding x, id) at its position: (logits BxE, new k and v LxBxGxK,
    next memory BxD). The next memory is this token's source state, zeroed when the token is the
    reset token.

    Each layer is the baseline's ``rt_jax.ops.decode.decode_layer`` (the same cached attention,
    output projection and MLP as Transformer decoding) after the residual injection, with LRT's
    memory-mixed q/k/v; so LRT and Transformer decode on equal code paths and differ only by the
    memory pathway (tested bit for bit with zero memory).
    """
    spec = config.attention_spec()
    memory = params[PARAMS_KEY]
    per_layer = {k: v for k, v in memory.items() if k != "w_kvmem_shared"}
    mem_1xBxD = mem_BxD[None].astype(x_BxD.dtype)
    shared_kv = None
    if "w_kvmem_shared" in memory:
        shared_kv = memory_kv(memory["w_kvmem_shared"], mem_1xBxD, spec)
    source_layer = config.memory.layer

    def body(carry: tuple, xs: tuple) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
        x, src = carry
        p, index, k_l, v_l = xs
        kv_mem = memory_kv(p["w_kvmem"], mem_1xBxD, spec) if "w_kvmem" in p else shared_kv
        x = inject(p, x[None], mem_1xBxD)[0]

        def qkv(p_: Params, x_: jax.Array, pos: jax.Array, spec_: AttentionSpec) -> tuple:
            return lrt_qkv(p_, x_, kv_mem, pos, spec_)

        z, k_new, v_new = decode_layer(p, x, k_l, v_l, pos_B, spec, recurrent=False, qkv=qkv)
        if source_layer >= 0:
            src = jnp.where(index == source_layer, z, src)
        return (z, src), (k_new, v_new)

    src0 = jnp.zeros_like(x_BxD) if source_layer >= 0 else jnp.zeros((), x_BxD.dtype)
    layers = {**params["blocks"], **per_layer}
    xs = (layers, jnp.arange(config.n_layers), k_cache_LxBxGxSxK, v_cache_LxBxGxSxK)
    (x, src), (k_new, v_new) = jax.lax.scan(body, (x_BxD, src0), xs)
    if source_layer < 0:
        src = layer_norm(x, params["ln_f"], config.norm_eps)
    else:
        src = normalise_source(src, config.norm_eps)
    logits = head(params, x, config)
    keep_B = tokens_B != config.memory.reset_token
    next_mem = jnp.where(keep_B[:, None], src, jnp.zeros_like(src))
    return logits, k_new, v_new, next_mem


def _logits_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.dtype(jnp.float64 if config.compute_dtype == "float64" else jnp.float32)


def _recurrence(
    params: PyTree,
    x_BxPxD: jax.Array,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    cache: KVCache,
    config: ModelConfig,
    *,
    all_logits: bool,
) -> tuple[KVCache, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """The prompts (embeddings and ids, right-padded: row b valid below lengths_B[b]) token by
    token from an empty cache: (cache, logits of each row's last prompt token BxE, and with
    ``all_logits`` every position's logits PxBxE and the memory it read PxBxD, else None)."""
    b, p = tokens_BxP.shape

    def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
        k, v, mem, last = carry
        t, x_BxD, tokens_B = xs
        pos_B = jnp.full((b,), t, jnp.int32)
        logits, k_new, v_new, next_mem = _token_step(
            params, k, v, mem, x_BxD, tokens_B, pos_B, config
        )
        # Padded positions (t >= length) write cache entries that decoding overwrites before
        # reading them; they must not advance the row's memory.
        k = write_cache_entries(k, k_new, pos_B)
        v = write_cache_entries(v, v_new, pos_B)
        new_mem = jnp.where((t < lengths_B)[:, None], next_mem.astype(mem.dtype), mem)
        last = jnp.where((t == lengths_B - 1)[:, None], logits.astype(last.dtype), last)
        return (k, v, new_mem, last), ((logits, mem) if all_logits else None)

    last0 = jnp.zeros((b, config.embedding_size), _logits_dtype(config))
    xs = (jnp.arange(p, dtype=jnp.int32), jnp.swapaxes(x_BxPxD, 0, 1), tokens_BxP.T)
    (k, v, mem, last), logits = jax.lax.scan(body, (cache.k, cache.v, cache.memory, last0), xs)
    return KVCache(k, v, lengths_B.astype(jnp.int32), mem), last, logits


def forward(params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """Exact logits (B, N, embedding_size): the true recurrence, token by token."""
    return forward_embedded(params, embed(params, tokens_BxN), tokens_BxN, config)


def forward_embedded(
    params: PyTree, x_BxNxD: jax.Array, tokens_BxN: jax.Array, config: ModelConfig
) -> jax.Array:
    """``forward`` from the token embeddings x (the ids only locate memory resets)."""
    return forward_with_memory_embedded(params, x_BxNxD, tokens_BxN, config)[0]


def forward_with_memory(
    params: PyTree, tokens_BxN: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """The exact logits (BxNxE) and the memory every position read (BxNxD; row 0 is zero)."""
    return forward_with_memory_embedded(params, embed(params, tokens_BxN), tokens_BxN, config)


def forward_with_memory_embedded(
    params: PyTree, x_BxNxD: jax.Array, tokens_BxN: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """``forward_with_memory`` from the token embeddings x."""
    b, n = tokens_BxN.shape
    cache = _empty_cache(config, b, n, x_BxNxD.dtype)
    lengths = jnp.full((b,), n, jnp.int32)
    _, _, (logits_NxBxE, mem_NxBxD) = _recurrence(
        params, x_BxNxD, tokens_BxN, lengths, cache, config, all_logits=True
    )
    return jnp.swapaxes(logits_NxBxE, 0, 1), jnp.swapaxes(mem_NxBxD, 0, 1)


def _empty_cache(config: ModelConfig, batch: int, size: int, dtype: jnp.dtype) -> KVCache:
    """``init_cache`` with the memory in the residual stream's dtype (float64 stays float64)."""
    cache = init_cache(config, batch, size)
    memory_dtype = jnp.promote_types(dtype, jnp.float32)
    return KVCache(cache.k, cache.v, cache.lengths, cache.memory.astype(memory_dtype))


def prefill(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    config: ModelConfig,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
    """Logits of each row's last prompt token (BxE) and the cache, by the exact recurrence
    (``memory.prefill="parallel"``: the approximate ``prefill_parallel``)."""
    if config.memory.prefill == "parallel":
        return prefill_parallel(params, tokens_BxP, lengths_B, config, cache_size)
    x = embed(params, tokens_BxP)
    cache = _empty_cache(config, tokens_BxP.shape[0], cache_size, x.dtype)
    cache, last, _ = _recurrence(params, x, tokens_BxP, lengths_B, cache, config, all_logits=False)
    return last, cache


def decode_step(
    params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """One token per row at its next position: logits (BxE) and the updated cache and memory."""
    pos_B = cache.lengths
    logits, k_new, v_new, next_mem = _token_step(
        params, cache.k, cache.v, cache.memory, embed(params, tokens_B), tokens_B, pos_B, config
    )
    return logits, KVCache(
        write_cache_entries(cache.k, k_new, pos_B),
        write_cache_entries(cache.v, v_new, pos_B),
        pos_B + 1,
        next_mem.astype(cache.memory.dtype),
    )


# --------------------------------------------------------------------------------------------
# Training: the parallel passes.


def memory_keep(tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """BxN booleans: position t has a memory (t > 0 and token t-1 is not the reset token)."""
    n = tokens_BxN.shape[1]
    prev = jnp.concatenate([tokens_BxN[:, :1], tokens_BxN[:, :-1]], axis=1)
    return (jnp.arange(n)[None, :] > 0) & (prev != config.memory.reset_token)


def shifted_memory(src_BxNxD: jax.Array, keep_BxN: jax.Array) -> jax.Array:
    """Memory of every position: the source state of the previous position, zero where not kept."""
    shifted = jnp.concatenate([jnp.zeros_like(src_BxNxD[:, :1]), src_BxNxD[:, :-1]], axis=1)
    return jnp.where(keep_BxN[..., None], shifted, jnp.zeros_like(shifted))


def check_seq_len(config: ModelConfig, seq_len: int) -> None:
    """ValueError unless interleaved (chunked) training can split ``seq_len`` into memory.passes
    subsets (chunks)."""
    if config.memory.training != "refine" and seq_len % config.memory.passes:
        raise ValueError(
            f"LRT {config.memory.training} training splits the sequence into memory.passes="
            f"{config.memory.passes} subsets, but seq_len={seq_len} is not divisible by "
            "it: change data.seq_len or model.memory.passes"
        )


def parallel_passes(
    params: PyTree, inputs_BxN: jax.Array, config: ModelConfig
) -> list[tuple[slice, jax.Array]]:
    """The training-time passes in order: (positions covered, their logits BxMxE) for each.

    Pass 0 is the full sequence with zero memory. Interleaved: then subset s (positions
    s::S) for s = 0..S-1 with the latest memory, their fresh K/V written into pass 0's buffer.
    Refine: then K full passes with the previous pass's shifted source states.
    """
    return parallel_passes_embedded(params, embed(params, inputs_BxN), inputs_BxN, config)


def parallel_passes_embedded(
    params: PyTree, x0_BxNxD: jax.Array, inputs_BxN: jax.Array, config: ModelConfig
) -> list[tuple[slice, jax.Array]]:
    """``parallel_passes`` from the token embeddings (the ids only locate memory resets)."""
    return _parallel_run(params, x0_BxNxD, inputs_BxN, config)[0]


def _pass_memory(src_BxNxD: jax.Array, keep_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """The memory a pass reads: the shifted source states, detached with ``memory.detach``."""
    mem = shifted_memory(src_BxNxD, keep_BxN)
    return jax.lax.stop_gradient(mem) if config.memory.detach else mem


def _parallel_run(
    params: PyTree, x0_BxNxD: jax.Array, inputs_BxN: jax.Array, config: ModelConfig
) -> tuple[list[tuple[slice, jax.Array]], jax.Array, jax.Array, jax.Array]:
    """The passes, plus the final K/V buffers (LxBxNxGxK each) and source states (BxNxD)."""
    b, n = inputs_BxN.shape
    check_seq_len(config, n)
    spec = config.attention_spec()
    keep = memory_keep(inputs_BxN, config)
    x0 = x0_BxNxD
    pos = jnp.arange(n)
    refresh = config.memory.kv_refresh

    def full_attend(q: jax.Array, k: jax.Array, v: jax.Array, _: Any) -> tuple[jax.Array, Any]:
        return causal_attention(q, k, v, spec), (k, v)

    x, src, outs = _run_layers(
        params, x0, jnp.zeros_like(x0), pos, config, full_attend, None, collect_refresh=refresh
    )
    (k_buf, v_buf), state = outs if refresh else (outs, None)
    passes = [(slice(None), head(params, x, config))]
    if config.memory.training == "refine":
        for _ in range(config.memory.passes):
            mem = _pass_memory(src, keep, config)
            x, src, (k_buf, v_buf) = _run_layers(params, x0, mem, pos, config, full_attend, None)
            passes.append((slice(None), head(params, x, config)))
        return passes, k_buf, v_buf, src
    n_subsets = config.memory.passes
    chunk = n // n_subsets
    subset_of = pos // chunk if config.memory.training == "chunked" else pos % n_subsets
    mem_used = jnp.zeros_like(x0)  # the memory whose K/V contribution the buffers hold
    for s in range(n_subsets):
        if config.memory.training == "chunked":
            sub = slice(s * chunk, (s + 1) * chunk)
        else:
            sub = slice(s, None, n_subsets)
        mem_all = _pass_memory(src, keep, config)
        if refresh:  # positions of later subsets: the cheap K/V update with the latest memory
            later = subset_of > s
            k_buf, v_buf, state, mem_used = kv_refresh(
                params, k_buf, v_buf, state, mem_used, mem_all, later, config
            )

        def subset_attend(
            q: jax.Array, k: jax.Array, v: jax.Array, buffers: tuple, sub: slice = sub
        ) -> tuple[jax.Array, Any]:
            k_l, v_l = buffers
            k_l = k_l.at[:, sub].set(k.astype(k_l.dtype))
            v_l = v_l.at[:, sub].set(v.astype(v_l.dtype))
            return buffer_attention(q, k_l, v_l, pos[sub], spec), (k_l, v_l)

        x_sub, src_sub, (k_buf, v_buf) = _run_layers(
            params, x0[:, sub], mem_all[:, sub], pos[sub], config, subset_attend, (k_buf, v_buf)
        )
        src = src.at[:, sub].set(src_sub)
        passes.append((sub, head(params, x_sub, config)))
    return passes, k_buf, v_buf, src


def kv_refresh(
    params: PyTree,
    k_buf_LxBxNxGxK: jax.Array,
    v_buf_LxBxNxGxK: jax.Array,
    state: tuple[jax.Array, jax.Array],
    mem_old_BxNxD: jax.Array,
    mem_new_BxNxD: jax.Array,
    where_N: jax.Array,
    config: ModelConfig,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The reference code's cheap K/V refresh of buffered positions (``where_N``) to a new memory:
    v += g_mem * (m_new - m_old) @ W_v,mem and the same on the mixed keys before LN_k and RoPE,
    which are then re-applied. The gates and the local part stay those of the pass that wrote the
    buffer (its layer input is not recomputed, so gamma's effect is not refreshed).
    ``state`` = (mixed keys LxBxNxC, memory gates LxBxNxG). Returns the new buffers, state and
    the memory now in them."""
    spec = config.attention_spec()
    g, kd = spec.n_kv_heads, spec.head_dim
    k_pre, g_mem = state
    n_layers, b, n = k_pre.shape[:3]
    delta = mem_new_BxNxD - mem_old_BxNxD
    memory = params[PARAMS_KEY]
    if "w_kvmem_shared" in memory:
        d_kv = memory_kv(memory["w_kvmem_shared"], delta, spec)[None]  # 1xBxNx2C
    else:
        d_kv = jax.vmap(lambda w: memory_kv(w, delta, spec))(memory["w_kvmem"])  # LxBxNx2C
    d_kv = d_kv.reshape(-1, b, n, 2, g, kd) * g_mem.reshape(n_layers, b, n, 1, g, 1).astype(
        d_kv.dtype
    )
    mask = where_N[None, None, :, None, None]
    k_pre = jnp.where(mask[..., 0], k_pre + d_kv[:, :, :, 0].reshape(n_layers, b, n, g * kd), k_pre)
    v_new = v_buf_LxBxNxGxK + d_kv[:, :, :, 1].astype(v_buf_LxBxNxGxK.dtype)
    v_buf = jnp.where(mask, v_new, v_buf_LxBxNxGxK)
    pos = jnp.arange(n)
    k_new = jax.vmap(lambda norm, kp: finish_keys({"k_norm": norm}, kp, pos, spec))(
        params["blocks"]["k_norm"], k_pre
    )
    k_buf = jnp.where(mask, k_new.astype(k_buf_LxBxNxGxK.dtype), k_buf_LxBxNxGxK)
    mem_used = jnp.where(where_N[None, :, None], mem_new_BxNxD, mem_old_BxNxD)
    return k_buf, v_buf, (k_pre, g_mem), mem_used


def parallel_logits(params: PyTree, inputs_BxN: jax.Array, config: ModelConfig) -> jax.Array:
    """The training-time approximation's logits (BxNxE): each position from the last pass that
    computed it (the reference's "merged" score)."""
    return _merged(parallel_passes(params, inputs_BxN, config))


def _merged(passes: list[tuple[slice, jax.Array]]) -> jax.Array:
    logits = passes[0][1]
    for sub, pass_logits in passes[1:]:
        logits = logits.at[:, sub].set(pass_logits)
    return logits


def pass_weights(config: ModelConfig) -> tuple[float, ...]:
    """The loss weight of each training pass (pass 0 first), normalised to sum to 1."""
    n_passes = config.memory.passes + 1
    weights = config.memory.pass_weights or (1.0,) * n_passes
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


def loss_sums(
    params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """(CE sum, squared-log-partition sum) of the weighted mean over passes of each pass's mean
    (``memory.pass_weights``; equal by default), on the scale of B*N tokens."""
    b, n = inputs_BxN.shape
    passes = parallel_passes(params, inputs_BxN, config)
    ce_mean, z_mean = 0.0, 0.0
    for (sub, logits), weight in zip(passes, pass_weights(config), strict=True):
        ce, z = cross_entropy_sums(logits, targets_BxN[:, sub], config.vocab_size)
        count = b * logits.shape[1]
        ce_mean, z_mean = ce_mean + weight * ce / count, z_mean + weight * z / count
    return ce_mean * b * n, z_mean * b * n


def eval_sums(
    params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
) -> dict[str, jax.Array]:
    """Validation sums, each on the scale of B*N tokens (so sum / tokens is a mean CE):

    ``ce_sum`` the exact recurrence; ``ce_sum_parallel`` the training-time passes (each position
    scored by the last pass that computed it); ``ce_sum_pass<i>`` each pass on its own positions;
    ``ce_sum_pos<a>_<b>`` the exact CE of positions a..b-1 (buckets of ``memory.eval_bucket``
    positions, when the sequence is longer than one bucket).
    """
    b, n = inputs_BxN.shape
    exact = forward(params, inputs_BxN, config)
    passes = parallel_passes(params, inputs_BxN, config)
    vocab = config.vocab_size
    out = {
        "ce_sum": cross_entropy_sums(exact, targets_BxN, vocab)[0],
        "ce_sum_parallel": cross_entropy_sums(_merged(passes), targets_BxN, vocab)[0],
    }
    for i, (sub, logits) in enumerate(passes):
        ce = cross_entropy_sums(logits, targets_BxN[:, sub], vocab)[0]
        out[f"ce_sum_pass{i}"] = ce * (n / logits.shape[1])
    width = config.memory.eval_bucket
    if 0 < width < n:
        for start in range(0, n, width):
            end = min(start + width, n)
            ce = cross_entropy_sums(exact[:, start:end], targets_BxN[:, start:end], vocab)[0]
            out[f"ce_sum_pos{start}_{end}"] = ce * (n / (end - start))
    return out


# --------------------------------------------------------------------------------------------
# Approximate parallel prefill (memory.prefill="parallel").


def prefill_parallel(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    config: ModelConfig,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
    """APPROXIMATE prefill: the prompt through the training passes (interleaved, refine or
    chunked, as configured) instead of the exact recurrence, in parallel over positions. The cache gets the
    final passes' K/V and each row's last source state as memory; decoding after it is exact
    given that cache. Use ``prefill`` (memory.prefill="exact") for the true model."""
    b, p = tokens_BxP.shape
    n_subsets = 1 if config.memory.training == "refine" else config.memory.passes
    padded = -(-p // n_subsets) * n_subsets  # causal: padding after a row cannot change it
    tokens = jnp.pad(tokens_BxP, ((0, 0), (0, padded - p)))
    x = embed(params, tokens)
    passes, k_buf, v_buf, src = _parallel_run(params, x, tokens, config)
    logits = _merged(passes)
    rows = jnp.arange(b)
    last_pos = lengths_B - 1
    last = logits[rows, last_pos]
    keep = tokens[rows, last_pos] != config.memory.reset_token
    mem = jnp.where(keep[:, None], src[rows, last_pos], jnp.zeros_like(src[rows, last_pos]))
    k = jnp.swapaxes(k_buf, 2, 3)[:, :, :, :p]  # LxBxGxPxK
    v = jnp.swapaxes(v_buf, 2, 3)[:, :, :, :p]
    cache = prefilled_cache(config, k, v, lengths_B, cache_size)
    memory_dtype = jnp.promote_types(x.dtype, jnp.float32)
    return last, KVCache(cache.k, cache.v, cache.lengths, mem.astype(memory_dtype))


# --------------------------------------------------------------------------------------------
# FLOPs (the conventions of rt_jax.models.flops: matmuls only, model FLOPs, causal attention).


def extra_forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the memory pathway: the gates of every layer and the memory's
    K/V projection (once per token when shared, once per layer when layerwise)."""
    if not uses_kv(config):
        return 0.0
    d, kv_dim = config.d_model, config.n_kv_heads * config.head_dim
    gates = config.n_layers * 2.0 * d * 2 * config.n_kv_heads
    projections = 1 if config.memory.kind == "shared" else config.n_layers
    return gates + projections * 2.0 * d * 2 * kv_dim


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token over all passes: interleaved = 2 forwards (pass 0, then the S
    subsets that together recompute every position once, each query attending causally to the
    whole buffer; chunked the same with contiguous chunks), refine = 1 + K forwards; each times
    3 for forward + backward."""
    check_seq_len(config, seq_len)
    passes = 1 + config.memory.passes if config.memory.training == "refine" else 2
    return TRAIN_FACTOR * passes * forward_flops_per_token(config, seq_len)


# --------------------------------------------------------------------------------------------
# The family object (rt_jax.models.family.ModelFamily).

PARTITION_RULES: PartitionRules = (
    (r"^lrt/gamma$", ("layers",)),
    (r"^lrt/w_gate$", ("layers", "embed", None)),
    (r"^lrt/w_kvmem$", ("layers", "embed", "heads")),
    (r"^lrt/w_kvmem_shared$", ("embed", "heads")),
)
"""Logical axes of the memory pathway: per-layer gamma and gates, the memory K/V projection."""


class LRTFamily(StandardFamily):
    """The LRT family: exact recurrence for forward and decoding, parallel passes for training."""

    name = "lrt"
    validate = staticmethod(validate)
    init_params = staticmethod(init_params)
    forward = staticmethod(forward)
    loss_sums = staticmethod(loss_sums)
    eval_sums = staticmethod(eval_sums)
    prefill = staticmethod(prefill)
    decode_step = staticmethod(decode_step)
    extra_params = staticmethod(extra_params)
    extra_forward_flops_per_token = staticmethod(extra_forward_flops_per_token)
    train_flops_per_token = staticmethod(train_flops_per_token)

    def cache_state_width(self, config: ModelConfig) -> int:
        """The carried memory vector: d_model floats per row."""
        return config.d_model

    def partition_rules(self) -> PartitionRules:
        """The standard rules plus the memory pathway's."""
        return STANDARD_RULES + PARTITION_RULES


FAMILY = register_family(LRTFamily())
