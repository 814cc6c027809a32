"""Model configuration: a frozen, validated dataclass."""

from __future__ import annotations

import dataclasses

from rt_jax.ops.block import ATTENTIONS, DTYPES, POSITION_KINDS, AttentionSpec

BLOCK_TYPES = ("transformer", "recurrent")
IMPLS = ("reference", "tiled", "pallas")
MEMORY_KINDS = ("none", "shared", "layerwise")
MEMORY_INJECTIONS = ("both", "kv", "residual")
MEMORY_TRAININGS = ("interleaved", "refine")
HANDOFFS = ("base", "residual", "anchor", "anchor-emb", "mesh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a language model built from Transformer or Recurrent Transformer blocks.

    ``n_kv_heads`` defaults to ``n_heads`` (MHA), ``mlp_hidden`` to ``4 * d_model`` and
    ``embedding_size`` (rows of the embedding and head, padded for speed) to ``vocab_size``.
    ``impl`` chooses how recurrent blocks run: ``reference`` (token-by-token oracle), ``tiled``
    (Fenwick-tiled, custom backward) or ``pallas`` (tiled with Pallas kernels; pass
    ``interpret=True`` on CPU). ``leaf_size`` is the tiled schedule's smallest tile in positions.
    ``memory_reset_token`` (LRT): the memory is zero at a position whose previous input token is
    this id (a document separator such as EOS); -1 = never reset.
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
    memory: str = "none"
    memory_layer: int = -1
    memory_injection: str = "both"
    memory_training: str = "interleaved"
    memory_passes: int = 2
    memory_reset_token: int = -1
    loop: str = ""
    handoff: str = "base"
    mesh_slots: int | None = None
    embed_scale: bool = False

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
        choices = {
            "memory": MEMORY_KINDS,
            "memory_injection": MEMORY_INJECTIONS,
            "memory_training": MEMORY_TRAININGS,
            "handoff": HANDOFFS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected {allowed}")
        reset = self.memory_reset_token
        if (
            isinstance(reset, bool)
            or not isinstance(reset, int)
            or not -1 <= reset < self.vocab_size
        ):
            raise ValueError(
                f"ModelConfig.memory_reset_token={reset!r}: use -1 (never reset the LRT memory) "
                f"or a token id in [0, vocab_size={self.vocab_size}), e.g. the EOS id"
            )
        if self.memory != "none" and self.loop:
            raise ValueError(
                "ModelConfig: an LRT memory (memory != 'none') and a recursive loop layout "
                f"(loop={self.loop!r}) cannot be combined: set one of them"
            )
        if not self.loop and (self.handoff != "base" or self.embed_scale or self.mesh_slots):
            raise ValueError(
                f"ModelConfig: handoff={self.handoff!r}, embed_scale={self.embed_scale} and "
                f"mesh_slots={self.mesh_slots} only apply to recursive models: set loop (e.g. "
                "'2+4R2+2') or leave them at their defaults ('base', false, None)"
            )
        if self.memory != "none":
            from rt_jax.models import lrt

            lrt.validate(self)
        if self.loop:
            from rt_jax.models import recursive

            recursive.validate(self)

    @property
    def family(self) -> str:
        """Which model module runs this config: ``standard``, ``lrt`` or ``recursive``."""
        if self.memory != "none":
            return "lrt"
        if self.loop:
            return "recursive"
        return "standard"

    @property
    def cache_layers(self) -> int:
        """Layers with a KV cache: the unrolled compute depth (recursive cores count per loop)."""
        if self.family == "recursive":
            from rt_jax.models import recursive

            return recursive.compute_depth(self)
        return self.n_layers

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
        )

    def block_params(self) -> int:
        """Parameters of one block (attention, MLP and their norms)."""
        d, f = self.d_model, self.mlp_hidden
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        return d * q_dim + q_dim + d * 2 * kv_dim + kv_dim + q_dim * d + 2 * d + 2 * d * f

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and LM head (blocks plus the final norm, plus the
        LRT memory pathway or MeSH routers when configured)."""
        extra = 0
        if self.family == "lrt":
            from rt_jax.models import lrt

            extra = lrt.extra_params(self)
        elif self.family == "recursive":
            from rt_jax.models import recursive

            extra = recursive.extra_params(self)
        return self._plain_non_embedding_params() + extra

    def _plain_non_embedding_params(self) -> int:
        return self.n_layers * self.block_params() + self.d_model

    def total_params(self) -> int:
        """All parameters, including the untied embedding and head."""
        return self.non_embedding_params() + 2 * self.embedding_size * self.d_model

    def kv_floats_per_token(self) -> int:
        """Floats cached per generated token (keys and values, all layers)."""
        return 2 * self.cache_layers * self.n_kv_heads * self.head_dim
