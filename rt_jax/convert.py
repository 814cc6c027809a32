"""Load weights in the reference implementation's (OLMo-based PyTorch) format.

The reference code (GitHub ``geniucos/recurrent-transformer``) is built on OLMo. Its model config is
OLMo's ``ModelConfig`` (the ``model:`` section of the YAML) and its weights are a PyTorch state dict:

    transformer.wte.weight                      E x D      (embedding, E = embedding_size)
    transformer.blocks.{i}.attn_norm.weight     D          LayerNorm weights (no biases)
    transformer.blocks.{i}.ff_norm.weight       D
    transformer.blocks.{i}.q_norm.weight        D          QK-norm over the whole q vector
    transformer.blocks.{i}.k_norm.weight        G*K        ... and the whole k vector
    transformer.blocks.{i}.q_proj.weight        D x D      recurrent blocks ("recurrent", ...)
    transformer.blocks.{i}.kv_proj.weight       2GK x D    rows [k | v]
    transformer.blocks.{i}.att_proj.weight      (D+2GK) x D  sequential blocks: rows [q | k | v]
    transformer.blocks.{i}.attn_out.weight      D x D
    transformer.blocks.{i}.ff_proj.weight       F x D
    transformer.blocks.{i}.ff_out.weight        D x F
    transformer.ln_f.weight                     D
    transformer.ff_out.weight                   E x D      (untied LM head)

Linear weights are PyTorch's out x in; ours are in x out, so they are transposed. A recurrent block
registers its shared submodules a second time under ``pre_attention_block.*`` and
``post_attention_block.*``; a PyTorch ``state_dict()`` therefore holds those alias keys too. They are
accepted when they equal the canonical tensors. With ``block_group_size > 1`` the blocks live under
``transformer.block_groups.{g}.{j}`` (layer ``g * block_group_size + j``).

Config fields: a field missing from the dict takes the reference's default (OLMo's defaults are
GPT-2-like: SwiGLU, biases, weight tying, 0.1 dropouts; so a minimal dict is rejected, as it would
describe a model we do not implement). Fields that do not change the computation (init settings,
token ids, ``max_sequence_length``, ``flash_attention``, ``precision``, ...) are accepted and ignored.
A value that would change the computation in a way rt-jax does not implement raises ``ValueError``
naming the field. Nonzero dropouts are rejected too: rt-jax has no dropout, so a converted model
would train differently from the reference (evaluation-mode logits do not depend on dropout; set the
dropouts to 0.0 in the dict to load such weights for inference).

Beyond the reference (our extensions): RoPE and GQA with recurrent blocks, and converting between
layouts (a sequential checkpoint into a recurrent model and back, copying every weight including the
norms, unlike the reference's ``init_from_sequential_block``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rt_jax.config import ModelConfig
from rt_jax.models.lm import LanguageModel, PyTree

OLMO_DEFAULTS: dict[str, Any] = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "clip_qkv": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "alibi_bias_max": 8.0,
    "rope": False,
    "rope_full_precision": True,
    "rope_theta": 10_000,
    "flash_attention": False,
    "attention_dropout": 0.1,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "residual_dropout": 0.1,
    "embedding_dropout": 0.1,
    "embedding_layer_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "layer_norm_eps": 1e-5,
    "tanh_norm_alpha": 1.0,
    "tanh_trainable_alpha": False,
    "attention_layer_norm_with_affine": True,
    "max_sequence_length": 1024,
    "bwd_mlp_chunks": 1,
    "include_bias": True,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
    "init_device": None,
    "init_fn": "normal",
    "init_std": 0.02,
    "init_cutoff_factor": None,
    "precision": None,
    "scale_emb_init": False,
    "emb_init_std": None,
    "norm_after": False,
}
"""The reference ``ModelConfig`` fields and their defaults (a missing field means this value)."""

RECURRENT_BLOCK_TYPES = ("recurrent", "recurrent_autograd")
SEQUENTIAL_BLOCK_TYPES = ("sequential",)

# Our per-layer parameter name -> (reference module name, transpose?) for the shared modules.
_COMMON_BLOCK_KEYS = {
    "attn_norm": ("attn_norm", False),
    "ff_norm": ("ff_norm", False),
    "q_norm": ("q_norm", False),
    "k_norm": ("k_norm", False),
    "w_o": ("attn_out", True),
    "w_ff_in": ("ff_proj", True),
    "w_ff_out": ("ff_out", True),
}
_RECURRENT_ALIASES = {
    "pre_attention_block.attn_norm": "attn_norm",
    "pre_attention_block.q_proj": "q_proj",
    "pre_attention_block.kv_proj": "kv_proj",
    "pre_attention_block.q_norm": "q_norm",
    "pre_attention_block.k_norm": "k_norm",
    "post_attention_block.attn_norm": "attn_norm",
    "post_attention_block.ff_norm": "ff_norm",
    "post_attention_block.ff_proj": "ff_proj",
    "post_attention_block.ff_out": "ff_out",
}
_MAX_LISTED = 20


def _model_section(olmo_config: Mapping[str, Any]) -> dict[str, Any]:
    """The model fields: the dict itself, or its ``model`` section if given a whole train config."""
    if not isinstance(olmo_config, Mapping):
        raise ValueError(f"olmo_config must be a dict of model fields, got {type(olmo_config)}")
    if "d_model" not in olmo_config and isinstance(olmo_config.get("model"), Mapping):
        olmo_config = olmo_config["model"]
    return dict(olmo_config)


def _resolved_fields(olmo_config: Mapping[str, Any]) -> dict[str, Any]:
    """Reference defaults overlaid with the given fields; unknown field names raise."""
    given = _model_section(olmo_config)
    unknown = sorted(set(given) - set(OLMO_DEFAULTS))
    if unknown:
        raise ValueError(
            f"olmo_config has unknown fields {unknown}; expected fields of the reference "
            f"ModelConfig: {sorted(OLMO_DEFAULTS)}"
        )
    fields = {**OLMO_DEFAULTS, **given}
    for name in ("d_model", "n_heads", "n_layers", "mlp_ratio", "vocab_size", "block_group_size"):
        _require_int(fields, name)
    for name in ("n_kv_heads", "mlp_hidden_size", "embedding_size"):
        if fields[name] is not None:
            _require_int(fields, name)
    return fields


def _require_int(fields: Mapping[str, Any], name: str) -> None:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"olmo_config field {name}={value!r} must be an int (resolve YAML interpolations "
            "such as ${model.n_heads} before passing the dict)"
        )


def _unsupported(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"olmo_config field {name}={value!r} is not supported: {why}")


def _check_supported(fields: Mapping[str, Any]) -> None:
    """Raise ValueError for any field whose value changes the computation in a way we lack."""
    must_equal = {
        "activation_type": ("gelu", "only the exact (erf) GELU MLP is implemented"),
        "layer_norm_type": (
            "default",
            "only the default LayerNorm (mean-subtracting) is implemented",
        ),
        "layer_norm_with_affine": (True, "our LayerNorms always have a weight"),
        "attention_layer_norm": (True, "rt-jax always applies QK-LayerNorm; set it to true"),
        "attention_layer_norm_with_affine": (True, "our QK-norms always have a weight"),
        "include_bias": (False, "linear layers have no biases in rt-jax"),
        "weight_tying": (False, "rt-jax has an untied LM head"),
        "scale_logits": (False, "logits are not scaled in rt-jax"),
        "clip_qkv": (None, "q/k/v clipping is not implemented"),
        "norm_after": (False, "only pre-norm blocks are implemented"),
        "embedding_layer_norm": (False, "there is no embedding LayerNorm in rt-jax"),
    }
    for name, (wanted, why) in must_equal.items():
        value = fields[name]
        strict = wanted is None or isinstance(wanted, bool)  # YAML booleans: no 0/1 stand-ins
        if (value is not wanted) if strict else (value != wanted):
            raise _unsupported(name, value, f"{why} (need {wanted!r})")
    bias_ln = fields["bias_for_layer_norm"]
    if bias_ln is None:
        bias_ln = fields["include_bias"]
    if bias_ln:
        raise _unsupported("bias_for_layer_norm", fields["bias_for_layer_norm"], "no norm biases")
    for name in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        if fields[name] != 0:
            raise _unsupported(
                name,
                fields[name],
                "rt-jax has no dropout; set it to 0.0 (evaluation logits do not depend on it)",
            )
    if fields["alibi"] and fields["rope"]:
        raise _unsupported("alibi", True, "alibi and rope are mutually exclusive; set one")
    if not (fields["alibi"] or fields["rope"]):
        raise _unsupported(
            "alibi",
            False,
            "with neither alibi nor rope the reference learns position embeddings "
            "(wpe), which rt-jax does not implement; set alibi or rope to true",
        )
    block_type = fields["block_type"]
    if block_type not in RECURRENT_BLOCK_TYPES + SEQUENTIAL_BLOCK_TYPES:
        raise _unsupported(
            "block_type",
            block_type,
            f"expected one of {RECURRENT_BLOCK_TYPES + SEQUENTIAL_BLOCK_TYPES}",
        )
    group = fields["block_group_size"]
    if group <= 0 or fields["n_layers"] % group:
        raise _unsupported("block_group_size", group, "it must be positive and divide n_layers")


def _n_kv_heads(fields: Mapping[str, Any]) -> int:
    """The reference's ``effective_n_kv_heads``."""
    n_kv, mqa, n_heads = fields["n_kv_heads"], fields["multi_query_attention"], fields["n_heads"]
    if n_kv is None:
        return 1 if mqa is True else n_heads
    if mqa is None:
        return n_kv
    if n_kv != (1 if mqa else n_heads):
        raise ValueError(
            f"olmo_config sets both multi_query_attention={mqa!r} and n_kv_heads={n_kv}, which "
            "disagree: drop multi_query_attention (deprecated) and keep n_kv_heads"
        )
    return n_kv


