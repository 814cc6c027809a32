"""rt_jax.convert: reference-format weights give the logits of an independent float64 NumPy model.

The NumPy model below is written from the reference code's description (PyTorch layouts, out x in):
pre-LN LayerNorm with mean subtraction, QK-LayerNorm over the whole q / k vector before the head
split, ALiBi slopes 2^(-(h+1) * 8 / H) (RoPE: rotate-half, inverse frequencies theta^(-2i/K)), exact
GELU, untied head. The Recurrent Transformer runs token by token: position t attends to persistent
pairs kv(LN(z_s)) of earlier outputs and to its own temporary pair kv(LN(x_t)).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from rt_jax.config import ModelConfig
from rt_jax.convert import OLMO_DEFAULTS, config_from_olmo, from_olmo, params_from_olmo
from rt_jax.models.lm import init_params

EPS = 1e-5


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# ----------------------------------------------------------------------------- NumPy reference
_erf = np.vectorize(math.erf)


def np_layer_norm(x, w):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * w


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_rope(x_HxK, pos, theta):
    k = x_HxK.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, k, 2) / k)
    angles = np.concatenate([pos * inv_freq, pos * inv_freq])
    x1, x2 = x_HxK[..., : k // 2], x_HxK[..., k // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x_HxK * np.cos(angles) + rotated * np.sin(angles)


def np_softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


class NumpyModel:
    """Float64 reference LM on canonical PyTorch-layout weights (one sequence at a time)."""

    def __init__(self, cfg, weights):
        self.cfg, self.w = cfg, weights
        h = cfg["n_heads"]
        self.hd = cfg["d_model"] // h
        self.slopes = 2.0 ** (-(np.arange(h) + 1) * cfg["alibi_bias_max"] / h)

    def _q(self, lw, h, t):
        cfg = self.cfg
        q = np_layer_norm(lw["q_proj"] @ h, lw["q_norm"]).reshape(cfg["n_heads"], self.hd)
        return np_rope(q, t, cfg["rope_theta"]) if cfg["rope"] else q

    def _kv(self, lw, h, t):
        cfg = self.cfg
        kv_dim = cfg["n_kv_heads"] * self.hd
        kv = lw["kv_proj"] @ h
        k = np_layer_norm(kv[:kv_dim], lw["k_norm"]).reshape(cfg["n_kv_heads"], self.hd)
        v = kv[kv_dim:].reshape(cfg["n_kv_heads"], self.hd)
        return (np_rope(k, t, cfg["rope_theta"]) if cfg["rope"] else k), v

    def _attend(self, q_HxK, keys, values, t, key_pos):
        """Softmax attention of one query (position t) over the given keys (per head)."""
        cfg = self.cfg
        group = cfg["n_heads"] // cfg["n_kv_heads"]
        out = np.zeros_like(q_HxK)
        for head in range(cfg["n_heads"]):
            g = head // group  # repeat_interleave of the kv heads
            logits = np.array([q_HxK[head] @ k[g] for k in keys]) / math.sqrt(self.hd)
            if cfg["alibi"]:
                logits = logits - self.slopes[head] * np.abs(t - np.asarray(key_pos))
            p = np_softmax(logits)
            out[head] = sum(p_s * v[g] for p_s, v in zip(p, values, strict=True))
        return out.reshape(-1)

    def _mlp(self, lw, x, att):
        x1 = x + lw["attn_out"] @ att
        return x1 + lw["ff_out"] @ np_gelu(lw["ff_proj"] @ np_layer_norm(x1, lw["ff_norm"]))

    def recurrent_layer(self, lw, x_NxD):
        keys, values, out = [], [], []
        for t, x_t in enumerate(x_NxD):
            h = np_layer_norm(x_t, lw["attn_norm"])
            q = self._q(lw, h, t)
            k_tmp, v_tmp = self._kv(lw, h, t)
            att = self._attend(q, keys + [k_tmp], values + [v_tmp], t, list(range(t + 1)))
            z = self._mlp(lw, x_t, att)
            k_t, v_t = self._kv(lw, np_layer_norm(z, lw["attn_norm"]), t)
            keys.append(k_t)
            values.append(v_t)
            out.append(z)
        return np.stack(out)

    def transformer_layer(self, lw, x_NxD):
        h = np_layer_norm(x_NxD, lw["attn_norm"])
        qs = [self._q(lw, h[t], t) for t in range(len(h))]
        kvs = [self._kv(lw, h[t], t) for t in range(len(h))]
        out = []
        for t, x_t in enumerate(x_NxD):
            keys = [kv[0] for kv in kvs[: t + 1]]
            values = [kv[1] for kv in kvs[: t + 1]]
            out.append(self._mlp(lw, x_t, self._attend(qs[t], keys, values, t, range(t + 1))))
        return np.stack(out)

    def logits(self, tokens_BxN, block_type):
        result = []
        for seq in tokens_BxN:
            x = self.w["wte"][seq]
            for lw in self.w["layers"]:
                if block_type == "recurrent":
                    x = self.recurrent_layer(lw, x)
                else:
                    x = self.transformer_layer(lw, x)
            result.append(np_layer_norm(x, self.w["ln_f"]) @ self.w["head"].T)
        return np.stack(result)


# ----------------------------------------------------------------------------- fixtures
def small_olmo_config(**overrides):
    """A small reference-format model config (the released runs' settings at toy size)."""
    cfg = {
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "mlp_hidden_size": 48,
        "vocab_size": 50,
        "embedding_size": 64,
        "max_sequence_length": 512,
        "rope": False,
        "alibi": True,
        "alibi_bias_max": 8.0,
        "rope_theta": 10_000,
        "activation_type": "gelu",
        "include_bias": False,
        "bias_for_layer_norm": False,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "block_type": "recurrent",
        "layer_norm_type": "default",
        "attention_layer_norm": True,
        "attention_layer_norm_with_affine": True,
        "layer_norm_with_affine": True,
        "layer_norm_eps": EPS,
        "weight_tying": False,
        "init_fn": "mitchell",
        "init_device": "meta",
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg, seed=0):
    """Random canonical weights (PyTorch layout) with non-trivial norm weights."""
    rng = np.random.default_rng(seed)
    d, f, e = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv_dim = cfg["n_kv_heads"] * d // cfg["n_heads"]

    def lin(out, inp, scale=1.0):
        return rng.normal(0.0, scale / math.sqrt(inp), (out, inp))

    def norm(n):
        return 1.0 + 0.3 * rng.normal(size=n)

    layers = []
    for _ in range(cfg["n_layers"]):
        layers.append(
            {
                "attn_norm": norm(d),
                "ff_norm": norm(d),
                "q_norm": norm(d),
                "k_norm": norm(kv_dim),
                "q_proj": lin(d, d),
                "kv_proj": lin(2 * kv_dim, d),
                "attn_out": lin(d, d, 0.5),
                "ff_proj": lin(f, d),
                "ff_out": lin(d, f, 0.5),
            }
        )
    return {
        "wte": rng.normal(size=(e, d)),
        "layers": layers,
        "ln_f": norm(d),
        "head": lin(e, d),
    }


def to_state_dict(weights, layout, aliases=True):
    """The reference state dict for these weights ("recurrent": q_proj/kv_proj, or "sequential")."""
    sd = {
        "transformer.wte.weight": weights["wte"],
        "transformer.ln_f.weight": weights["ln_f"],
        "transformer.ff_out.weight": weights["head"],
    }
    for i, lw in enumerate(weights["layers"]):
        p = f"transformer.blocks.{i}."
        for name in ("attn_norm", "ff_norm", "q_norm", "k_norm", "attn_out", "ff_proj", "ff_out"):
            sd[f"{p}{name}.weight"] = lw[name]
        if layout == "sequential":
            sd[f"{p}att_proj.weight"] = np.concatenate([lw["q_proj"], lw["kv_proj"]], axis=0)
            continue
        sd[f"{p}q_proj.weight"] = lw["q_proj"]
        sd[f"{p}kv_proj.weight"] = lw["kv_proj"]
        if aliases:  # what state_dict() of the reference's recurrent block also contains
            for name in ("attn_norm", "kv_proj", "q_proj", "q_norm", "k_norm"):
                sd[f"{p}pre_attention_block.{name}.weight"] = lw[name].copy()
            for name in ("attn_norm", "ff_norm", "ff_proj", "ff_out"):
                sd[f"{p}post_attention_block.{name}.weight"] = lw[name].copy()
    return sd


def tokens(cfg, batch=2, n=7, seed=1):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, n)).astype(np.int32)


