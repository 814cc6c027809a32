"""Recursive models and MeSH against an independent numpy oracle (issue 15).

The oracle below is written from docs/mesh.md and the paper (Eqs. 1-6), in float64 numpy, with its
own embedding, OLMo and GPT-NeoX blocks (rotary on the first fraction of each head), buffer and
routers. It reads the parameter pytree by name (the documented storage: stacked blocks in prelude,
core, coda order; ``routers/*`` index 0 the transitional pair; ``alphas/*``) and calls nothing in
``rt_jax.models.recursive``. Parameters are perturbed away from their init (biases, norms and
alphas non-trivial) so a mis-wired bias or coefficient shows. Also: router gradients, a short MeSH
training run, the bf16 forward, and the Table 1 / Table 5 parameter counts of the NeoX models.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import erf

from rt_jax.config import LoopConfig, ModelConfig
from rt_jax.decoding import decode_step, prefill
from rt_jax.models import lm
from rt_jax.models.recursive import model_param_counts, pythia_config
from rt_jax.train.config import apply_overrides, get_preset, with_point

VOCAB, N, D, HEADS = 24, 7, 16, 2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------------------------
# The oracle (float64 numpy).


def _ln(x, w, b=None, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def _rope(x_NxHxK, r, theta=10_000.0):
    """Rotate-half RoPE on the first r dims of each head; the rest pass through."""
    half = r // 2
    pos = np.arange(x_NxHxK.shape[0])[:, None, None]
    freq = theta ** (-np.arange(half) / half)
    cos, sin = np.cos(pos * freq), np.sin(pos * freq)
    a, b, rest = x_NxHxK[..., :half], x_NxHxK[..., half:r], x_NxHxK[..., r:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin, rest], -1)


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _attention(q, k, v):
    """Causal softmax attention of one sequence, q k v: N x H x K (q unscaled)."""
    n, _, kd = q.shape
    s = np.einsum("thk,shk->hts", q, k) / math.sqrt(kd)
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shk->thk", p, v).reshape(n, -1)


def _block(w, x, style, rotary):
    """One Transformer layer on x (N x D): OLMo (pre-norm, QK-norm) or NeoX (parallel, biases)."""
    n, d = x.shape
    kd = d // HEADS
    if style == "neox":
        h = _ln(x, w["attn_norm"], w["attn_norm_bias"])
        q = h @ w["w_q"] + w["b_q"]
        kv = h @ w["w_kv"] + w["b_kv"]
        k, v = kv[:, :d], kv[:, d:]
    else:
        h = _ln(x, w["attn_norm"])
        q = _ln(h @ w["w_q"], w["q_norm"])
        kv = h @ w["w_kv"]
        k, v = _ln(kv[:, :d], w["k_norm"]), kv[:, d:]
    q, k, v = (a.reshape(n, HEADS, kd) for a in (q, k, v))
    att = _attention(_rope(q, rotary), _rope(k, rotary), v)
    if style == "neox":
        mlp = _gelu(_ln(x, w["ff_norm"], w["ff_norm_bias"]) @ w["w_ff_in"] + w["b_ff_in"])
        return x + att @ w["w_o"] + w["b_o"] + mlp @ w["w_ff_out"] + w["b_ff_out"]
    x1 = x + att @ w["w_o"]
    return x1 + _gelu(_ln(x1, w["ff_norm"]) @ w["w_ff_in"]) @ w["w_ff_out"]


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def oracle_logits(p, tokens_N, spec):
    """Logits (N, E) of one sequence. ``spec``: layout (pre, core, n_loop, coda) or None, handoff,
    slots, alpha, tied, style, rotary dims, embed_scale."""
    blocks = [{k: v[i] for k, v in p["blocks"].items()} for i in range(len(p["blocks"]["w_q"]))]
    run = lambda layers, h: functools.reduce(  # noqa: E731
        lambda a, w: _block(w, a, spec["style"], spec["rotary"]), layers, h
    )
    e = p["embed"][tokens_N] * (math.sqrt(D) if spec["embed_scale"] else 1.0)
    if spec["layout"] is None:
        h = run(blocks, e)
    else:
        pre, core, n_loop, coda = spec["layout"]
        h = run(blocks[:pre], e)
        stored_core = core if spec["tied"] else n_loop * core
        handoff = spec["handoff"]
        if handoff == "mesh":
            r = p["routers"]
            buffer = np.zeros((spec["slots"], *e.shape))
            buffer[0] = e
            ww, wr = (_softmax(h @ r[f"w_{n}"][0] + r[f"b_{n}"][0]) for n in ("write", "read"))
            buffer = buffer + ww.T[..., None] * h
            h = (wr.T[..., None] * buffer).sum(0)
        h0 = h
        for t in range(n_loop):
            first = pre + (0 if spec["tied"] else t * core)
            out = run(blocks[first : first + core], h)
            if handoff == "mesh":
                ww, wr = (
                    _softmax(h @ r[f"w_{n}"][t + 1] + r[f"b_{n}"][t + 1]) for n in ("write", "read")
                )
                buffer = buffer + ww.T[..., None] * out  # additive write of f(h^(t)) (Eq. 4)
                h = (wr.T[..., None] * buffer).sum(0)  # read from the updated buffer (Eq. 5)
                continue
            terms = {"residual": h, "anchor": h0, "anchor-emb": e}
            names = [] if handoff == "base" else handoff.split("+")
            n_c = len(names) + 1
            if spec["alpha"] == "fixed":
                c = np.ones((len(h), n_c))
            elif spec["alpha"] == "static":
                c = np.broadcast_to(p["alphas"]["scale"][t], (len(h), n_c))
            else:  # per token, from the step input h^(t)
                c = h @ p["alphas"]["w"][t] + p["alphas"]["b"][t]
            new = c[:, :1] * out
            for i, name in enumerate(names, start=1):
                new = new + c[:, i : i + 1] * terms[name]
            h = new
        h = run(blocks[pre + stored_core : pre + stored_core + coda], h)
    h = _ln(h, p["ln_f"], p.get("ln_f_bias"))
    return h @ p["head"]


# --------------------------------------------------------------------------------------------
# The models under test.


CASES = {
    # name: (layout, handoff, slots, alpha, tied, style)
    "neox-0+2R3+0-mesh-S4": ("0+2R3+0", "mesh", 4, "fixed", True, "neox"),
    "neox-0+1R3+0-mesh-S4": ("0+1R3+0", "mesh", 4, "fixed", True, "neox"),
    "olmo-1+1R3+0-mesh-S3": ("1+1R3+0", "mesh", 3, "fixed", True, "olmo"),
    "olmo-0+1R3+1-mesh": ("0+1R3+1", "mesh", None, "fixed", True, "olmo"),
    "neox-1+1R2+0-mesh-untied": ("1+1R2+0", "mesh", 4, "fixed", False, "neox"),
    "neox-1+1R2+1-dynamic": ("1+1R2+1", "anchor+anchor-emb", None, "dynamic", True, "neox"),
    "olmo-1+1R2+1-static": ("1+1R2+1", "residual+anchor", None, "static", True, "olmo"),
    "neox-vanilla-2L": ("", "base", None, "fixed", True, "neox"),
}


def _model(name: str, **kw) -> tuple[ModelConfig, dict]:
    layout, handoff, slots, alpha, tied, style = CASES[name]
    loop = LoopConfig(layout, handoff, slots, alpha, tied) if layout else LoopConfig()
    n_layers = loop.parsed().distinct_layers if layout else 2
    fields = dict(
        vocab_size=VOCAB,
        d_model=D,
        n_heads=HEADS,
        n_layers=n_layers,
        mlp_hidden=24,
        block_type="transformer",
        block_style=style,
        position="rope",
        rotary_pct=0.5 if style == "neox" else 1.0,
        embed_scale=True,
        loop=loop,
    )
    fields.update(kw)
    cfg = ModelConfig(**fields)
    spec = dict(
        layout=tuple(int(g) for g in re.findall(r"\d+", layout)) if layout else None,
        handoff=handoff,
        slots=slots
        if slots is not None
        else (int(re.findall(r"\d+", layout)[2]) + 3 if layout else 0),
        alpha=alpha,
        tied=tied,
        style=style,
        rotary=int((D // HEADS) * fields["rotary_pct"]),
        embed_scale=True,
    )
    return cfg, spec


def _perturbed_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Init, then noise on every leaf (scale 0.3 on vectors and alphas): no zero biases, no unit
    norms, static alphas != 1, dynamic alpha weights != 0."""
    params = lm.init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    out = []
    for leaf in leaves:
        leaf = np.asarray(leaf, np.float64)
        vector_like = leaf.ndim <= 2 and min(leaf.shape) < D or leaf.ndim == 1
        scale = 0.3 if vector_like else 0.1 * (np.std(leaf) or 1.0)
        out.append(np.asarray(leaf + scale * rng.standard_normal(leaf.shape), np.float32))
    return jax.tree.unflatten(tree, out)