def _model_block_type(block_type: str | None, olmo_block_type: str) -> str:
    """Our block type: the argument, or the one the reference config names."""
    if block_type is None:
        return "recurrent" if olmo_block_type in RECURRENT_BLOCK_TYPES else "transformer"
    return block_type


def config_from_olmo(
    olmo_config: Mapping[str, Any],
    block_type: str | None = None,
    impl: str = "tiled",
    interpret: bool = False,
    *,
    compute_dtype: str = "float32",
    leaf_size: int = 32,
) -> ModelConfig:
    """The ``ModelConfig`` described by a reference (OLMo) model config dict.

    ``block_type`` ("recurrent" or "transformer") defaults to the one the dict's ``block_type``
    names (``sequential`` -> "transformer", ``recurrent``/``recurrent_autograd`` -> "recurrent").
    """
    fields = _resolved_fields(olmo_config)
    _check_supported(fields)
    d_model, n_heads = fields["d_model"], fields["n_heads"]
    mlp_hidden = fields["mlp_hidden_size"]
    if mlp_hidden is None:
        mlp_hidden = fields["mlp_ratio"] * d_model
    embedding_size = fields["embedding_size"]
    if embedding_size is None:
        embedding_size = fields["vocab_size"]
    return ModelConfig(
        vocab_size=int(fields["vocab_size"]),
        d_model=int(d_model),
        n_heads=int(n_heads),
        n_layers=int(fields["n_layers"]),
        n_kv_heads=int(_n_kv_heads(fields)),
        mlp_hidden=int(mlp_hidden),
        embedding_size=int(embedding_size),
        block_type=_model_block_type(block_type, fields["block_type"]),
        impl=impl,
        position="alibi" if fields["alibi"] else "rope",
        alibi_bias_max=float(fields["alibi_bias_max"]),
        rope_theta=float(fields["rope_theta"]),
        norm_eps=float(fields["layer_norm_eps"]),
        compute_dtype=compute_dtype,
        leaf_size=leaf_size,
        interpret=interpret,
    )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def _canonical_key(key: str, block_group_size: int) -> str:
    """Rename ``transformer.block_groups.{g}.{j}.*`` keys to ``transformer.blocks.{i}.*``."""
    match = re.fullmatch(r"transformer\.block_groups\.(\d+)\.(\d+)\.(.+)", key)
    if match is None or block_group_size == 1:
        return key
    g, j, rest = int(match[1]), int(match[2]), match[3]
    if j >= block_group_size:
        return key  # reported as unexpected
    return f"transformer.blocks.{g * block_group_size + j}.{rest}"


