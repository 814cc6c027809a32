"""Recursive (looped) models and MeSH: layout checks, sharing, hand-offs, decoding, counts, probe."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rt_jax
from rt_jax.config import LoopConfig, ModelConfig, parse_layout
from rt_jax.decoding import decode_step, prefill
from rt_jax.models import lm, recursive
from rt_jax.train.sharding import logical_axes, path_name

VOCAB, N = 40, 8
LOOP = "1+2R2+1"
SMALL_LOOP, SMALL_UNROLLED = "1+1R2+1", [0, 1, 1, 2]  # cheaper to compile
# Tiny programs: a low XLA backend optimisation level halves compile time on this CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
HANDOFFS = ("base", "residual", "anchor", "anchor-emb", "mesh")


def _config(
    handoff: str, block_type: str = "transformer", loop: str = LOOP, mesh_slots=None, **kw
) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        embedding_size=48,
        d_model=16,
        n_heads=2,
        n_layers=4,
        mlp_hidden=24,
        block_type=block_type,
        impl="reference",
        position="alibi",
        loop=LoopConfig(loop, handoff, mesh_slots),
        embed_scale=handoff in ("anchor-emb", "mesh"),
    )
    fields.update(kw)
    return ModelConfig(**fields)


def _tokens(seed: int = 0, batch: int = 2, n: int = N) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, n)))


def _softmax(x):
    return jax.nn.softmax(x, axis=-1)


def _unrolled_hidden(params, x_emb, cfg: ModelConfig, order: list[int]):
    """The recursive model written out by hand over an explicitly unrolled, non-shared stack.

    The unrolled blocks are copies of the stored ones (``order``: 1 prelude layer, a core of c
    layers twice, 1 coda layer), run one plain layer at a time; hand-offs and MeSH routing are
    re-derived here from the paper's equations.
    """
    blocks = params["blocks"]
    unrolled = [jax.tree.map(lambda a, i=i: jnp.array(a[i]), blocks) for i in order]
    c = (len(order) - 2) // 2
    layer = lm.layer_function(cfg)
    spec = cfg.attention_spec()
    e = x_emb
    h = layer(unrolled[0], e, spec)  # prelude
    if cfg.loop.handoff == "mesh":
        r = params["routers"]
        slots = [e] + [jnp.zeros_like(e)] * (recursive.n_slots(cfg) - 1)

        def cycle(t, h_in, value):
            ww = _softmax(h_in @ r["w_write"][t] + r["b_write"][t])
            wr = _softmax(h_in @ r["w_read"][t] + r["b_read"][t])
            for s in range(len(slots)):
                slots[s] = slots[s] + ww[..., s : s + 1] * value
            return sum(wr[..., s : s + 1] * slots[s] for s in range(len(slots)))

        h = cycle(0, h, h)
    h0 = h
    for t in range(2):  # Nloop = 2 iterations of the core
        out = h
        for layer_params in unrolled[1 + c * t : 1 + c * (t + 1)]:
            out = layer(layer_params, out, spec)
        if cfg.loop.handoff == "base":
            h = out
        elif cfg.loop.handoff == "residual":
            h = out + h
        elif cfg.loop.handoff == "anchor":
            h = out + h0
        elif cfg.loop.handoff == "anchor-emb":
            h = out + e
        else:
            h = cycle(t + 1, h, out)
    return layer(unrolled[-1], h, spec)  # coda


CASES = [("transformer", h) for h in HANDOFFS] + [("recurrent", "mesh")]


@pytest.mark.parametrize("block_type, handoff", CASES)
def test_equals_unrolled_copies_and_is_causal(block_type, handoff):
    """Each hand-off equals the hand-written model over explicitly unrolled copies of the stored
    layers (so the core really is shared), and the output at t has zero gradient with respect to
    the inputs after t (and a nonzero one with respect to inputs up to t)."""
    cfg = _config(handoff, block_type, loop=SMALL_LOOP, n_layers=3)
    params = lm.init_params(cfg, jax.random.PRNGKey(3))
    x = recursive.embed_inputs(params, _tokens(1, batch=1), cfg)
    x_rows = jnp.broadcast_to(x, (N, N, x.shape[-1]))  # row t: the cotangent sits at output t
    segment = recursive.forward_segment(cfg)

    copies = jax.tree.map(lambda a: a[np.array(SMALL_UNROLLED)], params["blocks"])
    flat = {**params, "blocks": copies}
    plain = dataclasses.replace(  # a standard model of the copies
        cfg, loop=LoopConfig(), n_layers=4, embed_scale=False
    )

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, x_rows):
        def hidden(x1):
            return recursive.recursive_hidden(params, x1, cfg, segment)[0]

        h, pullback = jax.vjp(hidden, x_rows)
        (grad,) = pullback(jnp.eye(N)[:, :, None] * jnp.ones_like(h))
        standard = lm.run_blocks(flat, x_rows, plain) if handoff == "base" else h
        return h, _unrolled_hidden(params, x_rows, cfg, SMALL_UNROLLED), grad, standard

    got, want, grad, standard = run(params, x_rows)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, standard, rtol=2e-5, atol=2e-5)
    dep = np.abs(np.asarray(grad)).sum(-1)  # [t, s]: dependence of output t on input s
    assert np.all(dep[np.triu_indices(N, 1)] == 0.0)
    assert np.all(dep[np.tril_indices(N)] > 0.0)


def test_router_weights_are_distributions_per_token():
    cfg = _config("mesh", mesh_slots=4)
    params = lm.init_params(cfg, jax.random.PRNGKey(1))
    forward = jax.jit(
        recursive.forward_hidden,
        static_argnums=2,
        static_argnames="trace",
        compiler_options=FAST_COMPILE,
    )
    _, trace = forward(params, _tokens(3), cfg, trace=True)
    for w in (trace.write, trace.read):
        assert w.shape == (3, 2, N, 4)  # (Nloop + 1 pairs, B, N, S)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
        assert np.all(w > 0)
    assert trace.states.shape == (3, 2, N, 16) and trace.core_outputs.shape == (2, 2, N, 16)


def _one_hot_routers(params, cfg, choices):
    """Routers whose softmax is exactly one-hot: zero weights, bias 1e4 on the chosen slot.

    ``choices``: per pair (transitional first) the (write slot, read slot)."""
    s = recursive.n_slots(cfg)
    big = lambda slots: 1e4 * jax.nn.one_hot(jnp.array(slots), s)  # noqa: E731
    routers = {
        "w_write": jnp.zeros_like(params["routers"]["w_write"]),
        "w_read": jnp.zeros_like(params["routers"]["w_read"]),
        "b_write": big([w for w, _ in choices]),
        "b_read": big([r for _, r in choices]),
    }
    return {**params, "routers": routers}


@pytest.mark.parametrize(
    "target, loop, choices",
    [
        # residual, any Nloop: write and read slot 1 at every pair; slot 1 accumulates
        # f_pre(e) + f(h^(0)) + ... = h^(t) + f(h^(t)).
        ("residual", "1+2R2+1", [(1, 1), (1, 1), (1, 1)]),
        # anchor-emb: slot 1 hands f_pre(e) over as h^(0); step 0 writes f(h^(0)) into slot 0
        # (which holds e) and reads it. Only Nloop = 1 works (see docs/mesh.md).
        ("anchor-emb", "1+2R1+1", [(1, 1), (0, 0)]),
    ],
)
def test_one_hot_mesh_reproduces_handoff(target, loop, choices):
    n_layers = parse_layout(loop).distinct_layers
    cfg = _config("mesh", loop=loop, n_layers=n_layers, embed_scale=True)
    params = _one_hot_routers(lm.init_params(cfg, jax.random.PRNGKey(4)), cfg, choices)
    tokens = _tokens(5)
    forward = jax.jit(recursive.forward, static_argnums=2, compiler_options=FAST_COMPILE)
    got = forward(params, tokens, cfg)
    plain = {k: v for k, v in params.items() if k != "routers"}
    want = forward(
        plain, tokens, dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, handoff=target))
    )
    np.testing.assert_array_equal(got, want)


def _teacher_forced(params, tokens, lengths, cfg, size):
    logits, cache = prefill(params, [tokens[b, :n] for b, n in enumerate(lengths)], cfg, size)
    out = [np.asarray(logits)]
    for step in range(size - max(lengths)):
        feed = tokens[np.arange(len(lengths)), np.array(lengths) + step]
        logits, cache = decode_step(params, cache, feed, cfg)
        out.append(np.asarray(logits))
    assert cache.k.shape[0] == 6 == cfg.cache_layers  # one cache per unrolled layer
    return np.stack(out, axis=1)


@pytest.mark.parametrize(
    "block_type, handoff",
    [("transformer", "anchor"), ("recurrent", "mesh")],
)
def test_cached_decoding_equals_forward(block_type, handoff):
    """Ragged prompts (1 and 5 tokens) then teacher-forced decode steps: every position's logits
    equal the full forward's."""
    cfg = _config(handoff, block_type, position="rope")
    params = lm.init_params(cfg, jax.random.PRNGKey(6))
    tokens = np.asarray(_tokens(7, n=10))
    full = np.asarray(recursive.forward(params, jnp.asarray(tokens), cfg))
    lengths = [1, 5]
    got = _teacher_forced(params, tokens, lengths, cfg, 10)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b], full[b, n - 1 : n + 10 - 5], rtol=1e-5, atol=2e-5)


