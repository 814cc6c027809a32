"""The model-family interface and its registry.

A model family (``standard``, ``lrt``, ``recursive``) is one module under ``rt_jax/models/`` that
ends with a family object registered here under the name ``ModelConfig.family`` gives. Everything
above the models (``lm.py``'s public functions, decoding, training, experiments) calls a family
through ``get_family(config)`` and the methods of ``ModelFamily``; nothing above imports a family
module by name. ``rt_jax/models/__init__.py`` imports every family module, so importing anything
from ``rt_jax.models`` fills the registry. Design note: ``docs/families.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import jax

    from rt_jax.config import ModelConfig
    from rt_jax.models.kv_cache import KVCache

PyTree = Any
PartitionRules = tuple[tuple[str, tuple[str | None, ...]], ...]
"""(regex over a parameter path "a/b/c", logical axis names one per dimension), in order."""


class ModelFamily(Protocol):
    """What every model family provides (signatures of the standard family's methods)."""

    name: str

    def validate(self, config: ModelConfig, seq_len: int | None = None) -> None:
        """Raise ValueError unless the family can run ``config`` (on ``seq_len`` positions when
        given: some training schemes need divisible lengths)."""

    def init_params(self, config: ModelConfig, key: jax.Array) -> PyTree:
        """Random parameters."""

    def forward(self, params: PyTree, tokens_BxN: jax.Array, config: ModelConfig) -> jax.Array:
        """Exact logits (B, N, embedding_size), float32."""

    def loss_sums(
        self, params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
    ) -> tuple[jax.Array, jax.Array]:
        """Training objective: (CE sum, squared-log-partition sum) on the scale of B*N tokens."""

    def eval_sums(
        self, params: PyTree, inputs_BxN: jax.Array, targets_BxN: jax.Array, config: ModelConfig
    ) -> dict[str, jax.Array]:
        """Validation sums: ``ce_sum`` of the exact model plus family extras ``ce_sum_<name>``."""

    def prefill(
        self,
        params: PyTree,
        tokens_BxP: jax.Array,
        lengths_B: jax.Array,
        config: ModelConfig,
        cache_size: int,
    ) -> tuple[jax.Array, KVCache]:
        """Right-padded prompts -> logits of each row's last prompt token (B, E) and the cache."""

    def decode_step(
        self, params: PyTree, cache: KVCache, tokens_B: jax.Array, config: ModelConfig
    ) -> tuple[jax.Array, KVCache]:
        """One token per row at its next position: logits (B, E) and the updated cache."""

    def cache_state_width(self, config: ModelConfig) -> int:
        """Width M of the per-row recurrent state the KV cache carries (0 if none)."""

    def extra_params(self, config: ModelConfig) -> int:
        """Parameters beyond the standard blocks, final norm, embedding and head."""

    def extra_forward_flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        """Forward matmul FLOPs per token beyond the unrolled layers and the head."""

    def train_flops_per_token(self, config: ModelConfig, seq_len: int) -> float:
        """Forward + backward model FLOPs per trained token (all training passes)."""

    def partition_rules(self) -> PartitionRules:
        """Logical axes of every parameter this family's models can have."""


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry under ``family.name`` (ValueError on a second one)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def registered_families() -> tuple[ModelFamily, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def get_family(config_or_name: ModelConfig | str) -> ModelFamily:
    """The family that runs a config (by ``config.family``) or the one of that name."""
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.family
    if name not in _FAMILIES:
        raise ValueError(
            f"no model family {name!r} is registered (known: {sorted(_FAMILIES)}); a family module "
            "must be imported by rt_jax/models/__init__.py"
        )
    return _FAMILIES[name]
