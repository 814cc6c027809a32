"""Latent Recurrent Transformer: the parallel passes against the exact recurrence, memory resets,
causality, parameter counts, the baseline at init, decoding, the train step and bad configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rt_jax
from rt_jax.config import MemoryConfig, ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.decoding import decode_step, prefill
from rt_jax.models import lm, lrt
from rt_jax.ops.block import pre_attention
from rt_jax.ops.transformer import transformer_layer
from rt_jax.train import flops
from rt_jax.train import sharding as shd
from rt_jax.train.config import MeshConfig, TrainConfig
from rt_jax.train.sharding import make_mesh
from rt_jax.train.step import build_train_step

V, RESET = 13, 3
_forward = jax.jit(lm.forward, static_argnames="config")


def _cfg(memory: dict | None = None, **changes) -> ModelConfig:
    """The test model; ``memory`` holds MemoryConfig changes (kind layerwise, reset token RESET)."""
    base = dict(
        vocab_size=V,
        embedding_size=16,
        d_model=16,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        block_type="transformer",
        position="rope",
        memory=MemoryConfig(**{"kind": "layerwise", "reset_token": RESET, **(memory or {})}),
    )
    return ModelConfig(**{**base, **changes})


def _with_memory(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg`` with MemoryConfig fields changed."""
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **changes))


def _params(cfg, seed=0):
    """Random parameters with non-trivial gates (init has them at 0) and larger gammas."""
    params = lm.init_params(cfg, jax.random.key(seed))
    memory = dict(params["lrt"])
    if "w_gate" in memory:
        memory["w_gate"] = 0.5 * jax.random.normal(jax.random.key(seed + 1), memory["w_gate"].shape)
    if "gamma" in memory:
        memory["gamma"] = jnp.linspace(0.3, 0.8, cfg.n_layers)
    return {**params, "lrt": memory}


def _tokens(b, n, seed=2):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (b, n), 0, V))
    tokens[0, n // 2] = RESET  # a document boundary inside row 0
    return jnp.asarray(tokens)


def _exact_merged_and_pass0(params, tokens, config):
    passes = lrt.parallel_passes(params, tokens, config)
    merged = lrt.parallel_logits(params, tokens, config)
    return lrt.forward(params, tokens, config), merged, passes[0][1]


@pytest.mark.parametrize(
    "changes",
    [
        dict(memory=dict(training="interleaved", passes=5)),
        dict(memory=dict(training="interleaved", passes=5, layer=0), position="alibi"),
        dict(memory=dict(training="refine", passes=4, kind="shared")),
    ],
    ids=["interleaved-S=N", "interleaved-S=N-layer0-alibi", "refine-K=N-1-shared"],
)
def test_parallel_passes_reproduce_exact_recurrence(changes):
    with jax.enable_x64(True):
        cfg = _cfg(compute_dtype="float64", **changes)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), _params(cfg))
        tokens = _tokens(2, 5)
        run = jax.jit(_exact_merged_and_pass0, static_argnames="config")
        exact, merged, pass0 = run(params, tokens, cfg)
        assert exact.dtype == jnp.float64
        np.testing.assert_allclose(merged, exact, atol=1e-10, rtol=1e-10)
        # The zero-memory pass differs after position 0: the memory pathway is not inert.
        np.testing.assert_allclose(pass0[:, 0], exact[:, 0], atol=1e-10)
        assert np.max(np.abs(pass0[:, 1:] - exact[:, 1:])) > 1e-3


def test_memory_is_zero_at_start_and_after_reset():
    cfg = _cfg()
    params = _params(cfg)
    tokens = _tokens(2, 8)
    keep = np.asarray(lrt.memory_keep(tokens, cfg))
    expected = np.zeros((2, 8), bool)
    expected[:, 1:] = np.asarray(tokens[:, :-1]) != RESET
    assert not keep[:, 0].any() and not keep[0, 5] and (keep == expected).all()
    # Position 0 (memory zero) gives the baseline Transformer's logits (gates at init).
    params = lm.init_params(cfg, jax.random.key(0))
    standard = _with_memory(cfg, kind="none")
    baseline = _forward({k: v for k, v in params.items() if k != "lrt"}, tokens, standard)
    exact = _forward(params, tokens, cfg)
    np.testing.assert_allclose(exact[:, 0], baseline[:, 0], atol=1e-5)
    assert np.max(np.abs(exact[:, 1:] - baseline[:, 1:])) > 1e-2
    # The carried memory: zero after the reset token, the source state otherwise.
    _, cache = prefill(params, [list(tokens[0, :5]), list(tokens[0, :3])], cfg, 8)
    assert np.all(np.asarray(cache.memory[0]) == 0.0)
    assert np.any(np.asarray(cache.memory[1]) != 0.0)


def _input_grads(fn, x):
    """d<fn(x)[:, t], c> / dx for every output position t."""
    per_t = jax.jit(lambda c: jax.vjp(fn, x)[1](c)[0])
    c = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, x).shape)
    n = c.shape[1]
    return [
        np.asarray(per_t(jnp.where((jnp.arange(n) == t)[None, :, None], c, 0.0))) for t in range(n)
    ]