def test_generate_runs_for_mesh():
    model = rt_jax.LanguageModel(_config("mesh"), rngs=nnx.Rngs(0))
    out = rt_jax.generate(model, [[1, 2, 3], [4]], max_new_tokens=3)
    assert out.tokens.shape == (2, 3) and np.all((out.tokens >= 0) & (out.tokens < VOCAB))


def test_layout_validation_and_depth():
    cfg = _config("mesh")
    assert recursive.compute_depth(cfg) == cfg.cache_layers == 6
    assert recursive.n_slots(cfg) == 5
    assert parse_layout("4+8R2+4").unrolled_layers() == (
        (0, 1, 2, 3) + tuple(range(4, 12)) * 2 + (12, 13, 14, 15)
    )
    for bad in ("2+4x2+2", "2+4R2", "2+0R2+2", "2+4R0+2", "a+4R2+2"):
        with pytest.raises(ValueError, match="2\\+4R2\\+2"):
            _config("base", loop=bad)
    with pytest.raises(ValueError, match="n_layers=4"):
        _config("base", n_layers=5)
    with pytest.raises(ValueError, match="mesh_slots"):
        _config("mesh", mesh_slots=1)
    # Other hand-offs ignore mesh_slots (so one --set sweeps a whole comparison's buffer length).
    assert _config("anchor", mesh_slots=4).loop.extra_params(_config("anchor")) == 0


