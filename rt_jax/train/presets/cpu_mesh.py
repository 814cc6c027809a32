"""``cpu-mesh``: recursive hand-offs and MeSH vs a full-depth Transformer (issue 8), 2 seeds.

Six points at compute depth 6, width 128 (4 heads, MLP 512), byte-level Shakespeare, 8 x 128 tokens
per step, lr 3e-3 (cpu-demo's recipe): ``transformer-6L`` (vanilla, 6 distinct layers) and five
recursive models with layout 1+2R2+1 (4 distinct layers, a third fewer non-embedding parameters):
``recursive-base``, ``recursive-residual``, ``recursive-anchor``, ``recursive-anchor-emb`` and
``mesh`` (S = Nloop + 3 = 5 slots, 3,870 router parameters). Seeds 0 and 1: 12 runs.

The recursive points scale embeddings by sqrt(D) (``embed_scale=true``, the paper's setting). It
trains: 200-step probes (seed 0, 8 validation batches) gave val CE 2.194 with vs 2.229 without for
mesh, 2.206 vs 2.203 for recursive-base. ``transformer-6L`` is a standard model, which does not read
``embed_scale`` (nor the recursive depth-aware init: it keeps the per-layer 1/sqrt(2 D (l+1))).

Sizing (450 steps, 0.46M tokens per run). Train steps timed side by side (experiments.param_matched
measure_throughput, 4 interleaved rounds of 10 steps, medians) on the shared 2-core machine at load
~7, against a 2-layer d128 Transformer beside them: transformer-6L 2.44x its step time,
recursive-base 2.52x, -residual 2.48x, -anchor 2.44x, -anchor-emb 2.59x, mesh 2.94x (0.37-0.44
s/step at that load). At load ~2 an earlier round gave 0.14-0.16 s/step for all six. With the
2-layer model's 0.083 s/step when quiet (cpu-demo) that is about 0.15-0.21 s/step, so 12 x 450
steps ~ 14-19 minutes, plus ~30 s per run of compile, 11 evaluations and checkpoints (~6 min) and
param_matched's 15 side-by-side timing rounds (~4 min): about 25-30 minutes quiet. The issue asked
for about an hour; the session that ran it shared its 2 cores between this, cpu-lrt and the
synthetic sweep, so the steps were cut from 650 to 450 (``--set steps=1300`` gives the hour-long
version). The measured wall time of the committed run is in results/param_matched_cpu-mesh.md.
"""

import dataclasses

from rt_jax.train.config import ModelPoint, TrainConfig, point_model
from rt_jax.train.presets import cpu_demo

LOOP = "1+2R2+1"
STEPS = 450


def _recursive(name: str, handoff: str) -> ModelPoint:
    return ModelPoint(
        name,
        "transformer",
        4,
        128,
        4,
        512,
        family=name,
        options=f"loop.layout={LOOP},loop.handoff={handoff},embed_scale=true",
    )


POINTS = (
    ModelPoint("transformer-6L", "transformer", 6, 128, 4, 512, family="transformer"),
    _recursive("recursive-base", "base"),
    _recursive("recursive-residual", "residual"),
    _recursive("recursive-anchor", "anchor"),
    _recursive("recursive-anchor-emb", "anchor-emb"),
    _recursive("mesh", "mesh"),
)


def config() -> TrainConfig:
    """The cpu-mesh preset: cpu-demo's recipe, the six depth-6 points, two seeds."""
    base = cpu_demo.config()
    return dataclasses.replace(
        base,
        model=point_model(base.model, POINTS[0]),
        steps=STEPS,
        checkpoint_every=STEPS // 4,
        compare=POINTS,
        seeds=(0, 1),
    )
