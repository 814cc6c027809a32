"""``cpu-lrt``: Transformer vs Recurrent Transformer vs LRT (shared, layerwise) at one shape.

All four models are 4 layers x 128 (4 heads, MLP 512), byte-level Shakespeare, batch 8 x 128
tokens, lr 3e-3, 800 steps (0.8M tokens per run), two seeds (8 runs). LRT: memory = LN_f(x_L) of
the previous token, injected into the residual stream and the keys/values of every layer,
interleaved training with S = 2 subsets, the memory reset after EOS (256). Validation reports
``val_ce`` (the exact token-by-token recurrence) and ``val_ce_parallel`` (the training-time passes,
each position scored by its last pass). Non-embedding parameters: 788,608 (Transformer, RT),
825,476 (lrt-shared, +36,868 = +4.7%: at d=128 one D x 2D memory projection is large next to
4 blocks), 923,780 (lrt-layerwise, +135,172 = +17.1%). LRT trains at about 2x the Transformer's
FLOPs per token (pass 0 plus the subsets, which recompute every position once).

Sizing (measured side by side in one process, 4 interleaved rounds of 5 steps, medians, on the
shared 2-core machine at load average ~7): train step 0.21 s (Transformer), 0.26 s (RT), 0.50 s
(lrt-shared), 0.52 s (lrt-layerwise); process CPU 0.16 / 0.18 / 0.34 / 0.36 s. One validation
batch (8 x 128): 0.04 s (Transformer), 0.05 s (RT), 0.15-0.19 s (LRT: the exact recurrence, 128
sequential token steps, plus the parallel passes). Compiles: 11 s (Transformer) to 24 s (LRT,
+5 s for its eval step) under that load. The committed cpu-full run timed the Transformer and RT
steps at 0.096 s and 0.121 s (10,626 and 8,459 tokens/s), 2.2x faster than under this load, so
on a quiet machine: ~0.69 s per step for the four models, 800 steps x 2 seeds = ~18 minutes of
steps, plus ~1.5 minutes of compiles, ~1 minute of evaluations (step 0 + 5 log-spaced points x
16 batches; LRT ~8 s per run) and ~2.5 minutes of param_matched's side-by-side throughput timing:
about 23 minutes in total. The issue asked for about an hour; the session that ran it had to share
its 2 cores between this, cpu-mesh and the synthetic sweep, so the step count was cut from 1,200
to 800 (``--set steps=2400`` gives the hour-long version). The measured wall time of the committed
run is in results/param_matched_cpu-lrt.md.
"""

import dataclasses

from rt_jax.config import MemoryConfig
from rt_jax.train.config import ModelPoint, TrainConfig, point_model, replace_model
from rt_jax.train.presets import cpu_demo

SHAPE = (4, 128, 4, 512)
POINTS = (
    ModelPoint("transformer-4L", "transformer", *SHAPE),
    ModelPoint("recurrent-4L", "recurrent", *SHAPE),
    ModelPoint(
        "lrt-shared-4L", "transformer", *SHAPE, family="lrt-shared", options="memory.kind=shared"
    ),
    ModelPoint(
        "lrt-layerwise-4L",
        "transformer",
        *SHAPE,
        family="lrt-layerwise",
        options="memory.kind=layerwise",
    ),
)


def config() -> TrainConfig:
    """The cpu-lrt preset: cpu-demo's recipe, four model families at one shape, two seeds."""
    base = cpu_demo.config()
    # The byte tokenizer's EOS resets the memory (read only by the LRT points).
    model = replace_model(base.model, memory=MemoryConfig(reset_token=256))
    return dataclasses.replace(
        base,
        model=point_model(model, POINTS[0]),
        compare=POINTS,
        seeds=(0, 1),
        steps=800,
        eval_points=5,
        eval_batches=16,
        checkpoint_every=500,
    )
