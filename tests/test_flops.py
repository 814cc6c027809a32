"""Analytic FLOP formulas against XLA's cost_analysis of unrolled tiny forwards, peaks and MFU.

XLA counts a scan/while body once, so the models here are written as Python loops (layers, and for
the Recurrent Transformer also positions). Two checks per model:

* exact: the matmul FLOPs of every ``dot`` in the lowered HLO (2 x output size x contracted size)
  equal the formula, so the causal half, the RT persistent kv projection and the 3x training factor
  are pinned down exactly;
* approximate: XLA's ``cost_analysis()["flops"]`` of the compiled program is within 6% above the
  formula (it also counts the elementwise work of norms, softmax and GELU, which the formula omits).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

from rt_jax.config import ModelConfig
from rt_jax.models.lm import embed, head, init_params
from rt_jax.ops.block import kv_projection, post_attention, pre_attention
from rt_jax.ops.transformer import transformer_layer
from rt_jax.train import flops

B, N = 2, 16
TOL = 0.06


def _config(block_type: str, **kw) -> ModelConfig:
    base = dict(
        vocab_size=256, d_model=256, n_heads=4, n_layers=2, mlp_hidden=1024, block_type=block_type
    )
    base.update(kw)
    return ModelConfig(**base, impl="reference")


def _layer_params(params, layer: int):
    return jax.tree.map(lambda a: a[layer], params["blocks"])


def _rt_layer_unrolled(p, x_BxNxD, spec):
    """RT layer as a Python loop over positions: position t attends to exactly t + 1 keys.

    Returns z and the persistent (k, v) cache (returned so the last position's pair is not dead code).
    """
    n = x_BxNxD.shape[1]
    pos = jnp.arange(n)
    q, k_tmp, v_tmp = pre_attention(p, x_BxNxD, pos, spec)  # BxNxHxK (MHA here: G = H)
    ks, vs, zs = [], [], []
    for t in range(n):
        keys = jnp.stack(ks + [k_tmp[:, t]], axis=1)  # Bx(t+1)xHxK
        vals = jnp.stack(vs + [v_tmp[:, t]], axis=1)
        logits = jnp.einsum("bhk,bshk->bhs", q[:, t], keys, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        att = jnp.einsum("bhs,bshk->bhk", probs, vals, preferred_element_type=jnp.float32)
        z_t = post_attention(p, x_BxNxD[:, t : t + 1], att[:, None], spec)
        k_t, v_t = kv_projection(p, z_t, pos[t : t + 1], spec)
        ks.append(k_t[:, 0])
        vs.append(v_t[:, 0])
        zs.append(z_t[:, 0])
    return jnp.stack(zs, axis=1), (jnp.stack(ks, axis=1), jnp.stack(vs, axis=1))


def _unrolled_forward(cfg: ModelConfig):
    """Logits of a model whose layers (and RT positions) are Python loops; RT also returns its cache."""
    spec = cfg.attention_spec()

    def fwd(params, tokens):
        x = embed(params, tokens)
        caches = []
        for i in range(cfg.n_layers):
            if cfg.block_type == "transformer":
                x = transformer_layer(_layer_params(params, i), x, spec)
            else:
                x, cache = _rt_layer_unrolled(_layer_params(params, i), x, spec)
                caches.append(cache)
        logits = head(params, x, cfg)
        return (logits, caches) if caches else logits

    return fwd


def _xla_flops(fn, *args) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w+)\(([^)]*)\)(.*)$")


def _hlo_dot_flops(fn, *args) -> float:
    """2 x output elements x contracted elements, summed over every dot of the lowered HLO."""
    text = jax.jit(fn).lower(*args).as_text(dialect="hlo")
    shapes: dict[str, list[int]] = {}
    total = 0
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dims, op, operands, attrs = m.groups()
        shapes[name] = [int(v) for v in dims.split(",") if v]
        if op != "dot":
            continue
        lhs = shapes[operands.split(",")[0].strip().lstrip("%")]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
        contracted = math.prod(lhs[int(i)] for i in contracting.split(",") if i)
        total += 2 * math.prod(shapes[name]) * contracted
    assert total > 0, "no dot found in the HLO"
    return float(total)


def _inputs(cfg: ModelConfig):
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, N), 0, cfg.vocab_size)
    return params, tokens


def test_transformer_forward_matches_xla():
    cfg = _config("transformer")
    params, tokens = _inputs(cfg)
    fwd = _unrolled_forward(cfg)
    # this implementation computes the full masked N x N square, so N keys per query
    expected = B * N * flops.forward_flops_per_token(cfg, N, keys_per_query=N)
    assert _hlo_dot_flops(fwd, params, tokens) == expected
    measured = _xla_flops(fwd, params, tokens)
    assert measured == pytest.approx(expected, rel=TOL)
    assert measured >= expected  # XLA adds elementwise work on top of the matmuls


def test_recurrent_forward_matches_xla_causal_count():
    cfg = _config("recurrent", n_layers=1)
    params, tokens = _inputs(cfg)
    fwd = _unrolled_forward(cfg)
    expected = B * N * flops.forward_flops_per_token(cfg, N)  # exact causal (t + 1) keys
    assert _hlo_dot_flops(fwd, params, tokens) == expected
    tf = ModelConfig(**{**cfg.__dict__, "block_type": "transformer"})
    assert _hlo_dot_flops(fwd, params, tokens) > B * N * flops.forward_flops_per_token(tf, N)
    measured = _xla_flops(fwd, params, tokens)
    assert measured == pytest.approx(expected, rel=TOL)
    assert measured >= expected


def test_training_is_three_forwards_on_xla():
    cfg = _config("transformer")
    params, tokens = _inputs(cfg)
    fwd = _unrolled_forward(cfg)

    def loss(p, t):
        logits = fwd(p, t)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    expected = B * N * flops.TRAIN_FACTOR * flops.forward_flops_per_token(cfg, N, keys_per_query=N)
    assert _hlo_dot_flops(jax.grad(loss), params, tokens) == expected
    measured = _xla_flops(jax.grad(loss), params, tokens)
    assert measured == pytest.approx(expected, rel=TOL)


def test_component_formulas():
    rt = ModelConfig(vocab_size=32100, embedding_size=32128, d_model=1024, n_heads=16, n_layers=12)
    tf = ModelConfig(**{**rt.__dict__, "block_type": "transformer"})
    n = 512
    per_rt = flops.layer_forward_flops_per_token(rt, n)
    per_tf = flops.layer_forward_flops_per_token(tf, n)
    d = 1024
    assert per_tf["q_proj"] == per_tf["out_proj"] == 2 * d * d
    assert per_tf["kv_proj"] == 4 * d * d
    assert per_tf["mlp"] == 2 * 2 * d * 4 * d
    assert per_tf["attn_logits"] == per_tf["attn_values"] == 2 * d * (n + 1) / 2
    assert "kv_persistent" not in per_tf
    assert per_rt["kv_persistent"] == 4 * d * d
    # 6N-style: 3x forward of (2 x matmul params) plus attention, plus the head
    matmul_params = 12 * (4 * d * d + 2 * d * 4 * d)
    attn = 12 * 4 * d * (n + 1) / 2
    assert flops.train_flops_per_token(tf, n) == 3 * (2 * matmul_params + attn + 2 * d * 32128)
    extra = flops.train_flops_per_token(rt, n) - flops.train_flops_per_token(tf, n)
    assert extra == 3 * 12 * 4 * d * d
    assert flops.train_flops_per_step(tf, n, 512) == flops.train_flops_per_token(tf, n) * n * 512
    # grouped-query attention shrinks only the kv matmuls
    gqa = ModelConfig(d_model=256, n_heads=4, n_kv_heads=2, n_layers=1)
    per = flops.layer_forward_flops_per_token(gqa, 8)
    assert per["kv_proj"] == per["kv_persistent"] == 2 * 256 * 2 * 128
    with pytest.raises(ValueError, match="seq_len"):
        flops.train_flops_per_token(tf, 0)


@pytest.mark.parametrize(
    "kind, dtype, expected",
    [
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "bfloat16", 459e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v4", "float32", 275e12),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756.4e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
        ("cpu", "bfloat16", None),
        ("TPU v2", "bfloat16", None),
        ("NVIDIA H100 80GB HBM3", "float64", None),
    ],
)
def test_peak_table(kind, dtype, expected):
    assert flops.peak_flops_per_device(kind, dtype) == expected


def test_peak_bad_dtype_and_hbm():
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops_per_device("TPU v4", "int8")
    assert flops.hbm_bytes_per_device("TPU v5 lite") == 16 * 1024**3
    assert flops.hbm_bytes_per_device("cpu") is None


def test_mfu():
    assert flops.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert flops.mfu(1000.0, 1e9, 1, None) is None
    with pytest.raises(ValueError, match="n_devices"):
        flops.mfu(1.0, 1.0, 0, 1.0)
