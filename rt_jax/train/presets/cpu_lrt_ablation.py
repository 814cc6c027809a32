"""``cpu-lrt-ablation``: the LRT paper's architecture ablations at CPU scale (issue 14).

The paper ablates the injection type (KV projection, residual injection, both), the memory's
source layer, the number of interleaved passes S and shared vs layerwise memory projections
(notes §2.4, §4.4: both injections together beat either alone; an upper-middle source layer is
best). A full factorial grid of those four factors is 3 x 3 x 2 x 2 = 36 LRT runs, ~10 hours on
these 2 cores, so this preset varies one factor at a time around the centre point (shared, both,
last layer, S = 2: cpu-lrt's LRT-shared): 7 LRT points plus the Transformer, all 4 layers x 128
as cpu-lrt, byte-level Shakespeare, batch 8 x 128, lr 3e-3, 600 steps, one seed (add seeds with
``--set seeds=0,1``). Source layers: 1 (middle) and 2 (upper-middle of 4) beside -1 (LN_f(x_L)).
Validation reports the exact ``val_ce``, ``val_ce_parallel``, each training pass's CE
(``val_ce_pass<i>``) and the exact CE by 32-position bucket (``val_ce_pos<a>_<b>``).

Sizing (from cpu-lrt's measured steps: ~0.25 s per LRT step on a quiet machine, ~0.5 s at load
~7): 7 x 600 LRT steps ~ 18-35 minutes plus the Transformer, compiles and evaluations, about
30-50 minutes. Run: ``python -m experiments.param_matched --preset cpu-lrt-ablation``.
"""

import dataclasses

from rt_jax.config import MemoryConfig
from rt_jax.train.config import ModelPoint, TrainConfig, point_model, replace_model
from rt_jax.train.presets import cpu_demo

SHAPE = (4, 128, 4, 512)
CENTRE = {"kind": "shared", "injection": "both", "layer": -1, "passes": 2}
VARIATIONS = (
    {},
    {"injection": "kv"},
    {"injection": "residual"},
    {"layer": 1},
    {"layer": 2},
    {"passes": 4},
    {"kind": "layerwise"},
)
"""Changes from ``CENTRE``, one factor at a time (the first is the centre itself)."""


def _name(memory: dict) -> str:
    layer = "last" if memory["layer"] < 0 else f"L{memory['layer']}"
    return f"lrt-{memory['kind']}-{memory['injection']}-{layer}-S{memory['passes']}"


def _point(change: dict) -> ModelPoint:
    memory = {**CENTRE, **change}
    options = ",".join(f"memory.{k}={v}" for k, v in memory.items())
    return ModelPoint(_name(memory), "transformer", *SHAPE, family="lrt", options=options)


POINTS = (ModelPoint("transformer-4L", "transformer", *SHAPE),) + tuple(
    _point(change) for change in VARIATIONS
)


def recipe(points: tuple[ModelPoint, ...]) -> TrainConfig:
    """cpu-demo's recipe for the LRT experiment presets, with these compare points."""
    base = cpu_demo.config()
    model = replace_model(base.model, memory=MemoryConfig(reset_token=256, eval_bucket=32))
    return dataclasses.replace(
        base,
        model=point_model(model, points[0]),
        compare=points,
        seeds=(0,),
        steps=600,
        eval_points=4,
        eval_batches=16,
        checkpoint_every=300,
        tune_steps=0,  # tune at steps // 3, not cpu-demo's 500 of its 2,000
    )


def config() -> TrainConfig:
    """The cpu-lrt-ablation preset: cpu-demo's recipe, the Transformer and 7 LRT variants."""
    return recipe(POINTS)