def _check_causal(grads):
    for t, dx in enumerate(grads):
        assert np.all(dx[:, t + 1 :] == 0.0), f"output {t} depends on a later input"
        assert np.any(dx[:, t] != 0.0)
    assert any(np.any(grads[t][:, : t - 1] != 0.0) for t in range(2, len(grads)))


@pytest.mark.parametrize("training", ["interleaved", "refine"])
def test_exact_forward_and_training_passes_are_causal(training):
    cfg = _cfg(memory=dict(training=training, passes=2, layer=0))
    params = _params(cfg)
    tokens = _tokens(2, 6)
    x = lm.embed(params, tokens)
    if training == "interleaved":
        _check_causal(_input_grads(lambda x: lrt.forward_embedded(params, x, tokens, cfg), x))

    def every_pass(x):  # each pass's logits at their own positions, stacked on the vocab axis
        out = []
        for sub, logits in lrt.parallel_passes_embedded(params, x, tokens, cfg):
            out.append(jnp.zeros(x.shape[:2] + logits.shape[-1:]).at[:, sub].set(logits))
        return jnp.concatenate(out, axis=-1)

    _check_causal(_input_grads(every_pass, x))


@pytest.mark.parametrize(
    "memory, injection, formula",
    [
        ("shared", "both", lambda L, D, G, C: L + L * D * 2 * G + D * 2 * C),
        ("layerwise", "both", lambda L, D, G, C: L + L * D * 2 * G + L * D * 2 * C),
        ("shared", "kv", lambda L, D, G, C: L * D * 2 * G + D * 2 * C),
        ("layerwise", "kv", lambda L, D, G, C: L * D * 2 * G + L * D * 2 * C),
        ("layerwise", "residual", lambda L, D, G, C: L),
    ],
)
def test_parameter_counts(memory, injection, formula):
    cfg = _cfg(memory=dict(kind=memory, injection=injection))
    extra = formula(cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.n_kv_heads * cfg.head_dim)
    assert lrt.extra_params(cfg) == extra
    plain = _with_memory(cfg, kind="none")
    assert cfg.non_embedding_params() == plain.non_embedding_params() + extra
    params = lm.init_params(cfg, jax.random.key(0))
    assert sum(a.size for a in jax.tree.leaves(params)) == cfg.total_params()
    # The baseline weights are the Transformer's of the same seed; sharding rules cover all.
    base = lm.init_params(plain, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, {k: params[k] for k in base}, base)
    shd.param_shardings(jax.eval_shape(lambda: params), make_mesh(MeshConfig(2, 2, 2)))


@pytest.mark.parametrize("memory", ["shared", "layerwise"])
@pytest.mark.parametrize("injection", ["both", "kv", "residual"])
@pytest.mark.parametrize("position", ["alibi", "rope"])
def test_zero_memory_at_init_is_the_transformer_layer(memory, injection, position):
    cfg = _cfg(memory=dict(kind=memory, injection=injection), position=position)
    params = lm.init_params(cfg, jax.random.key(1))
    spec = cfg.attention_spec()
    layer = {k: v[1] for k, v in params["blocks"].items()}
    for name, value in params["lrt"].items():
        layer["w_kvmem" if name == "w_kvmem_shared" else name] = (
            value if name == "w_kvmem_shared" else value[1]
        )
    x = jax.random.normal(jax.random.key(2), (2, 7, cfg.d_model))
    zero = jnp.zeros_like(x)
    np.testing.assert_array_equal(
        lrt.lrt_layer(layer, x, zero, spec), transformer_layer(layer, x, spec)
    )
    pos = jnp.arange(7)
    kv_mem = lrt.memory_kv(layer["w_kvmem"], zero, spec) if "w_kvmem" in layer else None
    for ours, base in zip(
        lrt.lrt_qkv(layer, x, kv_mem, pos, spec), pre_attention(layer, x, pos, spec), strict=True
    ):
        np.testing.assert_array_equal(ours, base)
    mem = jax.random.normal(jax.random.key(3), x.shape)
    assert (
        np.max(np.abs(lrt.lrt_layer(layer, x, mem, spec) - transformer_layer(layer, x, spec)))
        > 1e-3
    )


def test_decoding_equals_exact_forward_at_every_position():
    cfg = _cfg(memory=dict(kind="shared", layer=0))
    params = _params(cfg)
    full = np.array(_tokens(3, 12, seed=5))
    full[1, 6] = RESET  # a reset inside row 1's decoded part
    lengths = [3, 6, 1]
    exact = np.asarray(_forward(params, jnp.asarray(full), cfg))
    logits, cache = prefill(params, [full[b, :n] for b, n in enumerate(lengths)], cfg, 12)
    rows = np.arange(3)
    np.testing.assert_allclose(logits, exact[rows, np.asarray(lengths) - 1], atol=2e-5)
    for i in range(6):
        pos = np.asarray(lengths) + i
        logits, cache = decode_step(params, cache, full[rows, pos], cfg)
        np.testing.assert_allclose(logits, exact[rows, pos], atol=2e-5, err_msg=f"step {i}")
    # rt_jax.generate (greedy) continues with the exact model's argmax.
    model = lm.LanguageModel(cfg, params=params)
    out = rt_jax.generate(model, full[:, :4], max_new_tokens=3)
    seq = np.concatenate([full[:, :4], out.tokens], axis=1)
    best = np.argmax(np.asarray(_forward(params, jnp.asarray(seq), cfg))[:, 3:6, :V], axis=-1)
    np.testing.assert_array_equal(best, out.tokens)


