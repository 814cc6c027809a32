"""``paper-mesh-buffer``: Table 3 at the paper's shape, Pythia-410M 4+8R2+4, S = 3..6 (TPU).

20,000 steps of 512 x 512 C4 tokens (5.2B tokens; the paper: 250B Pile tokens, ``--set steps=``).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab


def config() -> TrainConfig:
    """The paper-mesh-buffer preset."""
    return ab.paper_config(ab.buffer_points(ab.PYTHIA_410M, "4+8R2+4"), steps=20_000)