def test_init_is_depth_aware_and_routers_as_documented():
    cfg = _config("mesh", d_model=64, n_heads=4, mlp_hidden=128)
    params = lm.init_params(cfg, jax.random.PRNGKey(0))
    for name, fan_in in (("w_o", 64), ("w_ff_out", 128)):
        std = 1.0 / np.sqrt(2 * fan_in * 6)  # compute depth 6, the same for every stored layer
        w = np.asarray(params["blocks"][name])
        assert np.abs(w).max() <= 3 * std * (1 + 1e-6)
        np.testing.assert_allclose(w.reshape(4, -1).std(axis=1), std * 0.986, rtol=0.1)
    r = params["routers"]
    assert r["w_write"].shape == r["w_read"].shape == (3, 64, 5)
    assert not np.any(r["b_write"]) and not np.any(r["b_read"])
    np.testing.assert_allclose(np.std(r["w_write"]), np.sqrt(2 / (5 * 64)) * 0.986, rtol=0.1)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        logical_axes(path_name(path), leaf.ndim)  # a sharding rule matches every parameter


def test_router_count_and_config_params():
    cfg = ModelConfig(
        vocab_size=50257,
        d_model=2048,
        n_heads=16,
        n_layers=16,
        loop=LoopConfig("4+8R2+4", handoff="mesh"),
    )
    assert recursive.extra_params(cfg) == 61_470
    shapes = jax.eval_shape(lambda: lm.init_params(cfg, jax.random.PRNGKey(0)))
    assert sum(x.size for x in jax.tree.leaves(shapes["routers"])) == 61_470
    plain = dataclasses.replace(cfg, loop=LoopConfig("4+8R2+4"))
    assert cfg.non_embedding_params() - plain.non_embedding_params() == 61_470
    assert recursive.extra_params(plain) == 0


