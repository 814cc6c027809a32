"""``cpu-lrt-strategy``: the LRT paper's training strategies at CPU scale (issue 14).

One LRT model (shared memory, both injections, source LN_f(x_L), 4 layers x 128 as cpu-lrt) trained
five ways, beside the Transformer: interleaved with S = 2 (the paper's default, ~2 forwards per
step), the same with the reference code's ``kv_refresh``, multi-refinement with K = 1 (equal
compute to interleaved) and K = 3 (where the reference README says gains saturate), and chunked
training with 4 chunks of 32 positions (the memory crosses chunk boundaries only; the paper's
chunked baseline is not specified further, see docs/lrt.md). Byte-level Shakespeare, batch 8 x 128,
lr 3e-3, 600 steps, one seed. Every run is scored the same way at evaluation: the exact
recurrence (``val_ce``), so the strategies compare as training methods for one model.

Sizing: interleaved, chunked and refine-K1 cost ~2 forwards per step and refine-K3 ~4, so about
(4 x 2 + 4) / 2 = 6 cpu-lrt LRT runs of 600 steps: ~15-30 minutes of steps plus compiles and
evaluations, under an hour. Run: ``python -m experiments.param_matched --preset cpu-lrt-strategy``.
"""

from rt_jax.train.config import ModelPoint, TrainConfig
from rt_jax.train.presets import cpu_lrt_ablation

SHAPE = (4, 128, 4, 512)
STRATEGIES = (
    ("lrt-interleaved-S2", "memory.training=interleaved,memory.passes=2"),
    (
        "lrt-interleaved-S2-refresh",
        "memory.training=interleaved,memory.passes=2,memory.kv_refresh=true",
    ),
    ("lrt-refine-K1", "memory.training=refine,memory.passes=1"),
    ("lrt-refine-K3", "memory.training=refine,memory.passes=3"),
    ("lrt-chunked-4x32", "memory.training=chunked,memory.passes=4"),
)
POINTS = (ModelPoint("transformer-4L", "transformer", *SHAPE),) + tuple(
    ModelPoint(name, "transformer", *SHAPE, family="lrt", options=f"memory.kind=shared,{options}")
    for name, options in STRATEGIES
)


def config() -> TrainConfig:
    """The cpu-lrt-strategy preset: cpu-demo's recipe, the Transformer and 5 LRT strategies."""
    return cpu_lrt_ablation.recipe(POINTS)
