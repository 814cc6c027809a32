"""Independent float64 oracles for the Latent Recurrent Transformer (issue 14).

Everything below the oracle header is written from the formulas in docs/lrt.md (and the block
formulas of rt_jax/ops/block.py's docstring) in plain NumPy: its own LayerNorms, projections,
RoPE, ALiBi, attention, GELU, injection and memory rule. It shares no helper with
rt_jax/models/lrt.py; only the parameter tree's names and layout are common.

* ``oracle_exact`` runs the true recurrence one position at a time, each position attending to
  the keys/values every earlier position computed with its own memory. It is held to
  ``lrt.forward``, the exact eval sums and cached decoding (prefill + decode_step) at 1e-10.
* ``oracle_interleaved`` / ``oracle_refine`` build the training passes by hand from the rule of
  which K/V a query sees (``kv_source``: "fresh" = this pass, "refined" = an earlier subset's pass,
  "stale" = the zero-memory pass 0), and are held to ``lrt.parallel_passes`` and ``loss_sums``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from rt_jax.config import MemoryConfig, ModelConfig
from rt_jax.decoding import decode_step, prefill
from rt_jax.models import lm, lrt

V, RESET = 11, 3
TOL = 1e-10

# ============================================================================================
# The oracle (NumPy float64; nothing imported from the implementation).


def _ln(x, w, eps):
    """LayerNorm over the last axis with weight w (None: parameter-free), no bias."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    return y if w is None else y * w


