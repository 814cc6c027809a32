"""``paper-mesh-untied``: Table 6 at the paper's shape, Pythia-1.4B 4+8R2+4 / 4+8+8+4 (TPU).

20,000 steps of 512 x 512 C4 tokens (5.2B tokens; the paper: 250B Pile tokens, ``--set steps=``).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab


def config() -> TrainConfig:
    """The paper-mesh-untied preset."""
    return ab.paper_config(ab.untied_points(ab.PYTHIA_1_4B, "4+8R2+4"), steps=20_000)
