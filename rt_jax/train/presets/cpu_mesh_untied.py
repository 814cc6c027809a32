"""``cpu-mesh-untied``: the MeSH paper's Table 6 (MeSH on a non-recursive backbone) at CPU scale.

Vanilla 6L, vanilla+mesh (1+2R2+1 with untied cores: 1+2+2+1 stored layers, as many parameters as
vanilla plus the routers), recursive-base and recursive+mesh (1+2R2+1), NeoX blocks at width 128,
two seeds, 1,500 steps. Estimated ~50 minutes on 2 quiet cores (not measured).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab

LAYOUT = "1+2R2+1"


def config() -> TrainConfig:
    """The cpu-mesh-untied preset."""
    return ab.cpu_config(ab.untied_points(ab.CPU, LAYOUT), steps=1500, seeds=(0, 1))
