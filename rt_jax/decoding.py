"""Autoregressive generation with a fixed-size KV cache, for every model family.

``generate(model, prompt_tokens_BxP, max_new_tokens=K, ...)`` prefills the prompt through the
model family's ``prefill`` (the model's own layer implementation: reference / tiled / pallas), then
runs a jitted ``lax.while_loop`` of the family's ``decode_step`` over a cache preallocated once and
updated in place. This module checks the user's input and runs the loops; the cache lives in
``rt_jax.models.kv_cache``, each family's prefill and decode step in its module under
``rt_jax/models/``, and token choice in ``rt_jax.sampling``.

Batches of prompts with different lengths are **right-padded**: row b holds its prompt in positions
[0, len_b) and anything after it. The forward is causal, so positions < len_b do not see the
padding; each row then decodes at its own position t_b = len_b, len_b + 1, ..., writing its cache
entry at index t_b and masking every entry s >= t_b. Positions are therefore the true ones for
ALiBi and RoPE with no offset bookkeeping, and padded garbage is overwritten before it is ever read.

The cache holds, per cached layer, keys and values of shape B x G x S x K (G kv heads) in the
compute dtype: ``2 * cache_layers * n_kv_heads * head_dim`` numbers per token for both block types.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rt_jax.config import ModelConfig
from rt_jax.models.family import get_family
from rt_jax.models.kv_cache import (
    KVCache,
    init_cache,
    kv_bytes_per_token,
    prefilled_cache,
    write_cache_entries,
)
from rt_jax.sampling import sample_logits

__all__ = [
    "PAD_TOKEN",
    "GenerateOutput",
    "KVCache",
    "decode_step",
    "generate",
    "greedy_decode",
    "init_cache",
    "kv_bytes_per_token",
    "prefill",
    "prefilled_cache",
    "sample_logits",
    "write_cache_entries",
]

PyTree = Any
PAD_TOKEN = -1
"""Value of ``GenerateOutput.tokens`` after a row has produced a stop token."""


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Generated tokens (B, K), their log-probabilities (B, K) and how many each row produced (B,).

    After a row emits a stop token (which is kept), its remaining tokens are ``PAD_TOKEN`` (-1)
    and their log-probabilities 0.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray


def _prefill(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    config: ModelConfig,
    cache_size: int,
) -> tuple[jax.Array, KVCache]:
    return get_family(config).prefill(params, tokens_BxP, lengths_B, config, cache_size)


def _decode_step(
    params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
) -> tuple[jax.Array, KVCache]:
    return get_family(config).decode_step(params, cache, tokens_B, config)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "cache_size"))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("config",), donate_argnames=("cache",))


def _as_prompt_batch(
    prompt_tokens: Any, prompt_lengths: Any, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validated right-padded (B, P) int32 tokens and lengths (B,) from an array or ragged lists."""
    if isinstance(prompt_tokens, list | tuple) and any(
        isinstance(row, list | tuple | np.ndarray | jax.Array) for row in prompt_tokens
    ):
        rows = [np.asarray(row) for row in prompt_tokens]
        if prompt_lengths is not None:
            raise ValueError(
                "pass prompt_lengths only with a padded (B, P) array, not ragged lists"
            )
        if any(row.ndim != 1 for row in rows):
            raise ValueError("each prompt must be a flat list of token ids")
        lengths = np.array([row.size for row in rows], np.int64)
        width = int(lengths.max()) if rows else 0
        tokens = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            if row.size and not np.issubdtype(row.dtype, np.integer):
                raise ValueError(f"prompt {i} must hold integer token ids, got dtype {row.dtype}")
            tokens[i, : row.size] = row
    else:
        tokens = np.asarray(prompt_tokens)
        if tokens.ndim != 2:
            raise ValueError(
                f"prompt_tokens must have shape (batch, prompt_len), got {tokens.shape}"
            )
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompt_tokens must be integer token ids, got dtype {tokens.dtype}")
        if prompt_lengths is None:
            lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int64)
        else:
            lengths = np.asarray(prompt_lengths)
            if lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(
                    f"prompt_lengths must be {tokens.shape[0]} integers (one per row), got "
                    f"{lengths!r}"
                )
            if np.any(lengths > tokens.shape[1]):
                raise ValueError(
                    f"prompt_lengths {lengths.tolist()} exceed the padded width {tokens.shape[1]}"
                )
    if tokens.shape[0] == 0:
        raise ValueError("the prompt batch is empty: pass at least one prompt")
    if np.any(lengths < 1):
        raise ValueError(
            f"every prompt needs at least one token (e.g. a BOS/EOS id); lengths {lengths.tolist()}"
        )
    tokens = tokens[:, : int(lengths.max())]
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    bad = valid & ((tokens < 0) | (tokens >= vocab_size))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"prompt token id {int(tokens[row, col])} (row {row}, position {col}) is outside "
            f"[0, {vocab_size}): check the tokenizer against ModelConfig.vocab_size"
        )
    return np.where(valid, tokens, 0).astype(np.int32), lengths.astype(np.int32)


