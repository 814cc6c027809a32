"""``cpu-mesh-buffer``: the MeSH paper's Table 3 (buffer length) at CPU scale (``_mesh_ablation``).

MeSH 1+2R2+1 (NeoX blocks, width 128) with S = 3, 4, 5, 6 slots (k = 0..3 scratch slots), two
seeds, 1,500 steps. Estimated ~50 minutes on 2 quiet cores (8 runs x 1,500 steps at cpu-mesh's
measured 0.15-0.21 s/step, plus ~1 minute of compile and evaluation per run; not measured).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab

LAYOUT = "1+2R2+1"


def config() -> TrainConfig:
    """The cpu-mesh-buffer preset."""
    return ab.cpu_config(ab.buffer_points(ab.CPU, LAYOUT), steps=1500, seeds=(0, 1))
