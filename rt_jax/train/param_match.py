"""Parameter matching: the width that gives a model of a given depth a non-embedding parameter budget.

Both block types have the same parameters (RT reuses the Transformer's Q, KV, O and MLP matrices),
so one count serves both: per layer 4*D^2 + 2*D*F + 4*D (q, kv, o projections; MLP; four norm
weights), plus D for the final norm; multi-head attention (kv heads = query heads).

The default rule, ``rounding="floor"``, takes the widest multiple of the head dim whose count does
not exceed the budget. It reproduces the paper's models (12L x 1024 = 151,045,120 -> 6L x 1408 with
22 heads and MLP 5632; 24L x 1024 -> 12L x 1408 and 6L x 2048 with 32 heads); with 16 fixed heads it
gives the reference repository's 300m_12.yaml (12L x 1440, head dim 90).
"""

from __future__ import annotations

import dataclasses
import math

from rt_jax.train.config import ModelPoint

ROUNDINGS = ("floor", "nearest")


def non_embedding_params(n_layers: int, d_model: int, mlp_hidden: int) -> int:
    """Non-embedding parameters of an MHA model: L * (4 D^2 + 2 D F + 4 D) + D."""
    for name, value in (("n_layers", n_layers), ("d_model", d_model), ("mlp_hidden", mlp_hidden)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    d, f = d_model, mlp_hidden
    return n_layers * (4 * d * d + 2 * d * f + 4 * d) + d


@dataclasses.dataclass(frozen=True)
class MatchedShape:
    """A model shape solved for a parameter budget, with its exact count."""

    n_layers: int
    d_model: int
    n_heads: int
    mlp_hidden: int
    non_embedding_params: int
    budget: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def relative_gap(self) -> float:
        """(params - budget) / budget: negative when under the budget."""
        return (self.non_embedding_params - self.budget) / self.budget

    def point(self, block_type: str, name: str | None = None) -> ModelPoint:
        """The ``ModelPoint`` of this shape for one block type (default name "<type>-<L>L")."""
        if block_type not in ("transformer", "recurrent"):
            raise ValueError(f"block_type must be 'transformer' or 'recurrent', got {block_type!r}")
        return ModelPoint(
            name=name or f"{block_type}-{self.n_layers}L",
            block_type=block_type,
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            mlp_hidden=self.mlp_hidden,
        )


def match_width(
    budget: int,
    n_layers: int,
    *,
    head_dim: int = 64,
    n_heads: int | None = None,
    mlp_ratio: float = 4.0,
    rounding: str = "floor",
) -> MatchedShape:
    """Solve for the width of an ``n_layers`` model with ``budget`` non-embedding parameters.

    The width is a multiple of ``head_dim`` (heads = width / head_dim), or, when ``n_heads`` is
    given, a multiple of ``n_heads`` (head dim = width / n_heads). MLP = round(mlp_ratio * width).
    ``rounding="floor"``: widest width within the budget; ``"nearest"``: the closest count.
    """
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: expected one of {ROUNDINGS}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
    if n_heads is not None:
        if not isinstance(n_heads, int) or n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int or None, got {n_heads!r}")
        step = n_heads
    else:
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        step = head_dim

    def count(width: int) -> int:
        return non_embedding_params(n_layers, width, max(1, round(mlp_ratio * width)))

    # L (4 + 2 r) D^2 + (4 L + 1) D = budget, then walk to the exact multiple of ``step``
    a, b = n_layers * (4 + 2 * mlp_ratio), 4 * n_layers + 1
    k = max(1, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)) // step)
    while k > 1 and count(k * step) > budget:
        k -= 1
    while count((k + 1) * step) <= budget:
        k += 1
    if count(k * step) > budget:
        if rounding == "floor":
            raise ValueError(
                f"budget={budget:,} is below the smallest {n_layers}-layer model "
                f"(width {step}: {count(step):,} params); raise the budget or lower n_layers"
            )
    elif rounding == "nearest" and abs(count((k + 1) * step) - budget) < budget - count(k * step):
        k += 1
    width = k * step
    return MatchedShape(
        n_layers=n_layers,
        d_model=width,
        n_heads=n_heads if n_heads is not None else width // head_dim,
        mlp_hidden=max(1, round(mlp_ratio * width)),
        non_embedding_params=count(width),
        budget=budget,
    )


def matched_points(
    reference_layers: int,
    reference_width: int,
    depths: tuple[int, ...],
    block_types: tuple[str, ...] = ("transformer", "recurrent"),
    *,
    head_dim: int = 64,
    mlp_ratio: float = 4.0,
    rounding: str = "floor",
) -> tuple[ModelPoint, ...]:
    """Points for every (depth, block type), all matched to the reference L x D model's budget.

    The reference depth keeps the reference width exactly (heads = width / head_dim).
    """
    if reference_width % head_dim:
        raise ValueError(
            f"reference_width={reference_width} is not a multiple of head_dim={head_dim}"
        )
    ref_mlp = max(1, round(mlp_ratio * reference_width))
    budget = non_embedding_params(reference_layers, reference_width, ref_mlp)
    points = []
    for depth in depths:
        if depth == reference_layers:
            shape = MatchedShape(
                depth, reference_width, reference_width // head_dim, ref_mlp, budget, budget
            )
        else:
            shape = match_width(
                budget, depth, head_dim=head_dim, mlp_ratio=mlp_ratio, rounding=rounding
            )
        points.extend(shape.point(bt) for bt in block_types)
    return tuple(points)
