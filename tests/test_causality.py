"""Causality: the output at position t does not depend on inputs after t (exactly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt_jax.config import ModelConfig
from rt_jax.models import lm
from rt_jax.ops.block import AttentionSpec, param_shapes
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.transformer import transformer_layer

N, D, F = 11, 16, 32


def _random_params(key, spec):
    shapes = param_shapes(D, F, spec)
    keys = jax.random.split(key, len(shapes))
    return {
        name: (1.0 + 0.3 * jax.random.normal(k, s))
        if name.endswith("norm")
        else jax.random.normal(k, s) / np.sqrt(s[0])
        for k, (name, s) in zip(keys, shapes.items(), strict=True)
    }


def _input_grads_per_position(fn, x):
    """dx of <fn(x)[:, t], c_t> for every t (one jitted vjp, N cotangents)."""
    per_t = jax.jit(lambda c: jax.vjp(fn, x)[1](c)[0])
    c = jax.random.normal(jax.random.PRNGKey(9), jax.eval_shape(fn, x).shape)
    out = []
    for t in range(x.shape[1]):
        mask = (jnp.arange(x.shape[1]) == t)[None, :, None]  # cotangent only at output t
        out.append(np.asarray(per_t(jnp.where(mask, c, 0.0))))
    return out


def _check_causal(grads):
    n = len(grads)
    for t, dx in enumerate(grads):
        assert np.all(dx[:, t + 1 :] == 0.0), f"output {t} depends on a later input"
        assert np.any(dx[:, t] != 0.0)  # the check can see a dependence when there is one
    assert any(np.any(grads[t][:, 0] != 0.0) for t in range(1, n))


LAYERS = {
    "transformer": transformer_layer,
    "rt_reference": recurrent_layer_reference,
    "rt_tiled": lambda p, x, s: recurrent_layer_tiled(p, x, s, leaf_size=4),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_is_causal(name):
    spec = AttentionSpec(4, 2, 4, position="alibi")
    params = _random_params(jax.random.PRNGKey(0), spec)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, N, D))
    layer = LAYERS[name]
    _check_causal(_input_grads_per_position(lambda xx: layer(params, xx, spec), x))


@pytest.mark.parametrize("block_type", ["transformer", "recurrent"])
def test_language_model_is_causal(block_type):
    config = ModelConfig(
        vocab_size=32,
        d_model=D,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        block_type=block_type,
        impl="tiled",
        position="rope",
        leaf_size=4,
    )
    params = lm.init_params(config, jax.random.PRNGKey(2))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, N), 0, 32)
    x = lm.embed(params, tokens)
    grads = _input_grads_per_position(
        lambda xx: lm.head(params, lm.run_blocks(params, xx, config), config), x
    )
    _check_causal(grads)
    # lm.forward on tokens: changing the tokens after t leaves the logits up to t bit-identical.
    forward = jax.jit(lambda tok: lm.forward(params, tok, config))
    base = np.asarray(forward(tokens))
    t = 5
    changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % 32)
    other = np.asarray(forward(changed))
    np.testing.assert_array_equal(other[:, : t + 1], base[:, : t + 1])
    assert np.any(other[:, t + 1 :] != base[:, t + 1 :])