def _detect_layout(keys: set[str]) -> str:
    """ "sequential" when the blocks have fused ``att_proj`` weights, else "recurrent"."""
    if any(k.endswith(".att_proj.weight") for k in keys):
        return "sequential"
    return "recurrent"


def params_from_olmo(
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    layout: str | None = None,
    block_group_size: int = 1,
) -> PyTree:
    """Our parameter pytree (``init_params`` layout) from a reference-format state dict.

    ``layout`` is "recurrent" (``q_proj`` + ``kv_proj``) or "sequential" (``att_proj``); by default
    it is read off the keys. Missing, unexpected, misshapen or non-float entries and alias keys that
    differ from their canonical tensor raise one ``ValueError`` listing all of them.
    """
    if config.compute_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            'compute_dtype="float64" needs jax.config.update("jax_enable_x64", True) first'
        )
    dtype = np.float64 if config.compute_dtype == "float64" else np.float32
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a dict of arrays, got {type(state_dict)}")
    arrays: dict[str, Any] = {}
    for key, value in state_dict.items():
        arrays[_canonical_key(str(key), block_group_size)] = value
    if layout is None:
        layout = _detect_layout(set(arrays))
    if layout not in ("recurrent", "sequential"):
        raise ValueError(f"layout={layout!r}: expected 'recurrent' or 'sequential'")

    d, f, e = config.d_model, config.mlp_hidden, config.embedding_size
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    module_shapes = {
        "attn_norm": (d,),
        "ff_norm": (d,),
        "q_norm": (q_dim,),
        "k_norm": (kv_dim,),
        "attn_out": (d, q_dim),
        "ff_proj": (f, d),
        "ff_out": (d, f),
    }
    if layout == "recurrent":
        module_shapes |= {"q_proj": (q_dim, d), "kv_proj": (2 * kv_dim, d)}
    else:
        module_shapes |= {"att_proj": (q_dim + 2 * kv_dim, d)}
    expected = {"transformer.wte.weight": (e, d), "transformer.ln_f.weight": (d,)}
    expected["transformer.ff_out.weight"] = (e, d)
    aliases: dict[str, str] = {}
    for i in range(config.n_layers):
        prefix = f"transformer.blocks.{i}."
        for name, shape in module_shapes.items():
            expected[f"{prefix}{name}.weight"] = shape
        if layout == "recurrent":
            for alias, target in _RECURRENT_ALIASES.items():
                aliases[f"{prefix}{alias}.weight"] = f"{prefix}{target}.weight"

    missing = sorted(k for k in expected if k not in arrays)
    unexpected = sorted(k for k in arrays if k not in expected and k not in aliases)
    problems = []
    loaded: dict[str, np.ndarray] = {}
    for key in sorted(k for k in arrays if k in expected or k in aliases):
        try:
            value = np.asarray(arrays[key])
        except (TypeError, ValueError, RuntimeError) as err:
            problems.append(f"{key}: not convertible to NumPy ({err}); pass .float().numpy()")
            continue
        shape = expected.get(key) or expected[aliases[key]]
        if value.shape != shape:
            problems.append(f"{key}: shape {value.shape}, expected {shape}")
        elif not jnp.issubdtype(value.dtype, jnp.floating):
            problems.append(f"{key}: dtype {value.dtype}, expected a float array")
        else:
            loaded[key] = value
    for alias, target in aliases.items():
        if (
            alias in loaded
            and target in loaded
            and not np.array_equal(loaded[alias], loaded[target])
        ):
            problems.append(
                f"{alias} differs from {target}: the reference shares one module under both "
                "names, so they must be equal"
            )
    if missing or unexpected or problems:
        lines = ["the state dict does not match the reference format for this config:"]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if problems:
            lines.append(f"bad entries ({len(problems)}): {_listed(problems)}")
        other = "sequential" if layout == "recurrent" else "recurrent"
        if any(k.endswith(("att_proj.weight", "kv_proj.weight")) for k in unexpected):
            lines.append(
                f"(expected the {layout!r} layout; the keys look like the {other!r} one: check "
                "the config's block_type)"
            )
        raise ValueError("\n".join(lines))

    def get(key: str, transpose: bool) -> np.ndarray:
        value = loaded[key].astype(dtype)
        return value.T if transpose else value

    layers = []
    for i in range(config.n_layers):
        prefix = f"transformer.blocks.{i}."
        layer = {
            ours: get(f"{prefix}{ref}.weight", t) for ours, (ref, t) in _COMMON_BLOCK_KEYS.items()
        }
        if layout == "recurrent":
            layer["w_q"] = get(f"{prefix}q_proj.weight", True)
            layer["w_kv"] = get(f"{prefix}kv_proj.weight", True)
        else:
            fused = get(f"{prefix}att_proj.weight", True)  # D x (q | k | v)
            layer["w_q"], layer["w_kv"] = fused[:, :q_dim], fused[:, q_dim:]
        layers.append(layer)
    blocks = {name: jnp.asarray(np.stack([lay[name] for lay in layers])) for name in layers[0]}
    return {
        "embed": jnp.asarray(get("transformer.wte.weight", False)),
        "blocks": blocks,
        "ln_f": jnp.asarray(get("transformer.ln_f.weight", False)),
        "head": jnp.asarray(get("transformer.ff_out.weight", True)),
    }


