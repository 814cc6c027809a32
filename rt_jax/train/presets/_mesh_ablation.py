"""The MeSH paper's ablations (arXiv 2510.07739) as parameter-matched comparisons (issue 15).

Four sweeps, each at CPU scale (``cpu-mesh-*``) and at the paper's Pythia shapes (``paper-mesh-*``),
run by ``python -m experiments.param_matched --preset <name>``:

* ``buffer`` (Table 3): MeSH with S = Nloop+1 .. Nloop+4 buffer slots (k = 0..3 scratch slots).
* ``handoff`` (Table 4): the vanilla model, recursive-base, the fixed combinations +anchor,
  +residual+anchor, +residual+anchor+anchor*, +anchor+anchor*, the trainable static and dynamic
  combinations of f(h), h^(0) and e (``loop.alpha``), and MeSH.
* ``untied`` (Table 6): vanilla, vanilla+mesh (untied cores, ``loop.tie_core=false``), recursive and
  recursive+mesh.
* ``alloc`` (Fig. 8): base and MeSH at every prelude/core/coda split of one compute depth with
  Nloop = 2, plus the vanilla model.

Every point uses the paper's backbone: GPT-NeoX blocks (``block_style=neox``: parallel residual,
biases, rotary on 25% of each head), embeddings times sqrt(D) and the depth-aware init
(``output_init=depth``), the vanilla models included, so the points differ only in what each table
varies. The CPU sweeps take cpu-mesh's recipe (byte-level Shakespeare, 8 x 128 tokens per step,
lr 3e-3, width 128, 4 heads, MLP 512) at compute depth 6 (Fig. 8: 8). The paper-shape sweeps take
Pythia-410M (24 layers x 1024, 16 heads; Table 6: Pythia-1.4B, 24 x 2048) on the library's C4
recipe (``_paper.paper_config``: T5 vocabulary, 512 x 512 tokens per step, bf16, flash attention)
with Pythia's lr 3e-4; the paper trained on the Pile with the GPT-NeoX tokenizer (not wired in
here), 512 x 4096 tokens per step, for 250B tokens.
"""

from __future__ import annotations

import dataclasses

from rt_jax.train.config import ModelPoint, TrainConfig, point_model

NEOX = "block_style=neox,position=rope,rotary_pct=0.25,embed_scale=true,output_init=depth"
"""The paper's backbone and settings, for every point."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """Width, heads, MLP width and compute depth of one sweep."""

    d_model: int
    n_heads: int
    mlp: int
    depth: int


CPU = Shape(128, 4, 512, 6)
CPU_ALLOC = Shape(128, 4, 512, 8)
PYTHIA_410M = Shape(1024, 16, 4096, 24)
PYTHIA_1_4B = Shape(2048, 16, 8192, 24)


def _stored(layout: str, tie_core: bool = True) -> int:
    pre, core_loop, coda = layout.split("+")
    core, n_loop = (int(v) for v in core_loop.split("R"))
    return int(pre) + (core if tie_core else core * n_loop) + int(coda)


def vanilla(shape: Shape, name: str = "") -> ModelPoint:
    """The full-depth standard model with the paper's settings."""
    return ModelPoint(
        name or f"vanilla-{shape.depth}L",
        "transformer",
        shape.depth,
        shape.d_model,
        shape.n_heads,
        shape.mlp,
        family="vanilla",
        options=NEOX,
    )


def looped(
    shape: Shape,
    name: str,
    layout: str,
    handoff: str,
    *,
    slots: int | None = None,
    alpha: str = "fixed",
    tie_core: bool = True,
) -> ModelPoint:
    """A recursive point of ``shape`` (``layout`` must have its compute depth)."""
    options = f"{NEOX},loop.layout={layout},loop.handoff={handoff}"
    if slots is not None:
        options += f",loop.mesh_slots={slots}"
    if alpha != "fixed":
        options += f",loop.alpha={alpha}"
    if not tie_core:
        options += ",loop.tie_core=false"
    return ModelPoint(
        name,
        "transformer",
        _stored(layout, tie_core),
        shape.d_model,
        shape.n_heads,
        shape.mlp,
        family=name,
        options=options,
    )