def _train_cfg(memory: dict):
    return TrainConfig(
        model=_cfg(vocab_size=257, embedding_size=264, memory={"reset_token": 256, **memory}),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=4, batch_size=4),
        steps=2,
        lr=3e-3,
        log_every=1,
        eval_points=0,
        eval_batches=1,
    )


def _loss_and_pass_means(params, inputs, targets, config):
    ce_sum, _ = lrt.loss_sums(params, inputs, targets, config)
    means = [
        lm.cross_entropy_sums(logits, targets[:, sub], config.vocab_size)[0] / logits[..., 0].size
        for sub, logits in lrt.parallel_passes(params, inputs, config)
    ]
    return ce_sum, jnp.stack(means)


def test_train_step_and_eval_sums():
    """The sharded step (data=2, fsdp=2, tensor=2) trains on the mean over passes of each pass's
    mean CE; every memory parameter moves; eval reports the exact and the parallel CE."""
    cfg = _train_cfg(memory=dict(kind="layerwise", passes=2))
    batches = [np.random.default_rng(i).integers(0, 257, (4, 5)).astype(np.int32) for i in (0, 1)]
    ts = build_train_step(cfg, make_mesh(MeshConfig(2, 2, 2)))
    state = ts.init()
    init = jax.device_get(state["params"])
    losses = []
    for tokens in batches:
        batch = {"tokens": jax.device_put(tokens, ts.batch_sharding["tokens"])}
        state, metrics = ts.step(state, batch)
        losses.append(float(metrics["loss"]))
    evals = jax.device_get(ts.eval_step(state["params"], batch))
    assert set(evals) == {"ce_sum", "ce_sum_parallel", "tokens"} | {
        f"ce_sum_pass{i}" for i in range(3)
    }
    assert np.isfinite(evals["ce_sum"]) and evals["ce_sum"] > 0
    assert np.isfinite(evals["ce_sum_parallel"]) and evals["ce_sum_parallel"] != evals["ce_sum"]
    trained = jax.device_get(state["params"])
    for name, value in trained["lrt"].items():
        assert np.any(value != init["lrt"][name]), f"{name} got no update"
    inputs, targets = batches[0][:, :-1], batches[0][:, 1:]
    ce_sum, means = jax.jit(_loss_and_pass_means, static_argnames="config")(
        init, inputs, targets, cfg.model
    )
    assert means.shape == (3,)  # pass 0 and S = 2 subsets
    np.testing.assert_allclose(ce_sum, np.mean(means) * inputs.size, rtol=1e-6)
    np.testing.assert_allclose(losses[0], np.mean(means), rtol=1e-5)


def test_flops_count_every_pass():
    cfg = _cfg(memory=dict(kind="shared"))
    plain = _with_memory(cfg, kind="none")
    forward = flops.forward_flops_per_token(cfg, 8)
    assert (
        forward - flops.forward_flops_per_token(plain, 8)
        == lrt.extra_forward_flops_per_token(cfg, 8)
        > 0
    )
    assert flops.train_flops_per_token(cfg, 8) == 2 * 3 * forward
    refine = _with_memory(cfg, training="refine", passes=3)
    assert flops.train_flops_per_token(refine, 8) == 4 * 3 * forward
    layerwise = _with_memory(cfg, kind="layerwise")
    assert lrt.extra_forward_flops_per_token(layerwise, 8) > lrt.extra_forward_flops_per_token(
        cfg, 8
    )
    assert lrt.extra_forward_flops_per_token(_with_memory(cfg, injection="residual"), 8) == 0


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(block_type="recurrent"), "Transformer block only"),
        (dict(memory=dict(layer=2)), "memory.layer=2"),
        (dict(memory=dict(layer=-2)), "memory.layer=-2"),
        (dict(memory=dict(passes=0)), "memory.passes=0"),
        (dict(memory=dict(reset_token=V)), "memory.reset_token"),
        (dict(memory=dict(kind="both")), "memory.kind='both'"),
        (dict(memory=dict(injection="gate")), "memory.injection"),
    ],
)
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**changes)


def test_seq_len_not_divisible_by_subsets_raises():
    cfg = _cfg(memory=dict(passes=3))
    params = lm.init_params(cfg, jax.random.key(0))
    tokens = _tokens(1, 8)
    with pytest.raises(ValueError, match="seq_len=8 is not divisible"):
        lm.loss_sums(params, tokens, tokens, cfg)
    with pytest.raises(ValueError, match="seq_len=8 is not divisible"):
        flops.train_flops_per_token(cfg, 8)
