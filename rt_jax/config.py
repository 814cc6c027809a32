"""Model configuration: a frozen, validated dataclass made of smaller frozen sections.

``ModelConfig`` holds the core fields every model has (vocabulary, shape, block type, attention
position scheme, dtype, implementation); a model family's own knobs live in its section:
``memory=MemoryConfig(...)`` (the LRT memory pathway) and ``loop=LoopConfig(...)`` (recursive
layouts and MeSH hand-offs). Each section validates itself; ``ModelConfig`` checks how a section
fits the core fields. This module imports no model code: ``family`` only names which registered
family (``rt_jax.models.family``) runs a config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rt_jax.ops.block import ATTENTIONS, BLOCK_STYLES, DTYPES, POSITION_KINDS, AttentionSpec

BLOCK_TYPES = ("transformer", "recurrent")
IMPLS = ("reference", "tiled", "pallas")
MEMORY_KINDS = ("none", "shared", "layerwise")
MEMORY_INJECTIONS = ("both", "kv", "residual")
MEMORY_TRAININGS = ("interleaved", "refine", "chunked")
MEMORY_PREFILLS = ("exact", "parallel")
HANDOFFS = ("base", "residual", "anchor", "anchor-emb", "mesh")
OUTPUT_INITS = ("auto", "layer", "depth")

_LAYOUT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*R\s*(\d+)\s*\+\s*(\d+)\s*$")
_EXAMPLE = "e.g. loop='2+4R2+2' (2 prelude layers, 4 core layers looped twice, 2 coda layers)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelConfig.{where}={value!r}: expected {allowed}")


# --------------------------------------------------------------------------------------------
# LRT: the memory pathway (rt_jax.models.lrt).


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The LRT memory pathway; ``kind="none"`` (the default) means no memory.

    ``kind``: "shared" (one memory K/V projection for every layer) or "layerwise" (one per layer).
    ``layer``: the source state (-1 = the final normalised state, i >= 0 = the output of layer i).
    ``injection``: "both", "kv" (gates and memory K/V only) or "residual" (gamma only).
    ``training``: "interleaved" (``passes`` = S strided position subsets), "refine"
    (``passes`` = K extra full passes) or "chunked" (``passes`` = S contiguous chunks in order:
    the memory crosses chunk boundaries only). ``reset_token``: the memory is zero at a position whose
    previous input token is this id (a document separator such as EOS); -1 = never reset.

    Reference-code options (docs/lrt.md): ``kv_refresh`` (interleaved: before each subset pass,
    update the buffered K/V of not-yet-visited positions with the latest memory, the cheap
    delta through W_kvmem); ``pass_weights`` (loss weight of each pass, pass 0 first: S+1 or K+1
    non-negative numbers; empty = equal); ``detach`` (stop gradients through the memory handed
    from one pass to the next); ``gate_lr_scale`` (learning-rate multiplier of gamma and the
    gates, their own optimiser group); ``eval_bucket`` (the exact CE is also reported per bucket
    of this many positions when the sequence is longer; 0 = off); ``prefill`` ("exact": the
    prompt token by token; "parallel": APPROXIMATE, the training passes over the prompt).
    """

    kind: str = "none"
    layer: int = -1
    injection: str = "both"
    training: str = "interleaved"
    passes: int = 2
    reset_token: int = -1
    kv_refresh: bool = False
    pass_weights: tuple[float, ...] = ()
    detach: bool = False
    gate_lr_scale: float = 1.0
    eval_bucket: int = 256
    prefill: str = "exact"

    def __post_init__(self) -> None:
        _check_choice("memory.kind", self.kind, MEMORY_KINDS)
        _check_choice("memory.injection", self.injection, MEMORY_INJECTIONS)
        _check_choice("memory.training", self.training, MEMORY_TRAININGS)
        if not _is_int(self.reset_token) or self.reset_token < -1:
            raise ValueError(
                f"ModelConfig.memory.reset_token={self.reset_token!r}: use -1 (never reset the "
                "LRT memory) or a token id, e.g. the EOS id"
            )
        if not self.enabled:
            return
        if not _is_int(self.passes) or self.passes < 1:
            raise ValueError(
                f"ModelConfig.memory.passes={self.passes!r} must be a positive int (interleaved: "
                "the number S of position subsets; refine: the number K of extra full passes)"
            )
        if not _is_int(self.layer) or self.layer < -1:
            raise ValueError(
                f"ModelConfig.memory.layer={self.layer!r}: use -1 (the final normalised state) "
                "or a layer index >= 0"
            )
        _check_choice("memory.prefill", self.prefill, MEMORY_PREFILLS)
        if self.kv_refresh and (self.training == "refine" or not self.uses_kv()):
            raise ValueError(
                "ModelConfig.memory.kv_refresh=True refreshes the buffered K/V of interleaved "
                f"training through W_kvmem: it needs training 'interleaved' or 'chunked' (got "
                f"{self.training!r}) and injection 'both' or 'kv' (got {self.injection!r})"
            )
        n_passes = self.passes + 1
        weights = self.pass_weights
        if weights and (
            len(weights) != n_passes
            or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights)
            or sum(weights) <= 0
        ):
            raise ValueError(
                f"ModelConfig.memory.pass_weights={weights!r}: give {n_passes} non-negative "
                f"numbers (pass 0, then the {self.passes} passes of memory.passes) with a positive "
                "sum, or () for equal weights"
            )
        if not isinstance(self.gate_lr_scale, (int, float)) or not self.gate_lr_scale > 0:
            raise ValueError(
                f"ModelConfig.memory.gate_lr_scale={self.gate_lr_scale!r}: use a positive "
                "learning-rate multiplier for gamma and the gates (1.0 = the base lr)"
            )
        if not _is_int(self.eval_bucket) or self.eval_bucket < 0:
            raise ValueError(
                f"ModelConfig.memory.eval_bucket={self.eval_bucket!r}: use a number of positions "
                "per bucket of the sequential CE (0 = no buckets)"
            )

    @property
    def enabled(self) -> bool:
        """Whether the model has an LRT memory."""
        return self.kind != "none"

    def check_model(self, model: ModelConfig) -> None:
        """Raise ValueError unless this memory fits the core fields of ``model``."""
        if not -1 <= self.reset_token < model.vocab_size:
            raise ValueError(
                f"ModelConfig.memory.reset_token={self.reset_token!r}: use -1 (never reset the "
                f"LRT memory) or a token id in [0, vocab_size={model.vocab_size}), e.g. the EOS id"
            )
        if not self.enabled:
            return
        if model.block_type != "transformer":
            raise ValueError(
                f"LRT (memory.kind={self.kind!r}) runs on the Transformer block only, got "
                f"block_type={model.block_type!r}: set block_type='transformer' or "
                "memory.kind='none'"
            )
        if self.layer >= model.n_layers:
            raise ValueError(
                f"ModelConfig.memory.layer={self.layer!r}: use -1 (the final normalised state) or "
                f"a layer index in [0, n_layers={model.n_layers})"
            )

    def uses_residual(self) -> bool:
        """Whether the memory is added to the residual stream (gamma)."""
        return self.injection in ("both", "residual")

    def uses_kv(self) -> bool:
        """Whether the memory is mixed into the keys and values (gates and W_kvmem)."""
        return self.injection in ("both", "kv")

    def extra_params(self, model: ModelConfig) -> int:
        """Parameters the memory pathway adds to the baseline Transformer (0 without memory):
        gamma (L), gates (L x D x 2G) and W_kvmem (D x 2C, once or per layer)."""
        if not self.enabled:
            return 0
        n_layers, d = model.n_layers, model.d_model
        kv_dim = model.n_kv_heads * model.head_dim
        count = n_layers if self.uses_residual() else 0
        if self.uses_kv():
            projections = 1 if self.kind == "shared" else n_layers
            count += n_layers * d * 2 * model.n_kv_heads + projections * d * 2 * kv_dim
        return count


