"""rt-jax: the Recurrent Transformer family in JAX/Flax."""

from rt_jax.config import LoopConfig, MemoryConfig, ModelConfig
from rt_jax.decoding import GenerateOutput, generate
from rt_jax.models.lm import LanguageModel, forward, init_params

__all__ = [
    "GenerateOutput",
    "LanguageModel",
    "LoopConfig",
    "MemoryConfig",
    "ModelConfig",
    "forward",
    "generate",
    "init_params",
]