def _rope(x_hk, pos, theta):
    """Rotate-half RoPE of each head vector (last axis K) at integer position pos."""
    half = x_hk.shape[-1] // 2
    angle = pos * theta ** (-np.arange(half) / half)
    c, s = np.cos(angle), np.sin(angle)
    x1, x2 = x_hk[..., :half], x_hk[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class Oracle:
    """One model's weights (float64 NumPy) and the per-position formulas of docs/lrt.md."""

    def __init__(self, params, cfg: ModelConfig):
        f = lambda a: np.asarray(a, np.float64)  # noqa: E731
        self.cfg, self.eps = cfg, cfg.norm_eps
        self.embed, self.ln_f, self.head = f(params["embed"]), f(params["ln_f"]), f(params["head"])
        blocks = {k: f(v) for k, v in params["blocks"].items()}
        mem = {k: f(v) for k, v in params["lrt"].items()}
        self.layers = []
        for layer in range(cfg.n_layers):
            p = {k: v[layer] for k, v in blocks.items()}
            p["gamma"] = mem["gamma"][layer] if "gamma" in mem else None
            p["w_gate"] = mem["w_gate"][layer] if "w_gate" in mem else None
            if "w_kvmem_shared" in mem:
                p["w_kvmem"] = mem["w_kvmem_shared"]
            elif "w_kvmem" in mem:
                p["w_kvmem"] = mem["w_kvmem"][layer]
            else:
                p["w_kvmem"] = None
            self.layers.append(p)
        self.h, self.g, self.k = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.slopes = 2.0 ** (-(np.arange(self.h) + 1) * cfg.alibi_bias_max / self.h)

    # -- one layer at one position -----------------------------------------------------------
    def qkv(self, layer, x, m, pos):
        """Inject the memory, then (injected x, q (HxK, scaled), k, v (GxK)) of one position."""
        p, h, kd, eps = self.layers[layer], self.h, self.k, self.eps
        if p["gamma"] is not None:
            x = x + p["gamma"] * m
        u = _ln(x, p["attn_norm"], eps)
        q = _ln(u @ p["w_q"], p["q_norm"], eps).reshape(h, kd)
        if self.cfg.position == "rope":
            q = _rope(q, pos, self.cfg.rope_theta)
        k, v = self.kv(layer, x, m, pos)
        return x, q / math.sqrt(kd), k, v

    def kv(self, layer, x, m, pos):
        """Key and value (GxK) of one position from its (injected) layer input x and memory m."""
        p, g, kd, eps = self.layers[layer], self.g, self.k, self.eps
        u = _ln(x, p["attn_norm"], eps)
        kv = u @ p["w_kv"]
        k_heads, v_heads = kv[: g * kd].reshape(g, kd), kv[g * kd :].reshape(g, kd)
        if p["w_gate"] is not None:
            gates = 2.0 * _sigmoid(u @ p["w_gate"])
            g_loc, g_mem = gates[:g, None], gates[g:, None]
            kv_m = m @ p["w_kvmem"]
            k_heads = g_loc * k_heads + g_mem * kv_m[: g * kd].reshape(g, kd)
            v_heads = g_loc * v_heads + g_mem * kv_m[g * kd :].reshape(g, kd)
        k = _ln(k_heads.reshape(-1), p["k_norm"], eps).reshape(g, kd)
        if self.cfg.position == "rope":
            k = _rope(k, pos, self.cfg.rope_theta)
        return k, v_heads

    def attend(self, q, qpos, keys, values, kpos):
        """Softmax attention of one query (HxK) over the given keys/values (JxGxK) at kpos."""
        out = np.zeros_like(q)
        kpos = np.asarray(kpos)
        for head in range(self.h):
            kv_head = head // (self.h // self.g)
            logits = keys[:, kv_head] @ q[head]
            if self.cfg.position == "alibi":
                logits = logits - self.slopes[head] * (qpos - kpos)
            w = np.exp(logits - logits.max())
            out[head] = (w / w.sum()) @ values[:, kv_head]
        return out

    def finish(self, layer, x, att):
        """Output projection and MLP: the layer's output z."""
        p = self.layers[layer]
        x1 = x + att.reshape(-1) @ p["w_o"]
        return x1 + _gelu(_ln(x1, p["ff_norm"], self.eps) @ p["w_ff_in"]) @ p["w_ff_out"]

    def source(self, x_last, z_layers):
        """The memory a position hands to the next: LN_f(x_L) or PLN(output of memory.layer)."""
        i = self.cfg.memory.layer
        return _ln(x_last, self.ln_f, self.eps) if i < 0 else _ln(z_layers[i], None, self.eps)

    def logits(self, x_last):
        return _ln(x_last, self.ln_f, self.eps) @ self.head

    def keeps_memory(self, tokens, t):
        """Position t reads a memory unless t = 0 or token t-1 is the reset token."""
        return t > 0 and tokens[t - 1] != self.cfg.memory.reset_token


def oracle_exact(params, tokens_bn, cfg):
    """Exact logits (B, N, E): position by position, each with the memory of the one before."""
    o = Oracle(params, cfg)
    out = []
    for tokens in np.asarray(tokens_bn):
        n, d = len(tokens), cfg.d_model
        keys = [[] for _ in range(cfg.n_layers)]
        values = [[] for _ in range(cfg.n_layers)]
        m, row = np.zeros(d), []
        for t in range(n):
            m = m if o.keeps_memory(tokens, t) else np.zeros(d)
            x, zs = o.embed[tokens[t]], []
            for layer in range(cfg.n_layers):
                x, q, k, v = o.qkv(layer, x, m, t)
                keys[layer].append(k)
                values[layer].append(v)
                att = o.attend(q, t, np.stack(keys[layer]), np.stack(values[layer]), range(t + 1))
                x = o.finish(layer, x, att)
                zs.append(x)
            row.append(o.logits(x))
            m = o.source(x, zs)
        out.append(np.stack(row))
    return np.stack(out)


def subset_of(j, n, n_subsets, training):
    """The subset pass that recomputes position j: j mod S (interleaved) or j // (N/S) (chunked)."""
    return j // (n // n_subsets) if training == "chunked" else j % n_subsets


def kv_source(subset, j, n, n_subsets, training="interleaved"):
    """Which K/V the queries of subset pass ``subset`` see at key position j."""
    owner = subset_of(j, n, n_subsets, training)
    if owner == subset:
        return "fresh"
    return "refined" if owner < subset else "stale"


def _run_pass(o, tokens, positions, mem, kv_lookup):
    """All layers over ``positions`` (in parallel) with memory ``mem[p]``; query p attends to
    keys j <= p: this pass's pairs at its own positions, ``kv_lookup(layer, j)`` elsewhere.
    Returns the logits, source states, per-layer fresh pairs {p: (k, v)} and per-layer
    (injected) layer inputs {p: x} of this pass."""
    xs = {p: o.embed[tokens[p]] for p in positions}
    zs = {p: [] for p in positions}
    fresh, inputs = [], []
    for layer in range(o.cfg.n_layers):
        qkv = {p: o.qkv(layer, xs[p], mem[p], p) for p in positions}
        inputs.append({p: qkv[p][0] for p in positions})
        pairs = {p: (qkv[p][2], qkv[p][3]) for p in positions}
        for p in positions:
            ks, vs = [], []
            for j in range(p + 1):
                k, v = pairs[j] if j in pairs else kv_lookup(layer, j)
                ks.append(k)
                vs.append(v)
            x_inj, q = qkv[p][0], qkv[p][1]
            xs[p] = o.finish(layer, x_inj, o.attend(q, p, np.stack(ks), np.stack(vs), range(p + 1)))
            zs[p].append(xs[p])
        fresh.append(pairs)
    logits = {p: o.logits(xs[p]) for p in positions}
    src = {p: o.source(xs[p], zs[p]) for p in positions}
    return logits, src, fresh, inputs


def _shifted(o, tokens, src):
    d = o.cfg.d_model
    return {
        t: (src[t - 1] if o.keeps_memory(tokens, t) else np.zeros(d)) for t in range(len(tokens))
    }


def oracle_interleaved(params, tokens_bn, cfg):
    """Interleaved (or chunked) training passes by hand: [(positions, logits B x |P| x E)] in pass order.

    With ``memory.kv_refresh`` a stale pair is pass 0's, recomputed from pass 0's layer input
    (gates and local part) with the memory the position has just before the subset pass."""
    o, n_sub, training = Oracle(params, cfg), cfg.memory.passes, cfg.memory.training
    per_row = []
    for tokens in np.asarray(tokens_bn):
        n = len(tokens)
        everything = list(range(n))
        zero = {t: np.zeros(cfg.d_model) for t in everything}
        logits0, src0, kv0, inputs0 = _run_pass(o, tokens, everything, zero, None)
        passes = [(everything, logits0)]
        src, kv_by_subset = dict(src0), {}
        for s in range(n_sub):
            positions = [j for j in everything if subset_of(j, n, n_sub, training) == s]
            mem = _shifted(o, tokens, src)

            def lookup(layer, j, s=s, n=n, mem=mem, kv0=kv0, inputs0=inputs0, kv_sub=kv_by_subset):
                label = kv_source(s, j, n, n_sub, training)
                assert label != "fresh"
                if label == "refined":
                    return kv_sub[subset_of(j, n, n_sub, training)][layer][j]
                if cfg.memory.kv_refresh:
                    return o.kv(layer, inputs0[layer][j], mem[j], j)
                return kv0[layer][j]

            logits, src_s, kv_by_subset[s], _ = _run_pass(o, tokens, positions, mem, lookup)
            src.update(src_s)
            passes.append((positions, logits))
        per_row.append(passes)
    return _stack_rows(per_row)


def oracle_refine(params, tokens_bn, cfg):
    """Multi-refinement passes by hand: pass 0 with zero memory, then K full passes."""
    o = Oracle(params, cfg)
    per_row = []
    for tokens in np.asarray(tokens_bn):
        everything = list(range(len(tokens)))
        mem = {t: np.zeros(cfg.d_model) for t in everything}
        passes = []
        for _ in range(cfg.memory.passes + 1):
            logits, src, _, _ = _run_pass(o, tokens, everything, mem, None)
            passes.append((everything, logits))
            mem = _shifted(o, tokens, src)
        per_row.append(passes)
    return _stack_rows(per_row)


def _stack_rows(per_row):
    out = []
    for i, (positions, _) in enumerate(per_row[0]):
        out.append((positions, np.stack([[row[i][1][p] for p in positions] for row in per_row])))
    return out


def _ce(logits, targets, vocab):
    z = logits[..., :vocab]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.sum(lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]))