# --------------------------------------------------------------------------------------------
# Recursive models and MeSH (rt_jax.models.recursive).


@dataclasses.dataclass(frozen=True)
class LoopLayout:
    """A parsed ``Lpre+LcoreRNloop+Lcoda`` layout; ``tied=False``: every core iteration has its
    own weights (the paper's Table 6 "untied cores")."""

    prelude: int
    core: int
    n_loop: int
    coda: int
    tied: bool = True

    @property
    def core_stored(self) -> int:
        """Stored core layers: Lcore when tied, Nloop * Lcore when untied."""
        return self.core if self.tied else self.n_loop * self.core

    @property
    def distinct_layers(self) -> int:
        """Layers with their own weights: Lpre + Lcore + Lcoda (untied: Lpre + Nloop*Lcore + Lcoda)."""
        return self.prelude + self.core_stored + self.coda

    @property
    def depth(self) -> int:
        """Layers in the unrolled graph: Lpre + Nloop * Lcore + Lcoda."""
        return self.prelude + self.n_loop * self.core + self.coda

    def unrolled_layers(self) -> tuple[int, ...]:
        """Index into the stored blocks of every unrolled layer, in execution order."""
        pre = tuple(range(self.prelude))
        if self.tied:
            core = tuple(range(self.prelude, self.prelude + self.core)) * self.n_loop
        else:
            core = tuple(range(self.prelude, self.prelude + self.core_stored))
        coda = tuple(range(self.prelude + self.core_stored, self.distinct_layers))
        return pre + core + coda


