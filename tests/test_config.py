"""ModelConfig: defaults, derived values and every validation message."""

from __future__ import annotations

import dataclasses

import pytest

from rt_jax.config import BLOCK_TYPES, IMPLS, ModelConfig
from rt_jax.ops.block import DTYPES, POSITION_KINDS, AttentionSpec


def test_defaults_are_filled():
    config = ModelConfig(vocab_size=100, d_model=64, n_heads=8)
    assert config.n_kv_heads == 8
    assert config.mlp_hidden == 256
    assert config.embedding_size == 100
    assert config.head_dim == 8
    explicit = ModelConfig(vocab_size=100, d_model=64, n_heads=8, n_kv_heads=2, mlp_hidden=100)
    assert (explicit.n_kv_heads, explicit.mlp_hidden) == (2, 100)


def test_frozen_and_hashable():
    config = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 256  # type: ignore[misc]
    assert hash(config) == hash(ModelConfig())
    assert dataclasses.replace(config, n_layers=3).n_layers == 3


def test_attention_spec_and_counts():
    config = ModelConfig(
        d_model=96,
        n_heads=6,
        n_kv_heads=2,
        n_layers=3,
        position="rope",
        rope_theta=500.0,
        alibi_bias_max=4.0,
        norm_eps=1e-6,
        compute_dtype="bfloat16",
    )
    spec = config.attention_spec()
    assert spec == AttentionSpec(
        n_heads=6,
        n_kv_heads=2,
        head_dim=16,
        position="rope",
        alibi_bias_max=4.0,
        rope_theta=500.0,
        norm_eps=1e-6,
        compute_dtype="bfloat16",
    )
    assert spec.group_size == 3
    assert config.kv_floats_per_token() == 2 * 3 * 2 * 16
    # per layer: w_q 96*96 + q_norm 96 + w_kv 96*64 + k_norm 32 + w_o 96*96 + 2 norms + MLP
    per_layer = 96 * 96 + 96 + 96 * 64 + 32 + 96 * 96 + 2 * 96 + 2 * 96 * 384
    assert config.non_embedding_params() == 3 * per_layer + 96
    assert config.total_params() == config.non_embedding_params() + 2 * 256 * 96


POSITIVE_INTS = [
    "vocab_size",
    "d_model",
    "n_heads",
    "n_layers",
    "n_kv_heads",
    "mlp_hidden",
    "embedding_size",
    "leaf_size",
]


@pytest.mark.parametrize("field", POSITIVE_INTS)
@pytest.mark.parametrize("value", [0, -4, 2.0, "8", True])
def test_positive_int_fields(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field} must be a positive int"):
        ModelConfig(**{field: value})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"d_model=130 is not divisible by n_heads=4"):
        ModelConfig(d_model=130, n_heads=4)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"n_kv_heads=3 must divide n_heads=4"):
        ModelConfig(n_heads=4, n_kv_heads=3)


def test_embedding_size_at_least_vocab():
    with pytest.raises(ValueError, match=r"embedding_size=99 is smaller than vocab_size=100"):
        ModelConfig(vocab_size=100, embedding_size=99)
    assert ModelConfig(vocab_size=100, embedding_size=128).embedding_size == 128


@pytest.mark.parametrize(
    ("field", "bad", "good"),
    [
        ("block_type", "sequential", BLOCK_TYPES),
        ("impl", "cuda", IMPLS),
        ("position", "learned", POSITION_KINDS),
        ("compute_dtype", "float16", DTYPES),
    ],
)
def test_choice_fields(field, bad, good):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}='{bad}'"):
        ModelConfig(**{field: bad})
    for value in good:
        assert getattr(ModelConfig(**{field: value}), field) == value


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match=r"RoPE needs an even head_dim; d_model/n_heads = 3"):
        ModelConfig(d_model=12, n_heads=4, position="rope")
    ModelConfig(d_model=12, n_heads=4, position="alibi")  # odd head_dim is fine without RoPE


def test_attention_spec_validation():
    with pytest.raises(ValueError, match="positive"):
        AttentionSpec(n_heads=0, n_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="choose n_kv_heads that divides n_heads"):
        AttentionSpec(n_heads=4, n_kv_heads=3, head_dim=4)
    with pytest.raises(ValueError, match="position"):
        AttentionSpec(n_heads=4, n_kv_heads=4, head_dim=4, position="learned")
    with pytest.raises(ValueError, match="even head_dim"):
        AttentionSpec(n_heads=4, n_kv_heads=4, head_dim=5, position="rope")
    with pytest.raises(ValueError, match="compute_dtype"):
        AttentionSpec(n_heads=4, n_kv_heads=4, head_dim=4, compute_dtype="int8")