def _tokens(seed: int = 0, batch: int = 2, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, n))


def _oracle(params, tokens, spec):
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    return np.stack([oracle_logits(p64, row, spec) for row in tokens])


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_oracle(name):
    cfg, spec = _model(name)
    params = _perturbed_params(cfg)
    tokens = _tokens()
    fwd = jax.jit(lm.forward, static_argnums=2).lower(params, tokens, cfg).compile(FAST_COMPILE)
    got = np.asarray(fwd(params, tokens))
    want = _oracle(params, tokens, spec)
    np.testing.assert_allclose(got[..., :VOCAB], want[..., :VOCAB], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["neox-0+1R3+0-mesh-S4", "olmo-1+1R3+0-mesh-S3"])
def test_cached_decoding_matches_oracle(name):
    """Prefill 3 tokens, then decode the rest one by one: every logit vector equals the oracle's
    full-sequence logits at that position."""
    cfg, spec = _model(name)
    params = _perturbed_params(cfg, seed=2)
    tokens = _tokens(3)
    want = _oracle(params, tokens, spec)
    logits, cache = prefill(params, tokens[:, :3], cfg, N)
    got = [np.asarray(logits)]
    for t in range(3, N - 1):
        logits, cache = decode_step(params, cache, tokens[:, t], cfg)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), want[:, 2 : N - 1], rtol=2e-4, atol=2e-4)


