"""``paper-mesh-handoff``: Table 4 at the paper's shape, Pythia-410M 4+8R2+4, nine points (TPU).

20,000 steps of 512 x 512 C4 tokens (5.2B tokens; the paper: 250B Pile tokens, ``--set steps=``).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab


def config() -> TrainConfig:
    """The paper-mesh-handoff preset."""
    return ab.paper_config(ab.handoff_points(ab.PYTHIA_410M, "4+8R2+4"), steps=20_000)
