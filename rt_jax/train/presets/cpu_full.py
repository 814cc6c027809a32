"""``cpu-full``: the README's results table, about an hour on 2 quiet CPU cores (estimated).

A Table-1-like pair of depths for both block types: 4 layers x 128 (4 heads) and 2 layers x 180
(6 heads) at equal non-embedding parameters (788,608 vs 779,220), two seeds each (8 runs),
byte-level Shakespeare, 2,000 steps of 8 x 128 tokens (2M tokens per run). At about 0.15-0.2 s per
step on 2 cores this is 40-55 minutes of steps for the 8 runs plus compiles and evaluations; the
measured wall time of the committed run is in results/param_matched_cpu-full.md.
"""

from rt_jax.config import ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.train.config import ModelPoint, TrainConfig

POINTS = (
    ModelPoint("transformer-4L", "transformer", 4, 128, 4, 512),
    ModelPoint("transformer-2L", "transformer", 2, 180, 6, 720),
    ModelPoint("recurrent-4L", "recurrent", 4, 128, 4, 512),
    ModelPoint("recurrent-2L", "recurrent", 2, 180, 6, 720),
)


def config() -> TrainConfig:
    """The cpu-full preset."""
    first = POINTS[0]
    return TrainConfig(
        model=ModelConfig(
            vocab_size=257,
            embedding_size=264,
            d_model=first.d_model,
            n_heads=first.n_heads,
            n_layers=first.n_layers,
            mlp_hidden=first.mlp_hidden,
            block_type=first.block_type,
            impl="tiled",
        ),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=128, batch_size=8),
        steps=2000,
        lr=3e-3,
        log_every=50,
        eval_points=10,
        eval_batches=16,
        checkpoint_every=500,
        compare=POINTS,
        seeds=(0, 1),
    )
