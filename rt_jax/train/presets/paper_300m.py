"""``paper-300m``: 24L x 1024, 12L x 1408 (22 heads, MLP 5632), 6L x 2048 (32 heads), 25k steps."""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets._paper import paper_config, points


def config() -> TrainConfig:
    """The paper-300m preset."""
    return paper_config(
        25_000, points(((24, 1024, 16, 4096), (12, 1408, 22, 5632), (6, 2048, 32, 8192)))
    )
