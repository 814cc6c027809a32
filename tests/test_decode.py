"""Prefill + step-by-step decoding with the KV cache reproduces the full forward, per position."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rt_jax
from rt_jax.decoding import decode_step, kv_bytes_per_token, prefill
from rt_jax.models.lm import forward

VOCAB, EMBED = 50, 64  # padded embedding: logits beyond VOCAB exist but are never candidates
SEQ = 13


def _model(block_type: str, position: str, n_kv_heads: int, impl: str = "reference"):
    cfg = rt_jax.ModelConfig(
        vocab_size=VOCAB,
        embedding_size=EMBED,
        d_model=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        n_layers=2,
        mlp_hidden=48,
        block_type=block_type,
        position=position,
        impl=impl,
    )
    return rt_jax.LanguageModel(cfg, rngs=nnx.Rngs(1))


def _teacher_forced(params, tokens: np.ndarray, lengths: list[int], cfg) -> np.ndarray:
    """Logits B x (1 + steps) x E: prefill of the ragged prompts, then steps fed the true tokens."""
    steps = SEQ - max(lengths)
    logits, cache = prefill(params, [tokens[b, :n] for b, n in enumerate(lengths)], cfg, SEQ)
    out = [np.asarray(logits)]
    for step in range(steps):
        feed = tokens[np.arange(len(lengths)), np.array(lengths) + step]
        logits, cache = decode_step(params, cache, feed, cfg)
        out.append(np.asarray(logits))
    assert cache.k.shape == (cfg.n_layers, len(lengths), cfg.n_kv_heads, SEQ, cfg.head_dim)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("block_type", ["recurrent", "transformer"])
@pytest.mark.parametrize("position", ["alibi", "rope"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_prefill_then_decode_matches_forward(block_type, position, n_kv_heads):
    """Every position of random sequences; right-padded prompts of lengths 1 and 6 in one batch
    decode at their own positions (ALiBi distances and RoPE angles per row)."""
    model = _model(block_type, position, n_kv_heads)
    cfg, params = model.config, model.params()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))
    full = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    lengths = [1, 6]
    got = _teacher_forced(params, tokens, lengths, cfg)
    for b, n in enumerate(lengths):
        want = full[b, n - 1 : n + SEQ - max(lengths)]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=2e-5)
    # Together the rows cover every position 0 .. SEQ-1 (row 0: 0..7, row 1: 5..12).


def test_tiled_prefill_then_decode_matches_reference_forward():
    """Prefill with the Fenwick-tiled layer (leaves of 4 positions, prompts of 6 and 11)."""
    model = _model("recurrent", "rope", 2, impl="tiled")
    cfg, params = dataclasses.replace(model.config, leaf_size=4), model.params()
    tokens = np.random.default_rng(4).integers(0, VOCAB, (2, SEQ))
    ref_cfg = dataclasses.replace(cfg, impl="reference")
    full = np.asarray(forward(params, jnp.asarray(tokens), ref_cfg))
    lengths = [6, 11]
    got = _teacher_forced(params, tokens, lengths, cfg)
    for b, n in enumerate(lengths):
        want = full[b, n - 1 : n + SEQ - max(lengths)]
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=2e-5)


def test_padded_array_with_lengths_equals_ragged_lists():
    model = _model("recurrent", "rope", 4)
    cfg, params = model.config, model.params()
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 5))
    padded = tokens.copy()
    padded[0, 2:] = VOCAB + 7  # garbage after the prompt is ignored, even out-of-range ids
    a, _ = prefill(params, padded, cfg, cache_size=8, prompt_lengths=[2, 5])
    b, _ = prefill(params, [tokens[0, :2], tokens[1]], cfg, cache_size=8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batched_generation_equals_each_prompt_alone():
    model = _model("recurrent", "rope", 2)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (1, 5)]
    batched = rt_jax.generate(model, prompts, max_new_tokens=6)
    for b, prompt in enumerate(prompts):
        alone = rt_jax.generate(model, [prompt], max_new_tokens=6)
        np.testing.assert_array_equal(batched.tokens[b], alone.tokens[0])
        np.testing.assert_allclose(batched.logprobs[b], alone.logprobs[0], atol=1e-5)


def test_decoding_past_the_cache_raises():
    model = _model("recurrent", "alibi", 4)
    cfg, params = model.config, model.params()
    logits, cache = prefill(params, [[1, 2, 3]], cfg, cache_size=4)
    logits, cache = decode_step(params, cache, [4], cfg)  # fills position 3, the last slot
    with pytest.raises(ValueError, match="cache is full"):
        decode_step(params, cache, [5], cfg)
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        prefill(params, [[1, 2, 3]], cfg, cache_size=2)
    with pytest.raises(ValueError, match="max_len"):
        rt_jax.generate(model, [[1, 2, 3]], max_new_tokens=5, max_len=7)


def test_decode_step_rejects_bad_tokens():
    model = _model("transformer", "alibi", 4)
    cfg, params = model.config, model.params()
    _, cache = prefill(params, [[1, 2]], cfg, cache_size=4)
    with pytest.raises(ValueError, match="must lie in"):
        decode_step(params, cache, [VOCAB], cfg)  # a padding row of the embedding: not a token
    with pytest.raises(ValueError, match="integer ids"):
        decode_step(params, cache, [1, 2], cfg)


def test_kv_cache_bytes():
    cfg = rt_jax.ModelConfig(d_model=64, n_heads=8, n_kv_heads=2, n_layers=3)
    assert kv_bytes_per_token(cfg) == 2 * 3 * 2 * 8 * 4
    bf16 = rt_jax.ModelConfig(d_model=64, n_heads=8, n_layers=3, compute_dtype="bfloat16")
    assert kv_bytes_per_token(bf16) == 2 * 3 * 64 * 2
