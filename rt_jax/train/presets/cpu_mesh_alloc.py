"""``cpu-mesh-alloc``: the MeSH paper's Fig. 8 (layer allocation at constant compute) at CPU scale.

Compute depth 8, Nloop = 2: base and MeSH at 0+4R2+0, 1+3R2+1, 2+2R2+2 and 3+1R2+3, plus vanilla
8L; NeoX blocks at width 128, one seed, 1,200 steps. Estimated ~60 minutes on 2 quiet cores (9 runs
x 1,200 steps at ~0.27 s/step, depth 8 scaled from cpu-mesh's depth-6 timings, plus compiles; not
measured).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab


def config() -> TrainConfig:
    """The cpu-mesh-alloc preset."""
    points = ab.alloc_points(ab.CPU_ALLOC, ab.alloc_layouts(ab.CPU_ALLOC.depth))
    return ab.cpu_config(points, steps=1200, seeds=(0,))
