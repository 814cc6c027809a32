"""rt-jax: the Recurrent Transformer family in JAX/Flax."""

from rt_jax.config import ModelConfig
from rt_jax.models.lm import LanguageModel, forward, init_params

__all__ = ["LanguageModel", "ModelConfig", "forward", "init_params"]