# ----------------------------------------------------------------------------- logits equality
CASES = [
    # (model block_type, state-dict layout, position, n_kv_heads)
    ("recurrent", "recurrent", "alibi", 4),  # the released RT configuration
    ("recurrent", "recurrent", "alibi", 2),  # GQA (our extension for RT)
    ("recurrent", "recurrent", "rope", 1),  # RoPE + MQA (our extensions for RT)
    ("transformer", "sequential", "alibi", 2),  # the baseline, GQA (reference supports it)
    ("transformer", "sequential", "rope", 4),
    ("recurrent", "sequential", "alibi", 4),  # a sequential checkpoint loaded as an RT
]


@pytest.mark.parametrize(("block_type", "layout", "position", "n_kv"), CASES)
def test_logits_match_numpy_float64(x64, block_type, layout, position, n_kv):
    olmo_block = "recurrent" if layout == "recurrent" else "sequential"
    cfg = small_olmo_config(
        n_kv_heads=n_kv, alibi=position == "alibi", rope=position == "rope", block_type=olmo_block
    )
    weights = random_weights(cfg)
    model = from_olmo(
        cfg,
        to_state_dict(weights, layout),
        block_type=block_type,
        impl="reference",
        compute_dtype="float64",
    )
    assert model.config.block_type == block_type
    assert model.config.position == position
    assert model.config.n_kv_heads == n_kv
    tok = tokens(cfg)
    ours = np.asarray(model(tok))
    assert ours.dtype == np.float64
    expected = NumpyModel(cfg, weights).logits(tok, block_type)
    assert ours.shape == (2, 7, cfg["embedding_size"])
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)