def from_olmo(
    olmo_config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    block_type: str | None = None,
    impl: str = "tiled",
    interpret: bool = False,
    *,
    compute_dtype: str = "float32",
    leaf_size: int = 32,
) -> LanguageModel:
    """A ``LanguageModel`` holding reference-format weights; its logits equal the reference's.

    ``block_type`` ("recurrent" or "transformer") picks our model; by default it follows the
    config's ``block_type`` (or, when the dict does not set it, the state dict's layout). The state
    dict's layout (fused ``att_proj`` or ``q_proj`` + ``kv_proj``) follows the config's
    ``block_type`` when set, else the keys.
    """
    fields = _resolved_fields(olmo_config)
    given = _model_section(olmo_config)
    if "block_type" in given:
        layout = "sequential" if given["block_type"] in SEQUENTIAL_BLOCK_TYPES else "recurrent"
    else:
        layout = _detect_layout(set(state_dict)) if isinstance(state_dict, Mapping) else "recurrent"
        fields = {**fields, "block_type": layout}
    if block_type is None:
        block_type = _model_block_type(None, fields["block_type"])
    config = config_from_olmo(
        fields, block_type, impl, interpret, compute_dtype=compute_dtype, leaf_size=leaf_size
    )
    params = params_from_olmo(
        state_dict, config, layout=layout, block_group_size=fields["block_group_size"]
    )
    return LanguageModel(config, params=params)


