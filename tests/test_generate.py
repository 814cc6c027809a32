"""Sampling (greedy/temperature/top-k/top-p/vocab padding), log-probs and `rt_jax.generate` inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rt_jax
from rt_jax.decoding import PAD_TOKEN, greedy_decode, prefill, sample_logits
from rt_jax.models.lm import forward

VOCAB, EMBED = 40, 48


@pytest.fixture(scope="module")
def model():
    cfg = rt_jax.ModelConfig(
        vocab_size=VOCAB,
        embedding_size=EMBED,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden=48,
        block_type="recurrent",
        position="rope",
        impl="reference",
    )
    return rt_jax.LanguageModel(cfg, rngs=nnx.Rngs(0))


def _draws(logits_V: np.ndarray, n: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """n samples of one row of logits (as a batch of n identical rows, one key)."""
    batch = jnp.tile(jnp.asarray(logits_V, jnp.float32)[None], (n, 1))
    tok, lp = sample_logits(batch, jax.random.PRNGKey(0), vocab_size=kw.pop("vocab", 4), **kw)
    return np.asarray(tok), np.asarray(lp)


def test_padding_logits_are_never_candidates():
    logits = np.array([0.0, 1.0, 0.5, 2.0, 50.0, 60.0])  # rows 4 and 5 pad the embedding
    tok, lp = _draws(logits, 1)
    assert tok[0] == 3  # greedy over the real vocabulary only
    real = logits[:4]
    want = real[3] - np.log(np.sum(np.exp(real)))
    np.testing.assert_allclose(lp[0], want, rtol=1e-6)
    tok, _ = _draws(logits, 4000, temperature=5.0)
    assert set(tok.tolist()) == {0, 1, 2, 3}


def test_temperature_sampling_frequencies_and_model_logprobs():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    tok, lp = _draws(np.log(probs), 20000, temperature=1.0)
    freq = np.bincount(tok, minlength=4) / tok.size
    np.testing.assert_allclose(freq, probs, atol=0.015)
    np.testing.assert_allclose(lp, np.log(probs)[tok], rtol=1e-5)
    # A higher temperature flattens the sampling distribution; log-probs stay the model's own.
    tok, lp = _draws(np.log(probs), 20000, temperature=4.0)
    assert np.mean(tok == 3) > 0.12
    np.testing.assert_allclose(lp, np.log(probs)[tok], rtol=1e-5)


def test_top_k_and_top_p_restrict_the_candidates():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # descending order: 1, 3, 2, 0
    logits = np.log(probs)
    tok, _ = _draws(logits, 4000, temperature=3.0, top_k=2)
    assert set(tok.tolist()) == {1, 3}
    tok, _ = _draws(logits, 4000, temperature=1.0, top_k=1)
    assert set(tok.tolist()) == {1}
    tok, _ = _draws(logits, 4000, temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reaches 0.7
    assert set(tok.tolist()) == {1, 3}
    tok, _ = _draws(logits, 4000, temperature=1.0, top_p=0.85)  # needs 0.5 + 0.3 + 0.15
    assert set(tok.tolist()) == {1, 2, 3}
    tok, _ = _draws(logits, 4000, temperature=1.0, top_p=0.1)  # the most likely token stays
    assert set(tok.tolist()) == {1}
    tok, _ = _draws(logits, 4000, temperature=1.0, top_k=3, top_p=0.8)  # (0.5 + 0.3) / 0.95 > 0.8
    assert set(tok.tolist()) == {1, 3}


def test_generate_logprobs_match_forward_log_softmax(model):
    cfg = model.config
    prompt = np.random.default_rng(0).integers(0, VOCAB, (2, 5))
    for kw in ({}, {"temperature": 1.0, "top_k": 10, "top_p": 0.9, "seed": 3}):
        out = rt_jax.generate(model, prompt, max_new_tokens=6, **kw)
        assert out.tokens.shape == out.logprobs.shape == (2, 6)
        assert out.tokens.max() < VOCAB and out.tokens.min() >= 0
        full = np.concatenate([prompt, out.tokens], axis=1)
        logits = np.asarray(forward(model.params(), jnp.asarray(full), cfg))[:, 4:-1, :VOCAB]
        logp = jax.nn.log_softmax(logits, axis=-1)
        want = np.take_along_axis(np.asarray(logp), out.tokens[..., None], axis=-1)[..., 0]
        np.testing.assert_allclose(out.logprobs, want, rtol=1e-5, atol=1e-5)
        if not kw:  # greedy: every token is the argmax of the forward's logits
            np.testing.assert_array_equal(out.tokens, np.argmax(logits, axis=-1))


def test_seed_makes_sampling_reproducible(model):
    prompt = [[1, 2, 3]]
    a = rt_jax.generate(model, prompt, 8, temperature=2.0, seed=5)
    b = rt_jax.generate(model, prompt, 8, temperature=2.0, seed=5)
    c = rt_jax.generate(model, prompt, 8, temperature=2.0, seed=6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_each_row(model):
    prompts = [[3, 1, 4], [1, 5, 9]]
    free = rt_jax.generate(model, prompts, max_new_tokens=8)
    stop = int(free.tokens[0, 2])
    out = rt_jax.generate(model, prompts, max_new_tokens=8, stop_tokens=[stop])
    for b in range(2):
        hits = np.flatnonzero(free.tokens[b] == stop)
        n = int(hits[0]) + 1 if hits.size else 8
        assert out.lengths[b] == n
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert np.all(out.tokens[b, n:] == PAD_TOKEN) and np.all(out.logprobs[b, n:] == 0.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompt_tokens": np.zeros((1, 0), np.int32)}, "at least one token"),
        ({"prompt_tokens": [[1, 2], []]}, "at least one token"),
        ({"prompt_tokens": [[1, VOCAB]]}, "outside"),
        ({"prompt_tokens": [[-1, 2]]}, "outside"),
        ({"prompt_tokens": [[1.5, 2.0]]}, "integer"),
        ({"prompt_tokens": [1, 2, 3]}, "shape"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"stop_tokens": [VOCAB]}, "stop_tokens"),
        ({"max_len": 4}, "max_len"),
    ],
)
def test_bad_inputs_raise(model, kwargs, match):
    args = {"prompt_tokens": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        rt_jax.generate(model, **args)


def test_greedy_decode_loop_continues_like_generate(model):
    cfg, params = model.config, model.params()
    prompt = [[5, 6, 7, 8], [9, 10]]
    want = rt_jax.generate(model, prompt, max_new_tokens=5)
    logits, cache = prefill(params, prompt, cfg, cache_size=8)
    first = np.argmax(np.asarray(logits)[:, :VOCAB], axis=-1)
    np.testing.assert_array_equal(first, want.tokens[:, 0])
    rest, cache = greedy_decode(params, cache, first, cfg, n_steps=4)
    np.testing.assert_array_equal(np.asarray(rest), want.tokens[:, 1:])
    with pytest.raises(ValueError, match="cache is full"):
        greedy_decode(params, cache, first, cfg, n_steps=1)  # lengths 8 and 6 of 8 slots