def test_mesh_probe_on_untrained_tiny_models(tmp_path):
    from experiments import mesh_probe

    batches = [np.asarray(_tokens(s, n=N + 1)) for s in range(2)]
    results = {}
    for handoff in ("base", "mesh"):
        cfg = _config(handoff)
        params = lm.init_params(cfg, jax.random.PRNGKey(0))
        row = mesh_probe.probe_model(params, cfg, batches)
        results[f"recursive-{handoff}"] = {"trained": [row], "untrained": [row]}
    base = results["recursive-base"]["trained"][0]
    assert len(base["relative_update"]) == len(base["block_norm"]) == 6  # 1 + 2*2 + 1 blocks
    assert all(0 <= u <= 2 for u in base["relative_update"])
    cka = np.array(base["cka"])
    assert cka.shape == (3, 3) and np.allclose(np.diag(cka), 1) and np.all(cka <= 1 + 1e-9)
    np.testing.assert_allclose(cka, cka.T)
    spec = np.array(base["spectrum"])
    assert spec.shape == (3, 16) and np.allclose(spec[:, 0], 1) and np.all(np.diff(spec) <= 1e-12)
    mesh = results["recursive-mesh"]["trained"][0]
    assert np.array(mesh["write_mass"]).shape == np.array(mesh["read_mass"]).shape == (3, 5)
    np.testing.assert_allclose(np.array(mesh["read_mass"]).sum(-1), 1.0, rtol=1e-5)
    assert all(0 <= e <= np.log(5) + 1e-6 for e in mesh["read_entropy"] + mesh["write_entropy"])
    # The first block's relative update equals the definition on the states computed by hand.
    x = recursive.embed_inputs(params, jnp.asarray(batches[0][:, :-1]), cfg)
    z = lm.layer_function(cfg)(
        jax.tree.map(lambda a: a[0], params["blocks"]), x, cfg.attention_spec()
    )
    fro = lambda a: np.sqrt((np.asarray(a) ** 2).sum((-2, -1)))  # noqa: E731
    rel0 = 2 * fro(z - x) / (fro(z) + fro(x))
    x1 = recursive.embed_inputs(params, jnp.asarray(batches[1][:, :-1]), cfg)
    z1 = lm.layer_function(cfg)(
        jax.tree.map(lambda a: a[0], params["blocks"]), x1, cfg.attention_spec()
    )
    rel1 = 2 * fro(z1 - x1) / (fro(z1) + fro(x1))
    np.testing.assert_allclose(
        mesh["relative_update"][0], (rel0.mean() + rel1.mean()) / 2, rtol=1e-4
    )
    meta = {"command": "test", "commit": "x", "machine": "m", "preset": "p", "batches": 2}
    payload = mesh_probe.write_outputs(results, tmp_path, {**meta, "train_steps": 0, "seeds": [0]})
    assert json.loads((tmp_path / "mesh_probe.json").read_text())["variants"].keys() == {
        "recursive-base",
        "recursive-mesh",
    }
    assert (tmp_path / "mesh_probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| recursive-mesh | untrained | 0 |" in (tmp_path / "mesh_probe.md").read_text()
    assert payload["variants"]["recursive-mesh"]["trained"]["read_mass"] == mesh["read_mass"]