def prefill(
    params: PyTree,
    prompt_tokens: Any,
    config: ModelConfig,
    cache_size: int,
    prompt_lengths: Any = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompts through the model: logits of each row's last prompt token and the cache.

    ``prompt_tokens`` is a (B, P) array (right-padded when ``prompt_lengths`` is given) or a list
    of token lists of different lengths. Logits are float32 over ``embedding_size`` rows.
    """
    tokens, lengths = _as_prompt_batch(prompt_tokens, prompt_lengths, config.vocab_size)
    if not isinstance(cache_size, int) or cache_size < tokens.shape[1]:
        raise ValueError(
            f"cache_size={cache_size!r} cannot hold the prompt of {tokens.shape[1]} tokens: "
            "pass cache_size >= longest prompt + tokens to decode"
        )
    return _prefill_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), config, cache_size)


def _check_step(cache: KVCache, tokens_B: Any, config: ModelConfig, n_steps: int) -> jax.Array:
    """Validated (B,) int32 tokens to feed; ValueError if ``n_steps`` would overflow the cache."""
    lengths = np.asarray(cache.lengths)
    if lengths.max() + n_steps > cache.size:
        raise ValueError(
            f"the KV cache is full: {n_steps} more step(s) from row lengths {lengths.tolist()} "
            f"do not fit in {cache.size} positions; allocate a larger cache_size in prefill"
        )
    tokens = np.asarray(tokens_B)
    if tokens.shape != lengths.shape or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens_B must be {lengths.shape[0]} integer ids, got {tokens!r}")
    if np.any((tokens < 0) | (tokens >= config.vocab_size)):
        raise ValueError(f"token ids {tokens.tolist()} must lie in [0, {config.vocab_size})")
    return jnp.asarray(tokens, jnp.int32)


def decode_step(
    params: PyTree, cache: KVCache, tokens_B: Any, config: ModelConfig
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row at its next position: next-token logits (B, embedding_size), cache.

    The input cache is donated (updated in place); use the returned one. Raises ValueError when a
    row's cache is full or a token id is out of range.
    """
    tokens = _check_step(cache, tokens_B, config, n_steps=1)
    return _decode_step_jit(params, cache, tokens, config)


def _greedy_decode_loop(
    params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig, n_steps: int
) -> tuple[jax.Array, KVCache]:
    def body(i: jax.Array, carry: tuple) -> tuple:
        cache, tok, out = carry
        logits, cache = _decode_step(params, cache, tok, config)
        tok = jnp.argmax(logits[:, : config.vocab_size], axis=-1).astype(jnp.int32)
        return cache, tok, out.at[:, i].set(tok)

    out = jnp.zeros((tokens_B.shape[0], n_steps), jnp.int32)
    cache, _, out = jax.lax.fori_loop(0, n_steps, body, (cache, tokens_B, out))
    return out, cache


_greedy_decode_loop_jit = jax.jit(
    _greedy_decode_loop, static_argnames=("config", "n_steps"), donate_argnames=("cache",)
)


def greedy_decode(
    params: PyTree, cache: KVCache, tokens_B: Any, config: ModelConfig, n_steps: int
) -> tuple[jax.Array, KVCache]:
    """Feed ``tokens_B`` then ``n_steps - 1`` greedy tokens in one jitted loop: the n_steps greedy
    tokens that follow (B, n_steps) and the cache. The input cache is donated."""
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    tokens = _check_step(cache, tokens_B, config, n_steps)
    return _greedy_decode_loop_jit(params, cache, tokens, config, n_steps)


def _generate(
    params: PyTree,
    tokens_BxP: jax.Array,
    lengths_B: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    stop_tokens: jax.Array,
    *,
    config: ModelConfig,
    cache_size: int,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    use_top_p: bool,
) -> tuple[jax.Array, jax.Array]:
    sample = functools.partial(
        sample_logits,
        vocab_size=config.vocab_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p if use_top_p else None,
        greedy=greedy,
    )
    logits, cache = _prefill(params, tokens_BxP, lengths_B, config, cache_size)
    b = tokens_BxP.shape[0]
    tok, lp = sample(logits, jax.random.fold_in(key, 0))
    out_tok = jnp.full((b, max_new_tokens), PAD_TOKEN, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(lp)
    done = jnp.any(tok[:, None] == stop_tokens[None, :], axis=-1)

    def cond(carry: tuple) -> jax.Array:
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, cache, tok, done, out_tok, out_lp = carry
        logits, cache = _decode_step(params, cache, tok, config)
        new_tok, lp = sample(logits, jax.random.fold_in(key, i))
        emitted = jnp.where(done, PAD_TOKEN, new_tok)
        out_tok = jax.lax.dynamic_update_slice_in_dim(out_tok, emitted[:, None], i, axis=1)
        out_lp = jax.lax.dynamic_update_slice_in_dim(
            out_lp, jnp.where(done, 0.0, lp)[:, None], i, axis=1
        )
        done = done | jnp.any(new_tok[:, None] == stop_tokens[None, :], axis=-1)
        return i + 1, cache, new_tok, done, out_tok, out_lp

    carry = (jnp.int32(1), cache, tok, done, out_tok, out_lp)
    _, _, _, _, out_tok, out_lp = jax.lax.while_loop(cond, body, carry)
    return out_tok, out_lp


_generate_jit = jax.jit(
    _generate,
    static_argnames=("config", "cache_size", "max_new_tokens", "greedy", "top_k", "use_top_p"),
)


def generate(
    model: Any,
    prompt_tokens: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    *,
    stop_tokens: Sequence[int] = (),
    prompt_lengths: Any = None,
    max_len: int | None = None,
) -> GenerateOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens; ``temperature=0.0`` is greedy.

    ``model`` is a ``LanguageModel`` (anything with ``.config`` and ``.params()``).
    ``prompt_tokens``: a (B, P) integer array, right-padded if ``prompt_lengths`` (B,) is given, or
    a list of token lists of different lengths. Generation of a row stops after it emits one of
    ``stop_tokens``. ``max_len`` bounds prompt + generated tokens (ValueError beyond it).
    """
    config: ModelConfig = model.config
    tokens, lengths = _as_prompt_batch(prompt_tokens, prompt_lengths, config.vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = int(lengths.max())
    if max_len is not None and longest + max_new_tokens > max_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_len={max_len}: shorten the prompt or lower max_new_tokens"
        )
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1
    ):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")
    stops = np.asarray(list(stop_tokens), np.int64).reshape(-1)
    if np.any((stops < 0) | (stops >= config.vocab_size)):
        raise ValueError(f"stop_tokens {stops.tolist()} must lie in [0, {config.vocab_size})")
    greedy = float(temperature) == 0.0
    out_tok, out_lp = _generate_jit(
        model.params(),
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.PRNGKey(seed),
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.asarray(stops, jnp.int32),
        config=config,
        cache_size=longest + max_new_tokens - 1,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
        top_k=None if greedy or top_k is None else int(min(top_k, config.vocab_size)),
        use_top_p=not greedy and top_p is not None,
    )
    out_tok, out_lp = np.asarray(out_tok), np.asarray(out_lp)
    return GenerateOutput(out_tok, out_lp, np.sum(out_tok != PAD_TOKEN, axis=1))