def test_oracle_tells_a_wrong_router_from_a_right_one():
    """The oracle is sensitive to the wiring: swapping the read routers of two loop steps, or
    reading before writing, changes the logits far beyond the tolerance above."""
    cfg, spec = _model("neox-0+2R3+0-mesh-S4")
    params = _perturbed_params(cfg)
    tokens = _tokens()[:1]
    right = _oracle(params, tokens, spec)
    swapped = jax.tree.map(lambda a: a, params)
    swapped["routers"] = dict(params["routers"])
    swapped["routers"]["w_read"] = params["routers"]["w_read"][np.array([0, 2, 1, 3])]
    assert np.abs(_oracle(swapped, tokens, spec) - right).max() > 1e-2
    one_slot_less = dict(spec, slots=3)
    cut = dict(params)
    cut["routers"] = {k: v[..., :3] for k, v in params["routers"].items()}
    assert np.abs(_oracle(cut, tokens, one_slot_less) - right).max() > 1e-2


# --------------------------------------------------------------------------------------------
# Gradients, training, bf16.


def _mean_ce(params, tokens, cfg):
    ce, _ = lm.loss_sums(params, tokens[:, :-1], tokens[:, 1:], cfg)
    return ce / tokens[:, 1:].size


def test_router_gradients_nonzero_and_distinct_per_iteration():
    cfg, _ = _model("neox-0+1R3+0-mesh-S4")
    params = lm.init_params(cfg, jax.random.PRNGKey(0))  # the real init: zero router biases
    grads = jax.grad(_mean_ce)(params, jnp.asarray(_tokens(4, n=N + 1)), cfg)["routers"]
    for name, g in grads.items():
        g = np.asarray(g).reshape(g.shape[0], -1)  # (Nloop + 1 pairs, ...)
        norms = np.linalg.norm(g, axis=1)
        assert np.all(norms > 1e-6 * max(1.0, norms.max())), (name, norms)
        for i in range(len(g)):
            for j in range(i):
                assert not np.allclose(g[i], g[j], rtol=1e-3, atol=1e-8), (name, i, j)


