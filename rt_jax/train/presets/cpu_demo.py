"""``cpu-demo``: the default main job, about 10 minutes on 2 quiet CPU cores (``make demo``).

One Transformer (4 layers x 128, 4 heads) and one Recurrent Transformer at half the depth and
equal non-embedding parameters (2 layers x 180, 6 heads: 779,220 vs 788,608, -1.2%), byte-level
Shakespeare, 2,000 steps of 8 x 128 tokens, one seed, scored on the test works. Sized from step
times measured on a shared, loaded 2-core machine and scaled by a 2-layer d128 Transformer measured
beside them (0.083 s/step when quiet): about 0.11 s/step for each model when quiet, so about 7
minutes of steps plus compiles (RT: about 10 s), evaluations and the one-off Shakespeare
preparation.

The demo does not tune: each point trains at its fixed ``lr`` (``LR_NOTE`` says where it came
from). ``python -m experiments.param_matched --preset cpu-demo --retune --tune-only`` reruns that
sweep (500-step runs on the grid ``tune_lrs``, scored on the validation works; about 5 minutes quiet)
and writes ``results/param_matched_cpu-demo_tuning.{json,md}``.
"""

from rt_jax.config import ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.train.config import ModelPoint, TrainConfig, point_model

LR_NOTE = (
    "Picked by `python -m experiments.param_matched --preset cpu-demo --retune --tune-only` at "
    "commit 044be3c (results/param_matched_cpu-demo_tuning.md): 500-step runs, seed 0, CE on the "
    "validation works. transformer-4L: 1.5e-3 2.0176, 3e-3 1.9737, 6e-3 1.9733, then (6e-3 was "
    "the grid's edge) 1.2e-2 2.0036 -> 6e-3 (3e-3 is within 0.0004 of it). recurrent-2L: 1.5e-3 "
    "1.9106, 3e-3 1.8790, 6e-3 1.8966 -> 3e-3."
)
POINTS = (
    ModelPoint("transformer-4L", "transformer", 4, 128, 4, 512, lr=6e-3),
    ModelPoint("recurrent-2L", "recurrent", 2, 180, 6, 720, lr=3e-3),
)


def config() -> TrainConfig:
    """The cpu-demo preset."""
    return TrainConfig(
        model=point_model(
            ModelConfig(
                vocab_size=257,
                embedding_size=264,
                impl="tiled",
            ),
            POINTS[0],
        ),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=128, batch_size=8),
        steps=2000,
        lr=3e-3,
        log_every=50,
        eval_points=10,
        eval_batches=16,
        checkpoint_every=500,
        compare=POINTS,
        seeds=(0,),
        tune_lrs=(1.5e-3, 3e-3, 6e-3),
        tune_steps=500,
    )
