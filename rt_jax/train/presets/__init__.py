"""Training presets, one small file each; ``rt_jax.train.config.get_preset(name)`` loads them."""

MESH_ABLATIONS = (
    "cpu-mesh-buffer",
    "cpu-mesh-handoff",
    "cpu-mesh-untied",
    "cpu-mesh-alloc",
    "paper-mesh-buffer",
    "paper-mesh-handoff",
    "paper-mesh-untied",
    "paper-mesh-alloc",
)
"""The MeSH paper's ablations (``_mesh_ablation``), at CPU scale and at the paper's shapes."""

LRT_EXPERIMENTS = ("cpu-lrt-ablation", "cpu-lrt-strategy")
"""The LRT paper's architecture ablations and training-strategy comparison at CPU scale."""