def test_mesh_training_loss_drops_below_bound():
    """60 Adam steps on a fixed random successor map (token -> perm[token]) from ln(24) = 3.18:
    the MeSH model (0+1R3+0, S = 4, NeoX) must get below 0.5 nats."""
    cfg, _ = _model("neox-0+1R3+0-mesh-S4")
    perm = np.random.default_rng(7).permutation(VOCAB)
    rng = np.random.default_rng(8)
    start = rng.integers(0, VOCAB, (64,))
    seqs = [start]
    for _ in range(16):
        seqs.append(perm[seqs[-1]])
    data = jnp.asarray(np.stack(seqs, 1))  # 64 x 17
    params = lm.init_params(cfg, jax.random.PRNGKey(0))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, g = jax.value_and_grad(_mean_ce)(params, batch, cfg)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(60):
        batch = data[(i % 4) * 16 : (i % 4 + 1) * 16]
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    assert losses[0] > 2.5 and min(losses[-5:]) < 0.5, losses[::10]


def test_bf16_forward_is_finite_and_near_float32():
    cfg, _ = _model("neox-0+1R3+0-mesh-S4")
    cfg16, _ = _model("neox-0+1R3+0-mesh-S4", compute_dtype="bfloat16")
    params = lm.init_params(cfg, jax.random.PRNGKey(0))
    tokens = _tokens()
    f32 = np.asarray(lm.forward(params, tokens, cfg))
    bf16 = np.asarray(lm.forward(params, tokens, cfg16))
    assert np.all(np.isfinite(bf16))
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


# --------------------------------------------------------------------------------------------
# Paper shapes: NeoX counts from the model's own leaves.

# Pythia's published counts (Biderman et al. 2023, the suite's README): total / non-embedding.
PYTHIA = {
    "160m": (162_322_944, 85_056_000),
    "410m": (405_334_016, 302_311_424),
    "1b": (1_011_781_632, 805_736_448),
    "1.4b": (1_414_647_808, 1_208_602_624),
}


def test_neox_models_reproduce_pythia_and_mesh_paper_counts():
    for size, (total, non_emb) in PYTHIA.items():
        counts = model_param_counts(pythia_config(size))
        assert (counts["total"], counts["non_embedding"]) == (total, non_emb), size
    # Table 5 (1.4B): non-embedding 805,736,448 (4+8R2+4) and 805,797,918 with 61,470 router
    # parameters. (Its totals carry 8,388,608 more than 50,304 padded rows explain: docs/mesh.md.)
    rec = model_param_counts(pythia_config("1.4b", "4+8R2+4"))
    mesh = model_param_counts(pythia_config("1.4b", "4+8R2+4", "mesh"))
    assert rec["non_embedding"] == 805_736_448
    assert (mesh["non_embedding"], mesh["router"]) == (805_797_918, 61_470)
    # Table 1: router counts and non-embedding reductions (blocks only, as the paper rounds them).
    table_1 = [
        ("160m", "2+4R2+2", 23_070, 33.3),
        ("410m", "4+8R2+4", 30_750, 33.3),
        ("410m", "3+6R3+3", 49_200, 50.0),
        ("1b", "3+5R2+3", 61_470, 31.3),
        ("1.4b", "4+8R2+4", 61_470, 33.3),
    ]
    for size, layout, routers, reduction in table_1:
        cfg = pythia_config(size, layout, "mesh")
        counts = model_param_counts(cfg)
        assert counts["router"] == routers == cfg.loop.extra_params(cfg), (size, layout)
        assert counts["non_embedding"] == cfg.non_embedding_params()
        final_norm = 2 * cfg.d_model
        vanilla = model_param_counts(pythia_config(size))["non_embedding"] - final_norm
        looped = model_param_counts(pythia_config(size, layout))["non_embedding"] - final_norm
        assert math.floor(1000 * (1 - looped / vanilla) + 0.5) / 10 == reduction, (size, layout)
    untied = model_param_counts(pythia_config("1.4b", "4+8R2+4", "mesh", tie_core=False))
    assert untied["non_embedding"] == 1_208_602_624 + 61_470  # Table 6: 100% of vanilla + routers


