"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_logits(
    logits_BxE: jax.Array,
    key: jax.Array,
    *,
    vocab_size: int,
    temperature: float | jax.Array = 0.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
    greedy: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Next tokens (B,) and their log-probabilities under the model (B,), over the real vocabulary.

    Only the first ``vocab_size`` logits are candidates. Greedy (argmax) when ``temperature`` is 0
    (or ``greedy=True``); otherwise sample from softmax(logits / temperature) restricted to the
    ``top_k`` largest logits and then to the smallest set whose probability reaches ``top_p``
    (the most likely token always stays). The returned log-probabilities are those of the model
    itself: log_softmax of the untempered logits over the real vocabulary.
    """
    logits = logits_BxE[:, :vocab_size].astype(jnp.float32)
    logprobs_BxV = jax.nn.log_softmax(logits, axis=-1)
    if greedy is None:
        greedy = float(temperature) == 0.0
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        if top_k is not None and top_k < vocab_size:
            kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
        if top_p is not None:
            sorted_desc = -jnp.sort(-scaled, axis=-1)
            probs = jax.nn.softmax(sorted_desc, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep = mass_before < top_p
            keep = keep.at[:, 0].set(True)
            threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
            scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        tokens = jax.random.categorical(key, scaled, axis=-1)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs_BxV, tokens[:, None], axis=-1)[:, 0]
