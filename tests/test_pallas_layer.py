"""The RT layer with impl="pallas" (interpret mode) equals impl="tiled" and the oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rt_jax.config import ModelConfig
from rt_jax.models.lm import init_params, layer_function
from rt_jax.ops.reference import recurrent_layer_reference


def test_pallas_layer_equals_tiled_and_reference_forward_and_backward():
    # GQA, ALiBi, N not a multiple of the leaf, batch 2.
    cfg = ModelConfig(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, leaf_size=4, impl="pallas", interpret=True
    )
    params = jax.tree.map(lambda a: a[0], init_params(cfg, jax.random.key(0))["blocks"])
    spec = cfg.attention_spec()
    x = jax.random.normal(jax.random.key(1), (2, 22, 32))
    w = jax.random.normal(jax.random.key(2), (2, 22, 32))

    def loss(layer):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(w * layer(p, x, spec)), (0, 1)))

    pallas = loss(layer_function(cfg))(params, x)
    tiled = loss(layer_function(dataclasses.replace(cfg, impl="tiled")))(params, x)
    oracle = loss(recurrent_layer_reference)(params, x)
    for other in (tiled, oracle):
        np.testing.assert_allclose(float(pallas[0]), float(other[0]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(pallas[1]), jax.tree.leaves(other[1]), strict=True):
            scale = float(jnp.max(jnp.abs(b))) + 1e-6
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=0)


def test_pallas_impl_on_cpu_without_interpret_says_what_to_pass():
    cfg = ModelConfig(d_model=32, n_heads=4, impl="pallas", interpret=False)
    with pytest.raises(ValueError, match="interpret=True"):
        layer_function(cfg)