def buffer_points(shape: Shape, layout: str) -> tuple[ModelPoint, ...]:
    """Table 3: MeSH with k = 0..3 scratch slots (S = Nloop + 1 + k)."""
    n_loop = int(layout.split("R")[1].split("+")[0])
    return tuple(
        looped(shape, f"mesh-S{n_loop + 1 + k}", layout, "mesh", slots=n_loop + 1 + k)
        for k in range(4)
    )


HANDOFFS = (
    ("recursive-base", "base", "fixed"),
    ("anchor", "anchor", "fixed"),
    ("residual+anchor", "residual+anchor", "fixed"),
    ("residual+anchor+anchor-emb", "residual+anchor+anchor-emb", "fixed"),
    ("anchor+anchor-emb", "anchor+anchor-emb", "fixed"),
    ("static-comb", "anchor+anchor-emb", "static"),
    ("dynamic-comb", "anchor+anchor-emb", "dynamic"),
    ("mesh", "mesh", "fixed"),
)
"""Table 4's rows after vanilla: (point name, loop.handoff, loop.alpha)."""


def handoff_points(shape: Shape, layout: str) -> tuple[ModelPoint, ...]:
    """Table 4: vanilla, then every hand-off combination of ``HANDOFFS``."""
    return (vanilla(shape),) + tuple(
        looped(shape, name, layout, handoff, alpha=alpha) for name, handoff, alpha in HANDOFFS
    )


def untied_points(shape: Shape, layout: str) -> tuple[ModelPoint, ...]:
    """Table 6: vanilla, vanilla+mesh (untied cores: 100% of the parameters), recursive and
    recursive+mesh."""
    return (
        vanilla(shape),
        looped(shape, "vanilla+mesh-untied", layout, "mesh", tie_core=False),
        looped(shape, "recursive-base", layout, "base"),
        looped(shape, "recursive+mesh", layout, "mesh"),
    )


def alloc_layouts(depth: int, n_loop: int = 2) -> tuple[str, ...]:
    """Every symmetric prelude/core/coda split p + c R n_loop + p of ``depth`` (c >= 1)."""
    out = []
    for pre in range(depth):
        core, rest = divmod(depth - 2 * pre, n_loop)
        if core >= 1 and not rest:
            out.append(f"{pre}+{core}R{n_loop}+{pre}")
    return tuple(out)


def alloc_points(shape: Shape, layouts: tuple[str, ...]) -> tuple[ModelPoint, ...]:
    """Fig. 8: vanilla, then base and MeSH at each layout."""
    return (vanilla(shape),) + tuple(
        looped(shape, f"{kind}-{layout}", layout, kind)
        for layout in layouts
        for kind in ("base", "mesh")
    )


def cpu_config(points: tuple[ModelPoint, ...], steps: int, seeds: tuple[int, ...]) -> TrainConfig:
    """cpu-mesh's recipe (cpu-demo's data and lr) with these points."""
    from rt_jax.train.presets import cpu_demo

    base = cpu_demo.config()
    return dataclasses.replace(
        base,
        model=point_model(base.model, points[0]),
        steps=steps,
        checkpoint_every=max(1, steps // 4),
        compare=points,
        seeds=seeds,
        tune_steps=0,  # tune at steps // 3, not cpu-demo's 500 of its 2,000
    )


def paper_config(points: tuple[ModelPoint, ...], steps: int) -> TrainConfig:
    """The library's C4 recipe at the paper's shapes, Pythia's lr 3e-4."""
    from rt_jax.train.presets import _paper

    return dataclasses.replace(_paper.paper_config(steps, points), lr=3e-4)