# ============================================================================================
# The implementation held to the oracle.


def _cfg(n_layers=4, **memory) -> ModelConfig:
    mem = {"kind": "shared", "reset_token": RESET, "passes": 2, **memory}
    position = mem.pop("position", "rope")
    return ModelConfig(
        vocab_size=V,
        embedding_size=12,
        d_model=16,
        n_heads=4,
        n_kv_heads=2,
        n_layers=n_layers,
        block_type="transformer",
        position=position,
        compute_dtype="float64",
        memory=MemoryConfig(**mem),
    )


def _params(cfg: ModelConfig, seed=0):
    """float64 parameters with every weight away from its init: random gates, gammas in
    [0.3, 0.8] and norm weights in [0.5, 1.5], so the oracle would notice a weight ignored."""
    params = lm.init_params(cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 32))
    blocks = {
        k: (
            v + 0.5 * jax.random.uniform(next(keys), v.shape, minval=-1)
            if k.endswith("norm")
            else v
        )
        for k, v in params["blocks"].items()
    }
    memory = dict(params["lrt"])
    if "w_gate" in memory:
        memory["w_gate"] = 0.5 * jax.random.normal(next(keys), memory["w_gate"].shape)
    if "gamma" in memory:
        memory["gamma"] = jnp.linspace(0.3, 0.8, cfg.n_layers)
    ln_f = params["ln_f"] + 0.5 * jax.random.uniform(next(keys), params["ln_f"].shape, minval=-1)
    params = {**params, "blocks": blocks, "lrt": memory, "ln_f": ln_f}
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _tokens(b, n, seed=2):
    tokens = np.array(jax.random.randint(jax.random.key(seed), (b, n), 0, V))
    tokens[tokens == RESET] = 0
    tokens[0, n // 2] = RESET  # a document boundary inside row 0
    tokens[-1, n - 3] = RESET  # and one near the end of the last row
    return tokens


def test_kv_source_table_for_two_subsets():
    """S = 2 by hand: the even subset sees its own fresh pairs and pass 0's stale odd pairs; the
    odd subset sees the even subset's refined pairs and its own fresh ones."""
    table = {(s, j): kv_source(s, j, 4, 2) for s in (0, 1) for j in range(4)}
    assert table == {
        (0, 0): "fresh",
        (0, 1): "stale",
        (0, 2): "fresh",
        (0, 3): "stale",
        (1, 0): "refined",
        (1, 1): "fresh",
        (1, 2): "refined",
        (1, 3): "fresh",
    }
    # Chunked, 2 chunks of 2: the first chunk never sees the second (causal), the second sees
    # the first's refined pairs: no query attends to a stale pair.
    chunked = {(s, j): kv_source(s, j, 4, 2, "chunked") for s in (0, 1) for j in range(4)}
    assert [chunked[1, j] for j in range(4)] == ["refined", "refined", "fresh", "fresh"]
    assert [chunked[0, j] for j in range(2)] == ["fresh", "fresh"]


EXACT_CASES = {
    # id: (n_layers, N, memory changes); the first two run in make test, the rest in test-slow.
    "shared-both-rope-last": (4, 12, dict(kind="shared", injection="both", layer=-1)),
    "layerwise-kv-alibi-layer1": (
        4,
        12,
        dict(kind="layerwise", injection="kv", layer=1, position="alibi"),
    ),
    "shared-residual-rope-layer2": (4, 12, dict(kind="shared", injection="residual", layer=2)),
    "layerwise-both-alibi-layer0": (
        4,
        12,
        dict(kind="layerwise", injection="both", layer=0, position="alibi"),
    ),
    "shared-kv-rope-last": (4, 12, dict(kind="shared", injection="kv", layer=-1)),
    "shared-both-alibi-layer2": (
        4,
        12,
        dict(kind="shared", injection="both", layer=2, position="alibi"),
    ),
    "layerwise-both-rope-layer2": (4, 12, dict(kind="layerwise", injection="both", layer=2)),
    "layerwise-residual-alibi-last": (
        4,
        12,
        dict(kind="layerwise", injection="residual", layer=-1, position="alibi"),
    ),
    "layerwise-kv-rope-last": (4, 12, dict(kind="layerwise", injection="kv", layer=-1)),
    "shared-kv-alibi-layer0": (
        4,
        12,
        dict(kind="shared", injection="kv", layer=0, position="alibi"),
    ),
    "shared-both-rope-layer2-L6-N64": (6, 64, dict(kind="shared", injection="both", layer=2)),
    "layerwise-both-alibi-last-L4-N96": (
        4,
        96,
        dict(kind="layerwise", injection="both", layer=-1, position="alibi"),
    ),
}


def _exact_and_eval(params, tokens, config):
    """Exact logits of tokens[:, :-1] and the eval sums with targets tokens[:, 1:]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return lrt.forward(params, inputs, config), lm.eval_sums(params, inputs, targets, config)


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_forward_eval_and_decoding_equal_the_oracle(case):
    n_layers, n, memory = EXACT_CASES[case]
    with jax.enable_x64(True):
        cfg = _cfg(n_layers, **memory)
        params = _params(cfg)
        tokens = _tokens(2, n + 1)
        inputs = tokens[:, :n]
        want = oracle_exact(params, inputs, cfg)
        run = jax.jit(_exact_and_eval, static_argnames="config")
        exact, sums = run(params, jnp.asarray(tokens), cfg)
        assert exact.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(exact), want, atol=TOL, rtol=TOL)
        # Per prefix: the oracle on a shorter prefix gives the same logits (it is causal).
        short = n // 2 + 2
        np.testing.assert_allclose(
            oracle_exact(params, inputs[:, :short], cfg), want[:, :short], atol=TOL
        )
        # Exact eval: ce_sum is the CE of the exact recurrence.
        np.testing.assert_allclose(float(sums["ce_sum"]), _ce(want, tokens[:, 1:], V), rtol=TOL)
        # Cached decoding: ragged prompts, then one token per step to the end.
        lengths = [3, n // 2 + 1]
        logits, cache = prefill(params, [inputs[b, :m] for b, m in enumerate(lengths)], cfg, n)
        rows = np.arange(2)
        np.testing.assert_allclose(
            np.asarray(logits), want[rows, np.asarray(lengths) - 1], atol=TOL, rtol=TOL
        )
        for i in range(n - max(lengths)):
            pos = np.asarray(lengths) + i
            logits, cache = decode_step(params, cache, inputs[rows, pos], cfg)
            np.testing.assert_allclose(
                np.asarray(logits), want[rows, pos], atol=TOL, rtol=TOL, err_msg=f"step {i}"
            )


TRAIN_CASES = {
    # id: (n_layers, N, memory changes); the first three run in make test, the rest in test-slow.
    "interleaved-S2-shared-rope": (2, 8, dict(training="interleaved", passes=2, kind="shared")),
    "refine-K2-layerwise-alibi-layer0-weighted": (
        2,
        6,
        dict(
            training="refine",
            passes=2,
            kind="layerwise",
            layer=0,
            position="alibi",
            pass_weights=(0.1, 0.3, 0.6),
        ),
    ),
    "interleaved-S2-refresh-layerwise-rope-layer1": (
        2,
        8,
        dict(training="interleaved", passes=2, kind="layerwise", layer=1, kv_refresh=True),
    ),
    "interleaved-S4-refresh-shared-kv-alibi-L4-N64": (
        4,
        64,
        dict(
            training="interleaved",
            passes=4,
            kind="shared",
            injection="kv",
            kv_refresh=True,
            position="alibi",
            pass_weights=(1.0, 0.0, 2.0, 1.0, 0.5),
        ),
    ),
    "chunked-S2-shared-rope-layer0": (2, 8, dict(training="chunked", passes=2, layer=0)),
    "chunked-S4-refresh-layerwise-alibi-L4-N64": (
        4,
        64,
        dict(training="chunked", passes=4, kind="layerwise", kv_refresh=True, position="alibi"),
    ),
    "interleaved-S2-layerwise-alibi-layer1-L4-N64": (
        4,
        64,
        dict(training="interleaved", passes=2, kind="layerwise", layer=1, position="alibi"),
    ),
    "interleaved-S4-shared-kv-rope-L4-N64": (
        4,
        64,
        dict(training="interleaved", passes=4, kind="shared", injection="kv"),
    ),
    "refine-K3-shared-residual-rope-layer2-L4-N64": (
        4,
        64,
        dict(training="refine", passes=3, kind="shared", injection="residual", layer=2),
    ),
}


def _passes_loss_and_eval(params, tokens, config):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    passes = lrt.parallel_passes(params, inputs, config)
    ce_sum, _ = lrt.loss_sums(params, inputs, targets, config)
    return [logits for _, logits in passes], ce_sum, lrt.eval_sums(params, inputs, targets, config)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_passes_equal_the_hand_built_reference(case):
    n_layers, n, memory = TRAIN_CASES[case]
    with jax.enable_x64(True):
        cfg = _cfg(n_layers, eval_bucket=n // 4 + 1, **memory)
        params = _params(cfg)
        tokens = _tokens(2, n + 1)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        oracle = oracle_refine if cfg.memory.training == "refine" else oracle_interleaved
        want = oracle(params, inputs, cfg)
        run = jax.jit(_passes_loss_and_eval, static_argnames="config")
        got, ce_sum, sums = run(params, jnp.asarray(tokens), cfg)
        assert len(got) == len(want) == cfg.memory.passes + 1
        for i, (logits, (_, want_logits)) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(
                np.asarray(logits), want_logits, atol=TOL, rtol=TOL, err_msg=f"pass {i}"
            )
        # Loss: the (weighted) mean over passes of each pass's mean CE, on the B*N scale.
        means = np.array([_ce(w, targets[:, pos], V) / w[..., 0].size for pos, w in want])
        weights = np.array(cfg.memory.pass_weights or [1.0] * len(want))
        want_loss = np.sum(weights * means) / np.sum(weights) * inputs.size
        np.testing.assert_allclose(float(ce_sum), want_loss, rtol=TOL)
        # Eval: each pass's mean CE and the exact CE by position bucket, on the B*N scale.
        for i, mean in enumerate(means):
            np.testing.assert_allclose(float(sums[f"ce_sum_pass{i}"]) / inputs.size, mean, rtol=TOL)
        exact = oracle_exact(params, inputs, cfg)
        width = cfg.memory.eval_bucket
        buckets = [k for k in sums if k.startswith("ce_sum_pos")]
        assert len(buckets) == -(-n // width) > 1
        for start in range(0, n, width):
            end = min(start + width, n)
            ce = _ce(exact[:, start:end], targets[:, start:end], V) / (2 * (end - start))
            np.testing.assert_allclose(
                float(sums[f"ce_sum_pos{start}_{end}"]) / inputs.size, ce, rtol=TOL
            )
        # The memory pathway is live: the last pass differs from the zero-memory pass 0.
        last_positions, last = want[-1]
        assert np.max(np.abs(last - want[0][1][:, last_positions])) > 1e-3


def _oracle_refine_loss(params, inputs, targets, cfg, frozen=None):
    """The refine loss by the oracle; ``frozen`` (parameters) computes every pass's memory from
    the passes run with those parameters instead (what ``memory.detach`` differentiates)."""
    o, ref = Oracle(params, cfg), Oracle(frozen if frozen is not None else params, cfg)
    weights = np.array(cfg.memory.pass_weights or [1.0] * (cfg.memory.passes + 1))
    total = 0.0
    for tokens, target in zip(np.asarray(inputs), np.asarray(targets), strict=True):
        everything = list(range(len(tokens)))
        mem = {t: np.zeros(cfg.d_model) for t in everything}
        for weight in weights:
            logits, src, _, _ = _run_pass(o, tokens, everything, mem, None)
            if frozen is not None:
                _, src, _, _ = _run_pass(ref, tokens, everything, mem, None)
            row = np.stack([logits[p] for p in everything])
            total += weight * _ce(row, target, V) / len(everything)
            mem = _shifted(o, tokens, src)
    return total / np.sum(weights) / len(inputs)


@pytest.mark.parametrize("detach", [False, True])
def test_refine_gradient_with_and_without_detach_equals_finite_differences(detach):
    """d loss / d gamma of the refine objective (K = 2, weights 0.1/0.3/0.6) against central
    differences of the oracle; with detach the memories are held at the unperturbed passes'."""
    memory = dict(training="refine", passes=2, pass_weights=(0.1, 0.3, 0.6), detach=detach)
    with jax.enable_x64(True):
        cfg = _cfg(2, **memory)
        params = _params(cfg)
        tokens = _tokens(2, 7)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def loss(p):
            return lrt.loss_sums(p, jnp.asarray(inputs), jnp.asarray(targets), cfg)[0] / inputs.size

        grad = np.asarray(jax.jit(jax.grad(loss))(params)["lrt"]["gamma"])
        eps, fd = 1e-5, []
        for layer in range(cfg.n_layers):
            sides = []
            for sign in (1, -1):
                gamma = params["lrt"]["gamma"].copy()
                gamma[layer] += sign * eps
                moved = {**params, "lrt": {**params["lrt"], "gamma": gamma}}
                frozen = params if detach else None
                sides.append(_oracle_refine_loss(moved, inputs, targets, cfg, frozen))
            fd.append((sides[0] - sides[1]) / (2 * eps))
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
        # The two objectives have different gradients (the memory path carries signal).
        other = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, detach=not detach))
        other_grad = jax.jit(jax.grad(lambda p: lrt.loss_sums(p, inputs, targets, other)[0]))(
            params
        )["lrt"]["gamma"]
        assert np.max(np.abs(np.asarray(other_grad) / inputs.size - grad)) > 1e-4


