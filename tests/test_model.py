"""Model-level tests: parameter counts, N=1 equivalence, GQA head mapping, token checks, dtypes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rt_jax.config import ModelConfig
from rt_jax.models.lm import LanguageModel, forward, init_params

SMALL = {"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 2, "mlp_hidden": 48}

# One compile per (config, shapes) instead of op-by-op dispatch: keeps the file fast.
jit_forward = jax.jit(forward, static_argnums=2)
jit_init = jax.jit(init_params, static_argnums=0)


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, "impl": "reference", **overrides})


def random_tokens(config: ModelConfig, batch: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (batch, n)).astype(np.int32)


def randomise_norms(params, key):
    """Norm weights away from 1 so that tests see them."""
    blocks = dict(params["blocks"])
    for i, name in enumerate(sorted(n for n in blocks if n.endswith("norm"))):
        noise = jax.random.normal(jax.random.fold_in(key, i), blocks[name].shape)
        blocks[name] = blocks[name] + 0.3 * noise
    return {**params, "blocks": blocks}


def leaf_sizes(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- parameter counts
# (layers, d_model, heads, mlp): non-embedding and total parameters, papers doc section 4.1.
PAPER_TABLE = [
    ((12, 1024, 16, 4096), 151_045_120, 216_843_264),  # 150m.yaml
    ((6, 1408, 22, 5632), 142_772_608, 233_245_056),  # 150m_6.yaml
    ((24, 1024, 16, 4096), 302_089_216, 367_887_360),  # 300m.yaml
    ((12, 1440, 16, 5760), 298_668_960, 391_197_600),  # 300m_12.yaml (file)
    ((12, 1408, 22, 5632), 285_543_808, 376_016_256),  # 300m_12 per paper Table 1 / README
    ((6, 2048, 32, 8192), 302_041_088, 433_637_376),  # 300m_6.yaml
]


@pytest.mark.parametrize(("shape", "non_embedding", "total"), PAPER_TABLE)
def test_param_counts_match_paper_table_and_pytree(shape, non_embedding, total):
    n_layers, d_model, n_heads, mlp = shape
    config = ModelConfig(
        vocab_size=32100,
        embedding_size=32128,
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        mlp_hidden=mlp,
        impl="reference",
    )
    assert config.non_embedding_params() == non_embedding
    assert config.total_params() == total
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # no allocation
    assert leaf_sizes(params) == total
    assert leaf_sizes(params["blocks"]) + leaf_sizes(params["ln_f"]) == non_embedding
    assert config.kv_floats_per_token() == 2 * n_layers * d_model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "mlp_hidden": 17}, {"embedding_size": 64}],
)
def test_param_counts_small_configs(overrides):
    config = small(**overrides)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert leaf_sizes(params) == config.total_params()
    assert (
        leaf_sizes(params["blocks"]) + leaf_sizes(params["ln_f"]) == config.non_embedding_params()
    )
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    assert leaf_sizes(nnx.state(model, nnx.Param)) == config.total_params()


def test_init_is_mitchell():
    config = ModelConfig(vocab_size=512, d_model=256, n_heads=4, n_layers=3, mlp_hidden=1024)
    params = jit_init(config, jax.random.key(1))
    trunc = 0.98658  # std of a standard normal truncated at +-3

    def check(w, sigma):
        w = np.asarray(w)
        assert abs(w.std() / (trunc * sigma) - 1) < 0.05
        assert np.abs(w).max() <= 3 * sigma * (1 + 1e-6)

    d, f = 256, 1024
    check(params["embed"], d**-0.5)
    check(params["head"], d**-0.5)
    blocks = params["blocks"]
    for layer in range(3):
        for name in ("w_q", "w_kv", "w_ff_in"):
            check(blocks[name][layer], d**-0.5)
        check(blocks["w_o"][layer], (2 * d * (layer + 1)) ** -0.5)
        check(blocks["w_ff_out"][layer], (2 * f * (layer + 1)) ** -0.5)
    for name in ("attn_norm", "q_norm", "k_norm", "ff_norm"):
        np.testing.assert_array_equal(blocks[name], 1.0)
    np.testing.assert_array_equal(params["ln_f"], 1.0)


# ----------------------------------------------------------------------------- semantics
@pytest.mark.parametrize(
    ("impl", "overrides"),
    [
        ("reference", {}),
        ("reference", {"position": "rope", "n_kv_heads": 2}),
        ("tiled", {"position": "none", "n_kv_heads": 1, "leaf_size": 8}),
    ],
)
def test_recurrent_equals_transformer_at_one_position(impl, overrides):
    """With one position both blocks attend only to the self pair from the layer input."""
    rt = small(block_type="recurrent", impl=impl, **overrides)
    tf = dataclasses.replace(rt, block_type="transformer")
    params = randomise_norms(jit_init(rt, jax.random.key(2)), jax.random.key(3))
    # Both models are causal, so position 0 of a 2-position run is the N=1 case; position 1
    # differs (the RT's second query sees the persistent pair of z_0, the Transformer's x_0).
    tok = random_tokens(rt, batch=3, n=2)
    diff = np.abs(jit_forward(params, tok, rt) - jit_forward(params, tok, tf))
    assert diff[:, 0].max() < 1e-5 and diff[:, 1].max() > 1e-3


def expand_gqa_to_mha(params, config: ModelConfig):
    """MHA parameters whose kv heads repeat the GQA ones (kv head g serves query heads g*R..)."""
    g, r, k = config.n_kv_heads, config.n_heads // config.n_kv_heads, config.head_dim
    blocks = dict(params["blocks"])
    w_kv = blocks["w_kv"]  # L x D x 2GK
    w_k, w_v = jnp.split(w_kv, 2, axis=-1)

    def repeat(w):  # ... x GK -> ... x HK, each head repeated r times
        shape = w.shape[:-1]
        return jnp.repeat(w.reshape(*shape, g, k), r, axis=-2).reshape(*shape, g * r * k)

    blocks["w_kv"] = jnp.concatenate([repeat(w_k), repeat(w_v)], axis=-1)
    blocks["k_norm"] = repeat(blocks["k_norm"])  # LayerNorm stats are unchanged by repetition
    return {**params, "blocks": blocks}


@pytest.mark.parametrize(
    ("block_type", "position"), [("recurrent", "rope"), ("transformer", "alibi")]
)
def test_gqa_equals_mha_with_repeated_kv_heads(block_type, position):
    gqa = small(n_kv_heads=2, block_type=block_type, position=position)
    mha = dataclasses.replace(gqa, n_kv_heads=gqa.n_heads)
    params = randomise_norms(jit_init(gqa, jax.random.key(4)), jax.random.key(5))
    tok = random_tokens(gqa, batch=2, n=6)
    expanded = expand_gqa_to_mha(params, gqa)
    np.testing.assert_allclose(
        jit_forward(params, tok, gqa), jit_forward(expanded, tok, mha), atol=2e-5
    )


# ----------------------------------------------------------------------------- the NNX module
def test_language_model_construction_and_call():
    config = small(embedding_size=48, n_kv_heads=2)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    tok = random_tokens(config, batch=2, n=5)
    logits = model(tok)
    assert logits.shape == (2, 5, 48) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    jitted = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(jitted(model, tok), logits, atol=1e-6)
    # params() round-trips; another seed gives other parameters
    again = LanguageModel(config, params=model.params())
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params()), strict=True):
        np.testing.assert_array_equal(a, b)
    other = LanguageModel(config, rngs=nnx.Rngs(1))
    assert not np.array_equal(other.params()["blocks"]["w_q"], model.params()["blocks"]["w_q"])


def test_language_model_needs_rngs_or_params():
    with pytest.raises(ValueError, match="rngs"):
        LanguageModel(small())


BAD_TOKENS = [
    ("out of range", np.array([[0, 1, 40]], np.int32), "token ids must lie in"),
    ("negative", np.array([[0, -1, 3]], np.int32), "token ids must lie in"),
    ("float dtype", np.array([[0.0, 1.0]], np.float32), "must be integers"),
    ("rank 1", np.array([0, 1, 2], np.int32), "shape"),
    ("rank 3", np.zeros((1, 2, 3), np.int32), "shape"),
    ("no positions", np.zeros((2, 0), np.int32), "at least one position"),
]


@pytest.mark.parametrize(("what", "tok", "message"), BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_invalid_tokens_raise(what, tok, message):
    model = LanguageModel(small(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=message):
        model(tok)
    with pytest.raises(ValueError, match=message):
        forward(model.params(), jnp.asarray(tok), model.config)


def test_invalid_tokens_raise_under_jit():
    config = small()
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    fn = jax.jit(lambda p, t: forward(p, t, config))
    with pytest.raises(ValueError, match="must be integers"):
        fn(params, jnp.zeros((1, 3), jnp.float32))
    with pytest.raises(ValueError, match="shape"):
        fn(params, jnp.zeros((3,), jnp.int32))


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("block_type", ["recurrent", "transformer"])
def test_bfloat16_compute_finite_and_close(block_type):
    config = small(block_type=block_type, n_kv_heads=2)
    params = jit_init(config, jax.random.key(7))
    tok = random_tokens(config, batch=2, n=9)
    ref = np.asarray(jit_forward(params, tok, config))
    low = jit_forward(params, tok, dataclasses.replace(config, compute_dtype="bfloat16"))
    assert low.dtype == jnp.float32  # logits stay float32
    low = np.asarray(low)
    assert np.isfinite(low).all()
    # bf16 matmuls (8-bit mantissa) with float32 accumulation, norms and softmax state
    assert np.abs(low - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.abs(low - ref).max() > 0  # bf16 really was used
