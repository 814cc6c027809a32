"""``paper-mesh-alloc``: Fig. 8 at the paper's shape, Pythia-410M at compute depth 24 (TPU).

Base and MeSH at every split p + (12 - p)R2 + p (p = 0..11) and vanilla 24L: 25 points; 20,000
steps of 512 x 512 C4 tokens (``--set steps=`` for longer).
"""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets import _mesh_ablation as ab


def config() -> TrainConfig:
    """The paper-mesh-alloc preset."""
    points = ab.alloc_points(ab.PYTHIA_410M, ab.alloc_layouts(ab.PYTHIA_410M.depth))
    return ab.paper_config(points, steps=20_000)