def test_block_style_fields_are_validated_early():
    with pytest.raises(ValueError, match=r"block_style='neox'.*block_type"):
        ModelConfig(block_type="recurrent", block_style="neox")
    with pytest.raises(ValueError, match=r"block_style='neox'.*LRT"):
        ModelConfig(block_type="transformer", block_style="neox", memory=_memory())
    with pytest.raises(ValueError, match=r"ModelConfig\.block_style='gpt2'"):
        ModelConfig(block_style="gpt2")
    with pytest.raises(ValueError, match=r"ModelConfig\.rotary_pct"):
        ModelConfig(position="rope", rotary_pct=0.1, d_model=32, n_heads=2)  # 1 rotary dim
    with pytest.raises(ValueError, match=r"ModelConfig\.rotary_pct"):
        ModelConfig(rotary_pct=0.0)
    with pytest.raises(ValueError, match=r"ModelConfig\.output_init"):
        ModelConfig(output_init="xavier")
    with pytest.raises(ValueError, match=r"ModelConfig\.embed_scale"):
        ModelConfig(block_type="transformer", embed_scale=True, memory=_memory())
    with pytest.raises(ValueError, match=r"ModelConfig\.loop\.handoff='anchor\+ring'"):
        LoopConfig("1+1R2+1", "anchor+ring")
    with pytest.raises(ValueError, match=r"ModelConfig\.loop\.alpha='static'.*mesh"):
        LoopConfig("1+1R2+1", "mesh", alpha="static")
    with pytest.raises(ValueError, match=r"tie_core=False.*set n_layers=5"):
        ModelConfig(
            block_type="transformer", n_layers=4, loop=LoopConfig("1+1R3+1", tie_core=False)
        )


def _memory():
    from rt_jax.config import MemoryConfig

    return MemoryConfig(kind="shared")


def test_standard_models_take_embed_scale_and_depth_init():
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=3, mlp_hidden=128,
        block_type="transformer", embed_scale=True, output_init="depth",
    )  # fmt: skip
    params = lm.init_params(cfg, jax.random.PRNGKey(0))
    for name, fan_in in (("w_o", 64), ("w_ff_out", 128)):
        std = np.asarray(params["blocks"][name]).reshape(3, -1).std(axis=1)
        np.testing.assert_allclose(std, 0.986 / np.sqrt(2 * fan_in * 3), rtol=0.1)  # every layer
    tokens = _tokens()
    plain = ModelConfig(**{**_fields(cfg), "embed_scale": False})
    scaled = np.asarray(lm.forward(params, tokens, cfg))
    # sqrt(D) embeddings through the same weights: the same as scaling the table by sqrt(D).
    table = dict(params, embed=params["embed"] * math.sqrt(64))
    np.testing.assert_allclose(scaled, np.asarray(lm.forward(table, tokens, plain)), atol=1e-5)


def _fields(cfg: ModelConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_set_mesh_slots_sweeps_the_cpu_mesh_comparison():
    """``--set model.loop.mesh_slots=4`` (Table 3's buffer-length sweep) builds every point; only
    the MeSH point reads it."""
    cfg = apply_overrides(get_preset("cpu-mesh"), ["model.loop.mesh_slots=4"])
    for point in cfg.compare:
        model = with_point(cfg, point, 0).model
        if model.loop.handoff == "mesh":
            assert (
                model.loop.n_slots == 4 and model.loop.extra_params(model) == 3 * 128 * 4 * 2 + 24
            )
        else:
            assert model.loop.extra_params(model) == 0
