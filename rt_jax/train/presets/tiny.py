"""``tiny``: a seconds-long run for tests (2-layer d32 Transformer, bytes of Shakespeare)."""

from rt_jax.config import ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.train.config import ModelPoint, TrainConfig


def config() -> TrainConfig:
    """The tiny preset."""
    return TrainConfig(
        model=ModelConfig(
            vocab_size=257,
            embedding_size=264,
            d_model=32,
            n_heads=2,
            n_layers=2,
            block_type="transformer",
            impl="tiled",
            leaf_size=8,
        ),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=32, batch_size=8),
        steps=20,
        lr=3e-3,
        log_every=5,
        eval_points=3,
        eval_batches=2,
        checkpoint_every=10,
        keep_checkpoints=2,
        compare=(
            ModelPoint("transformer-2L", "transformer", 2, 32, 2, 128),
            ModelPoint("recurrent-2L", "recurrent", 2, 32, 2, 128),
        ),
        seeds=(0,),
    )