def test_tiled_impl_matches_numpy_float64(x64):
    cfg = small_olmo_config(n_kv_heads=2)
    weights = random_weights(cfg, seed=3)
    model = from_olmo(
        cfg, to_state_dict(weights, "recurrent"), impl="tiled", compute_dtype="float64", leaf_size=4
    )
    assert model.config.impl == "tiled"
    tok = tokens(cfg, n=11, seed=4)  # 3 leaves of 4, the last one partial
    expected = NumpyModel(cfg, weights).logits(tok, "recurrent")
    np.testing.assert_allclose(np.asarray(model(tok)), expected, rtol=1e-10, atol=1e-10)


def test_float32_default_matches_numpy():
    cfg = small_olmo_config()
    weights = random_weights(cfg, seed=5)
    model = from_olmo(cfg, to_state_dict(weights, "recurrent"), impl="reference")
    assert model.config.block_type == "recurrent"  # from the config's block_type
    tok = tokens(cfg, batch=1, n=5)
    ours = model(tok)
    assert ours.dtype == np.float32
    expected = NumpyModel(cfg, weights).logits(tok, "recurrent")
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- params layout
def test_params_layout_and_transposes():
    cfg = small_olmo_config(n_kv_heads=2)
    weights = random_weights(cfg)
    config = config_from_olmo(cfg, impl="reference")
    params = params_from_olmo(to_state_dict(weights, "recurrent"), config)
    seq = params_from_olmo(to_state_dict(weights, "sequential"), config)
    kv_dim = 2 * 8
    lw = weights["layers"][1]
    blocks = params["blocks"]
    np.testing.assert_allclose(blocks["w_q"][1], lw["q_proj"].T.astype(np.float32))
    np.testing.assert_allclose(blocks["w_kv"][1][:, :kv_dim], lw["kv_proj"][:kv_dim].T, rtol=1e-6)
    np.testing.assert_allclose(blocks["w_kv"][1][:, kv_dim:], lw["kv_proj"][kv_dim:].T, rtol=1e-6)
    np.testing.assert_allclose(blocks["w_ff_out"][1], lw["ff_out"].T, rtol=1e-6)
    np.testing.assert_allclose(params["head"], weights["head"].T, rtol=1e-6)
    assert params["head"].dtype == np.float32
    ours = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ours)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(seq), strict=True):
        np.testing.assert_array_equal(a, b)


