"""``cpu-mesh-handoff``: the MeSH paper's Table 4 (hand-off combinations) at CPU scale.

Vanilla 6L and eight 1+2R2+1 hand-offs (``_mesh_ablation.HANDOFFS``: base, +anchor,
+residual+anchor, +residual+anchor+anchor*, +anchor+anchor*, static and dynamic alpha, MeSH), NeoX
blocks at width 128, one seed, 1,500 steps. Estimated ~55 minutes on 2 quiet cores (9 runs x 1,500
steps at 0.15-0.21 s/step plus ~1 minute each of compile and evaluation; not measured).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab

LAYOUT = "1+2R2+1"


def config() -> TrainConfig:
    """The cpu-mesh-handoff preset."""
    return ab.cpu_config(ab.handoff_points(ab.CPU, LAYOUT), steps=1500, seeds=(0,))