# ----------------------------------------------------------------------------- export (to_olmo)
OLMO_CONFIG_FILE = "config.yaml"
OLMO_WEIGHTS_FILE = "model.safetensors"


def config_to_olmo(config: ModelConfig, *, max_sequence_length: int | None = None) -> dict:
    """The reference (OLMo) model fields that ``config_from_olmo`` maps back to ``config``.

    Only standard models (Transformer: ``sequential`` blocks; RT: ``recurrent`` blocks) have a
    reference format; LRT and recursive models raise ``ValueError``.
    """
    if config.family != "standard":
        raise ValueError(
            f"the reference format holds Transformer and RT models only; this config is a "
            f"{config.family!r} model (export its weights with Orbax instead)"
        )
    fields: dict[str, Any] = {
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "n_layers": config.n_layers,
        "mlp_hidden_size": config.mlp_hidden,
        "activation_type": "gelu",
        "block_type": "recurrent" if config.block_type == "recurrent" else "sequential",
        "alibi": config.position == "alibi",
        "rope": config.position == "rope",
        "alibi_bias_max": float(config.alibi_bias_max),
        "rope_theta": float(config.rope_theta),
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "attention_layer_norm": True,
        "attention_layer_norm_with_affine": True,
        "layer_norm_type": "default",
        "layer_norm_with_affine": True,
        "layer_norm_eps": float(config.norm_eps),
        "bias_for_layer_norm": False,
        "include_bias": False,
        "weight_tying": False,
        "vocab_size": config.vocab_size,
        "embedding_size": config.embedding_size,
    }
    if max_sequence_length is not None:
        fields["max_sequence_length"] = int(max_sequence_length)
    return fields


