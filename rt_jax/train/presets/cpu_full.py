"""``cpu-full``: the README's results table, about an hour on 2 quiet CPU cores (estimated).

A Table-1-like pair of depths for both block types: 4 layers x 128 (4 heads) and 2 layers x 180
(6 heads) at equal non-embedding parameters (788,608 vs 779,220), two seeds each (8 runs),
byte-level Shakespeare, 2,000 steps of 8 x 128 tokens (2M tokens per run). At about 0.15-0.2 s per
step on 2 cores this is 40-55 minutes of steps for the 8 runs plus compiles and evaluations; the
measured wall time of the committed run is in results/param_matched_cpu-full.md.
"""

import dataclasses

from rt_jax.train.config import ModelPoint, TrainConfig
from rt_jax.train.presets import cpu_demo

POINTS = (
    ModelPoint("transformer-4L", "transformer", 4, 128, 4, 512),
    ModelPoint("transformer-2L", "transformer", 2, 180, 6, 720),
    ModelPoint("recurrent-4L", "recurrent", 4, 128, 4, 512),
    ModelPoint("recurrent-2L", "recurrent", 2, 180, 6, 720),
)


def config() -> TrainConfig:
    """The cpu-full preset: cpu-demo's recipe, both block types at both depths, two seeds."""
    return dataclasses.replace(cpu_demo.config(), compare=POINTS, seeds=(0, 1))
