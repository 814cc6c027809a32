"""``paper-150m``: 12L x 1024 (16 heads) and 6L x 1408 (22 heads, MLP 5632), 12.5k steps."""

from rt_jax.train.config import TrainConfig
from rt_jax.train.presets._paper import paper_config, points


def config() -> TrainConfig:
    """The paper-150m preset."""
    return paper_config(12_500, points(((12, 1024, 16, 4096), (6, 1408, 22, 5632))))
