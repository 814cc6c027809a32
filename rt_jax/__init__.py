"""rt-jax: the Recurrent Transformer family in JAX/Flax."""

from rt_jax.config import ModelConfig
from rt_jax.decoding import GenerateOutput, generate
from rt_jax.models.lm import LanguageModel, forward, init_params

__all__ = ["GenerateOutput", "LanguageModel", "ModelConfig", "forward", "generate", "init_params"]