def parse_layout(text: str, tied: bool = True) -> LoopLayout:
    """Parse ``"Lpre+LcoreRNloop+Lcoda"``; ValueError with an example on a bad string."""
    match = _LAYOUT.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"loop layout {text!r} is not 'Lpre+LcoreRNloop+Lcoda': {_EXAMPLE}")
    pre, core, n_loop, coda = (int(g) for g in match.groups())
    if core < 1 or n_loop < 1:
        raise ValueError(
            f"loop layout {text!r} needs at least one core layer and one loop iteration: {_EXAMPLE}"
        )
    return LoopLayout(pre, core, n_loop, coda, tied)


def router_params(d_model: int, n_loop: int, slots: int) -> int:
    """MeSH router parameters: (Nloop+1) write/read pairs of a D->S linear layer with bias."""
    return (n_loop + 1) * d_model * slots * 2 + 2 * (n_loop + 1) * slots


HANDOFF_TERMS = ("residual", "anchor", "anchor-emb")
"""The supplementary states a hand-off adds to f(h^(t)): h^(t), h^(0), the embeddings e."""
ALPHAS = ("fixed", "static", "dynamic")


def handoff_terms(handoff: str) -> tuple[str, ...]:
    """The supplementary terms of a hand-off: () for base / mesh, ("anchor", "anchor-emb") for
    ``"anchor+anchor-emb"`` (the paper's Table 4 combinations are '+'-joined terms)."""
    if handoff in ("base", "mesh"):
        return ()
    terms = tuple(t.strip() for t in handoff.split("+")) if isinstance(handoff, str) else ()
    if not terms or any(t not in HANDOFF_TERMS for t in terms) or len(set(terms)) < len(terms):
        raise ValueError(
            f"ModelConfig.loop.handoff={handoff!r}: expected one of {HANDOFFS} or a '+'-joined "
            f"combination of distinct terms {HANDOFF_TERMS}, e.g. 'residual+anchor'"
        )
    return terms


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """A recursive (looped) layout and its hand-off; ``layout=""`` (the default) means no loop.

    ``layout``: ``"Lpre+LcoreRNloop+Lcoda"`` (``n_layers`` must be the stored layers,
    Lpre + Lcore + Lcoda, or Lpre + Nloop*Lcore + Lcoda with ``tie_core=False``).
    ``handoff``: how one core iteration hands its state to the next: "base", "mesh", or one or more
    '+'-joined terms of "residual", "anchor", "anchor-emb" (e.g. "anchor+anchor-emb"), each added
    to f(h^(t)). ``alpha`` weighs f(h^(t)) and those terms: "fixed" (all 1, Eq. 1), "static" (one
    trainable scalar each per loop step, init 1) or "dynamic" (per token, a linear map of the step
    input h^(t) per loop step, weights init 0 and biases 1); MeSH and "fixed" add no parameters.
    ``mesh_slots``: MeSH buffer slots (None = Nloop + 3); the other hand-offs ignore it, so one
    ``--set model.loop.mesh_slots=4`` sweeps a whole comparison. ``tie_core``: False gives every
    core iteration its own weights (Table 6's "vanilla + mesh", 4+8+8+4).
    """

    layout: str = ""
    handoff: str = "base"
    mesh_slots: int | None = None
    alpha: str = "fixed"
    tie_core: bool = True

    def __post_init__(self) -> None:
        handoff_terms(self.handoff)  # ValueError naming loop.handoff
        _check_choice("loop.alpha", self.alpha, ALPHAS)
        slots = self.mesh_slots
        if slots is not None and (not _is_int(slots) or slots < 2):
            raise ValueError(f"ModelConfig.loop.mesh_slots={slots!r}: use an int >= 2 (or None)")
        if not isinstance(self.tie_core, bool):
            raise ValueError(f"ModelConfig.loop.tie_core={self.tie_core!r}: expected a bool")
        if self.alpha != "fixed" and self.handoff == "mesh":
            raise ValueError(
                f"ModelConfig.loop.alpha={self.alpha!r} does not apply to loop.handoff='mesh' "
                "(its routers are the learned mixture): leave alpha='fixed'"
            )
        if not self.enabled:
            if self.handoff != "base" or self.alpha != "fixed" or not self.tie_core:
                raise ValueError(
                    f"ModelConfig: loop.handoff={self.handoff!r}, loop.alpha={self.alpha!r} and "
                    f"loop.tie_core={self.tie_core} only apply to recursive models: set "
                    "loop.layout (e.g. '2+4R2+2') or leave them at their defaults ('base', "
                    "'fixed', True)"
                )
            return
        parse_layout(self.layout)

    @property
    def enabled(self) -> bool:
        """Whether the model is recursive."""
        return bool(self.layout)

    @property
    def terms(self) -> tuple[str, ...]:
        """The hand-off's supplementary terms (``handoff_terms``)."""
        return handoff_terms(self.handoff)

    @property
    def n_alphas(self) -> int:
        """Coefficients per loop step of a non-MeSH hand-off: f(h^(t)) and each term."""
        return 1 + len(self.terms)

    def parsed(self) -> LoopLayout:
        """The parsed layout (ValueError when there is none)."""
        return parse_layout(self.layout, self.tie_core)

    @property
    def n_slots(self) -> int:
        """MeSH buffer slots S: ``mesh_slots``, or Nloop + 3 (the paper's rule)."""
        return self.mesh_slots if self.mesh_slots is not None else self.parsed().n_loop + 3

    def check_model(self, model: ModelConfig) -> None:
        """Raise ValueError unless this layout fits the core fields of ``model``."""
        if not self.enabled:
            return
        lay = self.parsed()
        if model.n_layers != lay.distinct_layers:
            core = "Lcore" if lay.tied else "Nloop*Lcore (tie_core=False)"
            raise ValueError(
                f"ModelConfig.n_layers={model.n_layers} but loop.layout={self.layout!r} has "
                f"{lay.prelude}+{lay.core_stored}+{lay.coda} = {lay.distinct_layers} stored layers "
                f"(Lpre + {core} + Lcoda): set n_layers={lay.distinct_layers} ({_EXAMPLE})"
            )

    def alpha_params(self, model: ModelConfig) -> int:
        """Trainable hand-off coefficients: static Nloop*A, dynamic Nloop*(D*A + A), else 0."""
        if not self.enabled or self.alpha == "fixed":
            return 0
        n_loop, a = self.parsed().n_loop, self.n_alphas
        return n_loop * a if self.alpha == "static" else n_loop * (model.d_model * a + a)

    def extra_params(self, model: ModelConfig) -> int:
        """Parameters beyond the stored blocks: the MeSH routers or the trainable alphas."""
        if not self.enabled:
            return 0
        if self.handoff == "mesh":
            return router_params(model.d_model, self.parsed().n_loop, self.n_slots)
        return self.alpha_params(model)