def params_to_olmo(
    params: PyTree, config: ModelConfig, *, layout: str | None = None, aliases: bool = True
) -> dict[str, np.ndarray]:
    """A reference-format state dict (NumPy, PyTorch's out x in) of our parameter pytree.

    ``layout`` defaults to the block type's ("recurrent" for RT, "sequential" for a Transformer).
    With ``aliases`` a recurrent layout also carries the ``pre_/post_attention_block.*`` copies
    that the reference's ``state_dict()`` holds, so ``load_state_dict(strict=True)`` accepts it.
    """
    config_to_olmo(config)  # family check
    if layout is None:
        layout = "recurrent" if config.block_type == "recurrent" else "sequential"
    if layout not in ("recurrent", "sequential"):
        raise ValueError(f"layout={layout!r}: expected 'recurrent' or 'sequential'")

    def host(x: Any) -> np.ndarray:
        return np.asarray(jax.device_get(x))

    blocks = {name: host(value) for name, value in params["blocks"].items()}
    state: dict[str, np.ndarray] = {
        "transformer.wte.weight": host(params["embed"]),
        "transformer.ln_f.weight": host(params["ln_f"]),
        "transformer.ff_out.weight": np.ascontiguousarray(host(params["head"]).T),
    }
    for i in range(config.n_layers):
        prefix = f"transformer.blocks.{i}."
        for ours, (ref, transpose) in _COMMON_BLOCK_KEYS.items():
            value = blocks[ours][i]
            state[f"{prefix}{ref}.weight"] = np.ascontiguousarray(value.T if transpose else value)
        w_q, w_kv = blocks["w_q"][i], blocks["w_kv"][i]
        if layout == "sequential":
            fused = np.concatenate([w_q, w_kv], axis=1)  # D x (q | k | v)
            state[f"{prefix}att_proj.weight"] = np.ascontiguousarray(fused.T)
            continue
        state[f"{prefix}q_proj.weight"] = np.ascontiguousarray(w_q.T)
        state[f"{prefix}kv_proj.weight"] = np.ascontiguousarray(w_kv.T)
        if aliases:
            for alias, target in _RECURRENT_ALIASES.items():
                state[f"{prefix}{alias}.weight"] = state[f"{prefix}{target}.weight"]
    return state