def test_block_groups_layout():
    cfg = small_olmo_config(n_layers=4, block_group_size=2)
    weights = random_weights(cfg)
    sd = to_state_dict(weights, "recurrent")
    grouped = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[1] == "blocks":
            i = int(parts[2])
            key = ".".join(["transformer", "block_groups", str(i // 2), str(i % 2)] + parts[3:])
        grouped[key] = value
    config = config_from_olmo(cfg, impl="reference")
    a = params_from_olmo(sd, config)
    b = params_from_olmo(grouped, config, block_group_size=2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="unexpected keys"):
        params_from_olmo(grouped, config)  # block_group_size=1 does not expect block_groups


# ----------------------------------------------------------------------------- state-dict errors
@pytest.fixture
def rt_setup():
    cfg = small_olmo_config()
    return (
        cfg,
        config_from_olmo(cfg, impl="reference"),
        to_state_dict(random_weights(cfg), "recurrent"),
    )


def test_aliases_are_optional(rt_setup):
    cfg, config, _ = rt_setup
    sd = to_state_dict(random_weights(cfg), "recurrent", aliases=False)
    params_from_olmo(sd, config)


def test_alias_that_differs_raises(rt_setup):
    _, config, sd = rt_setup
    key = "transformer.blocks.1.post_attention_block.ff_proj.weight"
    sd[key] = sd[key] + 1e-3
    with pytest.raises(ValueError, match=r"post_attention_block\.ff_proj\.weight differs from"):
        params_from_olmo(sd, config)


def test_missing_keys_listed(rt_setup):
    _, config, sd = rt_setup
    del sd["transformer.blocks.0.k_norm.weight"]
    del sd["transformer.ff_out.weight"]
    with pytest.raises(ValueError, match="missing keys") as err:
        params_from_olmo(sd, config)
    assert "transformer.blocks.0.k_norm.weight" in str(err.value)
    assert "transformer.ff_out.weight" in str(err.value)


def test_unexpected_keys_listed(rt_setup):
    _, config, sd = rt_setup
    sd["transformer.blocks.0.attn_out.bias"] = np.zeros(32)
    sd["transformer.wpe.weight"] = np.zeros((512, 32))
    with pytest.raises(ValueError, match="unexpected keys") as err:
        params_from_olmo(sd, config)
    assert "attn_out.bias" in str(err.value) and "wpe.weight" in str(err.value)


def test_wrong_shape_and_dtype_listed(rt_setup):
    _, config, sd = rt_setup
    sd["transformer.blocks.1.kv_proj.weight"] = np.zeros((32, 32))
    sd["transformer.blocks.1.pre_attention_block.kv_proj.weight"] = np.zeros((32, 32))
    sd["transformer.ln_f.weight"] = np.ones(32, dtype=np.int64)
    with pytest.raises(ValueError, match=r"kv_proj\.weight: shape \(32, 32\), expected \(64, 32\)"):
        params_from_olmo(sd, config)
    sd["transformer.blocks.1.kv_proj.weight"] = np.zeros((64, 32))
    sd["transformer.blocks.1.pre_attention_block.kv_proj.weight"] = np.zeros((64, 32))
    with pytest.raises(ValueError, match=r"ln_f\.weight: dtype int64"):
        params_from_olmo(sd, config)


def test_config_block_type_must_match_layout(rt_setup):
    cfg, _, sd = rt_setup
    with pytest.raises(ValueError, match="'sequential' layout") as err:
        from_olmo({**cfg, "block_type": "sequential"}, sd, impl="reference")
    assert "att_proj.weight" in str(err.value)


def test_layout_detected_without_block_type_field(rt_setup):
    cfg, _, _ = rt_setup
    cfg = {k: v for k, v in cfg.items() if k != "block_type"}
    weights = random_weights(cfg)
    seq_model = from_olmo(cfg, to_state_dict(weights, "sequential"), impl="reference")
    rt_model = from_olmo(cfg, to_state_dict(weights, "recurrent"), impl="reference")
    assert seq_model.config.block_type == "transformer"
    assert rt_model.config.block_type == "recurrent"


def test_float64_needs_x64(rt_setup):
    cfg, _, sd = rt_setup
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        from_olmo(cfg, sd, impl="reference", compute_dtype="float64")


# ----------------------------------------------------------------------------- config_from_olmo
def olmo_150m_config():
    """The model section of the released 150M RT run: base-c4-t5.yaml + 150m.yaml + sweep."""
    return {
        "d_model": 1024,
        "n_heads": 16,
        "mlp_hidden_size": 4096,
        "n_layers": 12,
        "max_sequence_length": 512,
        "rope": False,
        "alibi": True,
        "activation_type": "gelu",
        "flash_attention": False,
        "n_kv_heads": 16,
        "include_bias": False,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "block_type": "recurrent",
        "layer_norm_type": "default",
        "attention_layer_norm": True,
        "attention_layer_norm_with_affine": True,
        "layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "init_device": "cuda",
        "init_fn": "mitchell",
        "weight_tying": False,
        "vocab_size": 32100,
        "embedding_size": 32128,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "bwd_mlp_chunks": 4,
        "precision": "amp_bf16",
    }


def test_config_from_olmo_150m():
    config = config_from_olmo(olmo_150m_config())
    assert isinstance(config, ModelConfig)
    assert (config.d_model, config.n_heads, config.n_kv_heads, config.n_layers) == (
        1024,
        16,
        16,
        12,
    )
    assert (config.mlp_hidden, config.vocab_size, config.embedding_size) == (4096, 32100, 32128)
    assert (config.block_type, config.position, config.impl) == ("recurrent", "alibi", "tiled")
    assert config.alibi_bias_max == 8.0 and config.norm_eps == 1e-5
    assert config.non_embedding_params() == 151_045_120
    assert config.total_params() == 216_843_264
    # a whole train config works too (its "model" section is used)
    assert config_from_olmo({"model": olmo_150m_config(), "seed": 0}) == config
    baseline = config_from_olmo({**olmo_150m_config(), "block_type": "sequential"})
    assert baseline.block_type == "transformer"
    assert (
        config_from_olmo(olmo_150m_config(), block_type="transformer").block_type == "transformer"
    )


def test_config_from_olmo_defaults_and_derived_fields():
    cfg = olmo_150m_config()
    del cfg["mlp_hidden_size"], cfg["n_kv_heads"]
    cfg.update(mlp_ratio=2, embedding_size=None, rope=True, alibi=False, rope_theta=500_000)
    config = config_from_olmo(cfg, impl="reference")
    assert config.mlp_hidden == 2048 and config.n_kv_heads == 16
    assert config.embedding_size == 32100
    assert config.position == "rope" and config.rope_theta == 500_000.0
    assert config_from_olmo({**cfg, "multi_query_attention": True}).n_kv_heads == 1
    assert config_from_olmo({**cfg, "n_kv_heads": 4}).n_kv_heads == 4
    with pytest.raises(ValueError, match="multi_query_attention"):
        config_from_olmo({**cfg, "n_kv_heads": 4, "multi_query_attention": True})
    # fields that do not change the forward pass are accepted
    quiet = {"init_std": 0.5, "init_cutoff_factor": 2.0, "flash_attention": True}
    quiet |= {"rope_full_precision": False, "block_group_size": 4, "max_sequence_length": 8}
    assert config_from_olmo({**cfg, **quiet}, impl="reference") == config


UNSUPPORTED = [
    ("activation_type", "swiglu"),
    ("activation_type", "relu"),
    ("layer_norm_type", "rms"),
    ("layer_norm_type", "low_precision"),
    ("layer_norm_with_affine", False),
    ("attention_layer_norm", False),
    ("attention_layer_norm_with_affine", False),
    ("include_bias", True),
    ("bias_for_layer_norm", True),
    ("weight_tying", True),
    ("scale_logits", True),
    ("clip_qkv", 8.0),
    ("norm_after", True),
    ("embedding_layer_norm", True),
    ("attention_dropout", 0.1),
    ("residual_dropout", 0.1),
    ("embedding_dropout", 0.1),
    ("rope", True),  # with alibi: both on
    ("alibi", False),  # with rope off: learned position embeddings
    ("block_type", "llama"),
    ("block_group_size", 5),
    ("n_layers", "${model.n_layers}"),
    ("not_a_field", 1),
]


@pytest.mark.parametrize(("field", "value"), UNSUPPORTED)
def test_config_from_olmo_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_olmo({**olmo_150m_config(), field: value})


def test_missing_fields_mean_reference_defaults():
    # the reference's defaults are SwiGLU / biases / tied weights: a bare dict is not our model
    with pytest.raises(ValueError, match="activation_type"):
        config_from_olmo({"d_model": 64, "n_heads": 4})
    bias_default = {**olmo_150m_config()}
    del bias_default["include_bias"], bias_default["bias_for_layer_norm"]
    with pytest.raises(ValueError, match="include_bias"):
        config_from_olmo(bias_default)
    assert set(olmo_150m_config()) <= set(OLMO_DEFAULTS)


def test_config_errors_from_model_config_name_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        config_from_olmo({**olmo_150m_config(), "n_heads": 24, "n_kv_heads": 24})
    with pytest.raises(ValueError, match="embedding_size"):
        config_from_olmo({**olmo_150m_config(), "embedding_size": 100})
    with pytest.raises(ValueError, match="block_type"):
        config_from_olmo(olmo_150m_config(), block_type="sequential")
    with pytest.raises(ValueError, match="impl"):
        config_from_olmo(olmo_150m_config(), impl="cuda")