SECTIONS = {"memory": MemoryConfig, "loop": LoopConfig}
"""The family sections of ``ModelConfig``, by field name."""

FLAT_FIELDS = {
    "memory": "memory.kind",
    "memory_layer": "memory.layer",
    "memory_injection": "memory.injection",
    "memory_training": "memory.training",
    "memory_passes": "memory.passes",
    "memory_reset_token": "memory.reset_token",
    "loop": "loop.layout",
    "handoff": "loop.handoff",
    "mesh_slots": "loop.mesh_slots",
}
"""The flat ``ModelConfig`` fields of run configs saved before the sections, and their new paths."""


def upgrade_flat_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A saved ``ModelConfig`` dict with the old flat family fields (``memory="shared"``,
    ``memory_layer``, ``loop="1+2R2+1"``, ``handoff``, ...) moved into their sections; a dict in
    the current spelling comes back unchanged."""
    out = dict(data)
    sections: dict[str, dict[str, Any]] = {}
    for old, new in FLAT_FIELDS.items():
        if old not in out or isinstance(out[old], dict):
            continue
        section, name = new.split(".")
        sections.setdefault(section, {})[name] = out.pop(old)
    for section, fields in sections.items():
        out[section] = (
            {**out.get(section, {}), **fields} if isinstance(out.get(section), dict) else fields
        )
    return out


# --------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a language model built from Transformer or Recurrent Transformer blocks.

    ``n_kv_heads`` defaults to ``n_heads`` (MHA), ``mlp_hidden`` to ``4 * d_model`` and
    ``embedding_size`` (rows of the embedding and head, padded for speed) to ``vocab_size``.
    ``impl`` chooses how recurrent blocks run: ``reference`` (token-by-token oracle), ``tiled``
    (Fenwick-tiled, custom backward) or ``pallas`` (tiled with Pallas kernels; pass
    ``interpret=True`` on CPU). ``leaf_size`` is the tiled schedule's smallest tile in positions.
    ``embed_scale`` multiplies the token embeddings by sqrt(d_model) (standard and recursive
    models; LRT refuses it). ``block_style``: ``"olmo"`` (pre-norm, QK-norm, the reference code's
    block) or ``"neox"`` (GPT-NeoX / Pythia: parallel residual, biases, LayerNorm with bias, no
    QK-norm; Transformer blocks of the standard and recursive families only). ``rotary_pct``: with
    ``position="rope"``, the fraction of each head's dims that rotate (Pythia: 0.25).
    ``output_init``: std of w_o / w_ff_out, ``"layer"`` 1/sqrt(2 fan_in (l+1)) per layer l,
    ``"depth"`` 1/sqrt(2 fan_in depth) with the compute depth (the MeSH paper's depth-aware init),
    ``"auto"`` = depth for recursive models, layer otherwise. Family sections: ``memory`` (LRT, ``MemoryConfig``) and ``loop`` (recursive / MeSH,
    ``LoopConfig``); at most one of them is enabled.
    ``attention`` is how Transformer blocks (and LRT buffers) attend: ``xla`` (einsums, the
    N x N logits in HBM) or ``flash`` (the platform's fused kernel: Pallas flash attention on
    TPU, cuDNN on GPU; ``interpret=True`` runs the TPU kernel on CPU; see docs/attention.md).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    n_kv_heads: int | None = None
    mlp_hidden: int | None = None
    embedding_size: int | None = None
    block_type: str = "recurrent"
    impl: str = "tiled"
    position: str = "alibi"
    alibi_bias_max: float = 8.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    compute_dtype: str = "float32"
    attention: str = "xla"
    leaf_size: int = 32
    interpret: bool = False
    remat: bool = False
    embed_scale: bool = False
    block_style: str = "olmo"
    rotary_pct: float = 1.0
    output_init: str = "auto"
    memory: MemoryConfig = MemoryConfig()
    loop: LoopConfig = LoopConfig()

    def __post_init__(self) -> None:
        def fill(name: str, value: int) -> None:
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

        fill("n_kv_heads", self.n_heads)
        fill("mlp_hidden", 4 * self.d_model)
        fill("embedding_size", self.vocab_size)
        self._validate()

    def _validate(self) -> None:
        positive = ("vocab_size", "d_model", "n_heads", "n_layers", "n_kv_heads", "mlp_hidden")
        for name in positive + ("embedding_size", "leaf_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "pick n_heads that divides d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"ModelConfig.embedding_size={self.embedding_size} is smaller than "
                f"vocab_size={self.vocab_size}: it must be >= vocab_size (padding rows only)"
            )
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"ModelConfig.block_type={self.block_type!r}: expected {BLOCK_TYPES}")
        if self.impl not in IMPLS:
            raise ValueError(f"ModelConfig.impl={self.impl!r}: expected one of {IMPLS}")
        if self.position not in POSITION_KINDS:
            raise ValueError(f"ModelConfig.position={self.position!r}: expected {POSITION_KINDS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"ModelConfig.compute_dtype={self.compute_dtype!r}: expected {DTYPES}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelConfig.attention={self.attention!r}: expected {ATTENTIONS}")
        if self.attention == "flash" and self.compute_dtype == "float64":
            raise ValueError(
                "ModelConfig.attention='flash' has no float64 kernel: set attention='xla' or "
                "compute_dtype='float32'/'bfloat16'"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; d_model/n_heads = {self.head_dim}")
        self._validate_block_style()
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                first = dataclasses.fields(cls)[0].name
                raise ValueError(
                    f"ModelConfig.{name}={section!r}: expected a {cls.__name__}, e.g. "
                    f"{name}={cls.__name__}({first}={section!r}) (old flat fields moved into "
                    f"sections: {FLAT_FIELDS})"
                )
            section.check_model(self)
        if self.memory.enabled and self.loop.enabled:
            raise ValueError(
                "ModelConfig: an LRT memory (memory.kind != 'none') and a recursive loop layout "
                f"(loop.layout={self.loop.layout!r}) cannot be combined: set one of them"
            )
        if self.memory.enabled and (self.embed_scale or self.output_init == "depth"):
            raise ValueError(
                f"ModelConfig.embed_scale={self.embed_scale} / output_init={self.output_init!r}: "
                "the LRT family (memory.kind != 'none') reads neither: leave embed_scale=False "
                "and output_init='auto' or 'layer'"
            )

    def _validate_block_style(self) -> None:
        """The block-style fields: choices, the rotary fraction, and which blocks take NeoX."""
        _check_choice("block_style", self.block_style, BLOCK_STYLES)
        _check_choice("output_init", self.output_init, OUTPUT_INITS)
        pct = self.rotary_pct
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.0 < pct <= 1.0:
            raise ValueError(
                f"ModelConfig.rotary_pct={pct!r}: use a fraction in (0, 1] (Pythia: 0.25)"
            )
        rotary = int(self.head_dim * pct)
        if self.position == "rope" and (rotary < 2 or rotary % 2):
            raise ValueError(
                f"ModelConfig.rotary_pct={pct}: int(head_dim={self.head_dim} * rotary_pct) = "
                f"{rotary} rotary dims; RoPE needs an even number >= 2: change rotary_pct"
            )
        if self.block_style != "neox":
            return
        if self.block_type != "transformer":
            raise ValueError(
                f"ModelConfig.block_style='neox' runs on Transformer blocks only, got block_type="
                f"{self.block_type!r}: set block_type='transformer' or block_style='olmo' (the "
                "Recurrent Transformer's tiled path is OLMo-only)"
            )
        if self.memory.enabled:
            raise ValueError(
                f"ModelConfig.block_style='neox' is not supported by LRT (memory.kind="
                f"{self.memory.kind!r}): set block_style='olmo' or memory.kind='none'"
            )

    @property
    def family(self) -> str:
        """Name of the model family that runs this config: ``standard``, ``lrt`` or
        ``recursive`` (the registry in ``rt_jax.models.family`` maps it to the code)."""
        if self.memory.enabled:
            return "lrt"
        if self.loop.enabled:
            return "recursive"
        return "standard"

    @property
    def cache_layers(self) -> int:
        """Layers with a KV cache: the unrolled compute depth (recursive cores count per loop)."""
        return self.loop.parsed().depth if self.loop.enabled else self.n_layers

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def attention_spec(self) -> AttentionSpec:
        """The static attention description the pure ops take."""
        return AttentionSpec(
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            position=self.position,
            alibi_bias_max=self.alibi_bias_max,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            compute_dtype=self.compute_dtype,
            attention=self.attention,
            interpret=self.interpret,
            block_style=self.block_style,
            rotary_pct=float(self.rotary_pct),
        )

    def block_params(self) -> int:
        """Parameters of one block (attention, MLP and their norms; NeoX: biases, no QK-norm)."""
        d, f = self.d_model, self.mlp_hidden
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        matrices = d * q_dim + d * 2 * kv_dim + q_dim * d + 2 * d * f
        if self.block_style == "neox":  # two LayerNorms with bias; biases q, kv, o, ff_in, ff_out
            return matrices + 4 * d + q_dim + 2 * kv_dim + d + f + d
        return matrices + q_dim + kv_dim + 2 * d

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and LM head (blocks plus the final norm, plus the
        LRT memory pathway or MeSH routers when configured)."""
        extra = self.memory.extra_params(self) + self.loop.extra_params(self)
        final_norm = 2 * self.d_model if self.block_style == "neox" else self.d_model
        return self.n_layers * self.block_params() + final_norm + extra

    def total_params(self) -> int:
        """All parameters, including the untied embedding and head."""
        return self.non_embedding_params() + 2 * self.embedding_size * self.d_model

    def kv_floats_per_token(self) -> int:
        """Floats cached per generated token (keys and values, all layers)."""
        return 2 * self.cache_layers * self.n_kv_heads * self.head_dim