def to_olmo(
    model: Any,
    directory: str | None = None,
    *,
    layout: str | None = None,
    aliases: bool = True,
    max_sequence_length: int | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """The reference (OLMo) model config and state dict of ``model``; with ``directory``, also
    written there as ``config.yaml`` + ``model.safetensors`` (see ``save_olmo``).

    ``model`` is a ``LanguageModel`` (anything with ``.config`` and ``.params()``). ``from_olmo``
    of the result gives back bitwise the same parameters.
    """
    config = model.config
    olmo_config = config_to_olmo(config, max_sequence_length=max_sequence_length)
    state = params_to_olmo(model.params(), config, layout=layout, aliases=aliases)
    if layout is not None:
        olmo_config["block_type"] = layout
    if directory is not None:
        save_olmo(directory, olmo_config, state)
    return olmo_config, state


def _olmo_key(key: str) -> str:
    """The key OLMo's ``safetensors_util`` writes for a flat state-dict entry ``key``."""
    import base64
    import pickle

    return base64.urlsafe_b64encode(pickle.dumps(((key,), False))).decode("ascii")


def _unpickle_plain(data: bytes) -> Any:
    """Unpickle ``data`` allowing no globals (OLMo's keys are tuples of str and a bool)."""
    import io
    import pickle

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a key")

    return NoGlobals(io.BytesIO(data)).load()


def _decode_olmo_key(key: str) -> str | None:
    """The state-dict key an OLMo-encoded safetensors key stands for; None if it is a plain key."""
    import base64
    import binascii
    import pickle

    if key.startswith("transformer."):
        return None
    try:
        keys, pickled = _unpickle_plain(base64.urlsafe_b64decode(key.encode("ascii")))
    except (binascii.Error, pickle.UnpicklingError, ValueError, TypeError, EOFError):
        return None
    if pickled or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"safetensors key {key!r} holds a pickled non-tensor value: not weights")
    return ".".join(keys)


def save_olmo(
    directory: str,
    olmo_config: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    olmo_keys: bool = True,
) -> None:
    """Write ``config.yaml`` (``model:`` section) and ``model.safetensors`` into ``directory``.

    With ``olmo_keys`` (default) the tensor names are encoded the way the reference's
    ``olmo/safetensors_util.py`` writes them, so its checkpoint loader reads the file next to (or
    instead of) ``model.pt``; ``olmo_keys=False`` writes the plain ``transformer.*`` names.
    ``load_olmo`` reads both.
    """
    import os

    import yaml
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {
        (_olmo_key(k) if olmo_keys else k): np.ascontiguousarray(v) for k, v in state_dict.items()
    }
    save_file(tensors, os.path.join(directory, OLMO_WEIGHTS_FILE))
    with open(os.path.join(directory, OLMO_CONFIG_FILE), "w") as f:
        yaml.safe_dump({"model": dict(olmo_config)}, f, sort_keys=False)


def is_olmo_dir(path: str) -> bool:
    """True when ``path`` is a directory holding a reference-format checkpoint."""
    import os

    names = (OLMO_WEIGHTS_FILE, "model.pt")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)


def load_olmo(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(model config fields, state dict) of a reference-format checkpoint directory.

    The directory holds ``config.yaml`` (or ``config.json``; a whole train config or its
    ``model`` section) and ``model.safetensors`` (plain or OLMo-encoded keys). A ``model.pt``
    alone is refused (reading it needs PyTorch): convert it once with PyTorch, e.g.
    ``safetensors.torch.save_file({k: v.clone() for k, v in torch.load("model.pt").items()},
    "model.safetensors")`` (``clone``: the alias keys share storage).
    """
    import json
    import os

    import yaml
    from safetensors.numpy import load_file

    config_path = None
    for name in (OLMO_CONFIG_FILE, "config.json"):
        if os.path.exists(os.path.join(directory, name)):
            config_path = os.path.join(directory, name)
            break
    if config_path is None:
        raise ValueError(f"{directory} has no {OLMO_CONFIG_FILE} or config.json (model config)")
    with open(config_path) as f:
        raw = json.load(f) if config_path.endswith(".json") else yaml.safe_load(f)
    weights = os.path.join(directory, OLMO_WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise ValueError(
            f"{directory} has no {OLMO_WEIGHTS_FILE}; a model.pt needs PyTorch to read: convert "
            "it once with safetensors.torch.save_file({k: v.clone() for k, v in "
            'torch.load("model.pt").items()}, "model.safetensors") (clone: the alias keys share '
            "storage)"
        )
    state = {}
    for key, value in load_file(weights).items():
        name = _decode_olmo_key(key)
        state[key if name is None else name] = value
    return _model_section(raw), state