@pytest.mark.parametrize("n_subsets", [8, 2])
def test_parallel_prefill_is_exact_only_with_one_position_per_subset(n_subsets):
    """memory.prefill='parallel' (APPROXIMATE): with S = the prompt length every subset is one
    position and the prefill (logits, cache, memory) is the exact recurrence, so decoding after
    it equals the oracle; with S = 2 the logits are the training passes' merged ones."""
    with jax.enable_x64(True):
        cfg = _cfg(2, passes=n_subsets, prefill="parallel", layer=0)
        params = _params(cfg)
        tokens = _tokens(2, 12)
        want = oracle_exact(params, tokens, cfg)
        lengths = [8, 5]
        logits, cache = prefill(params, [tokens[b, :m] for b, m in enumerate(lengths)], cfg, 12)
        rows = np.arange(2)
        last = np.asarray(lengths) - 1
        if n_subsets == 8:
            np.testing.assert_allclose(np.asarray(logits), want[rows, last], atol=TOL, rtol=TOL)
            for i in range(12 - max(lengths)):
                pos = np.asarray(lengths) + i
                logits, cache = decode_step(params, cache, tokens[rows, pos], cfg)
                np.testing.assert_allclose(np.asarray(logits), want[rows, pos], atol=TOL, rtol=TOL)
        else:
            prompt = tokens[:, :8]
            merged = {}
            for positions, pass_logits in oracle_interleaved(params, prompt, cfg):
                merged.update({p: pass_logits[:, i] for i, p in enumerate(positions)})
            np.testing.assert_allclose(
                np.asarray(logits), np.stack([merged[p][b] for b, p in enumerate(last)]), atol=TOL
            )
            assert np.max(np.abs(np.asarray(logits) - want[rows, last])) > 1e-4  # approximate
