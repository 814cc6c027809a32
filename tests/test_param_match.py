"""Parameter matching reproduces the paper's model table and agrees with ModelConfig's count."""

from __future__ import annotations

import pytest

from rt_jax.config import ModelConfig
from rt_jax.train.config import ModelPoint
from rt_jax.train.param_match import (
    MatchedShape,
    match_width,
    matched_points,
    non_embedding_params,
)

# papers doc section 4.1: (layers, d_model, heads, MLP, non-embedding params)
PAPER = {
    "150m": (12, 1024, 16, 4096, 151_045_120),
    "150m_6": (6, 1408, 22, 5632, 142_772_608),
    "300m": (24, 1024, 16, 4096, 302_089_216),
    "300m_12": (12, 1408, 22, 5632, 285_543_808),
    "300m_12_file": (12, 1440, 16, 5760, 298_668_960),
    "300m_6": (6, 2048, 32, 8192, 302_041_088),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_counts_match_paper_and_model_config(name):
    layers, width, heads, mlp, expected = PAPER[name]
    assert non_embedding_params(layers, width, mlp) == expected
    cfg = ModelConfig(d_model=width, n_heads=heads, n_layers=layers, mlp_hidden=mlp)
    assert cfg.non_embedding_params() == expected


@pytest.mark.parametrize(
    "budget_of, layers, n_heads, expected",
    [
        ("150m", 6, None, "150m_6"),
        ("300m", 12, None, "300m_12"),
        ("300m", 6, None, "300m_6"),
        ("300m", 24, None, "300m"),
        ("150m", 12, None, "150m"),
        ("300m", 12, 16, "300m_12_file"),
    ],
)
def test_match_width_reproduces_paper(budget_of, layers, n_heads, expected):
    budget = PAPER[budget_of][4]
    shape = match_width(budget, layers, n_heads=n_heads)
    e_layers, e_width, e_heads, e_mlp, e_params = PAPER[expected]
    assert (shape.n_layers, shape.d_model, shape.n_heads, shape.mlp_hidden) == (
        e_layers,
        e_width,
        e_heads,
        e_mlp,
    )
    assert shape.non_embedding_params == e_params
    assert shape.non_embedding_params <= budget
    assert shape.relative_gap == pytest.approx((e_params - budget) / budget)


def test_floor_is_widest_within_budget_and_nearest_is_closest():
    budget = PAPER["300m"][4]
    floor = match_width(budget, 12)
    above = non_embedding_params(12, floor.d_model + 64, 4 * (floor.d_model + 64))
    assert above > budget  # one more head would exceed the budget
    nearest = match_width(budget, 12, rounding="nearest")
    # 12L: 1408 -> 285.5M (16.5M under), 1472 -> 312.1M (10.0M over): nearest takes 1472
    assert nearest.d_model == 1472 and nearest.n_heads == 23
    assert abs(nearest.non_embedding_params - budget) < abs(floor.non_embedding_params - budget)


def test_ratio_and_head_count_options():
    shape = match_width(10_000_000, 4, head_dim=32, mlp_ratio=2.0)
    assert shape.d_model % 32 == 0 and shape.head_dim == 32
    assert shape.mlp_hidden == 2 * shape.d_model
    assert shape.non_embedding_params == non_embedding_params(4, shape.d_model, shape.mlp_hidden)
    wider = non_embedding_params(4, shape.d_model + 32, 2 * (shape.d_model + 32))
    assert shape.non_embedding_params <= 10_000_000 < wider


def test_matched_points_for_paper_300m():
    points = matched_points(24, 1024, (24, 12, 6))
    assert points[0] == ModelPoint("transformer-24L", "transformer", 24, 1024, 16, 4096)
    assert points[3] == ModelPoint("recurrent-12L", "recurrent", 12, 1408, 22, 5632)
    assert points[5] == ModelPoint("recurrent-6L", "recurrent", 6, 2048, 32, 8192)
    assert len(points) == 6


def test_bad_inputs():
    with pytest.raises(ValueError, match="budget"):
        match_width(0, 2)
    with pytest.raises(ValueError, match="below the smallest"):
        match_width(1000, 2)
    with pytest.raises(ValueError, match="rounding"):
        match_width(10**6, 2, rounding="up")
    with pytest.raises(ValueError, match="n_heads"):
        match_width(10**6, 2, n_heads=0)
    with pytest.raises(ValueError, match="block_type"):
        MatchedShape(1, 64, 1, 256, 1, 1).point("lstm")
    with pytest.raises(ValueError, match="multiple of head_dim"):
        matched_points(2, 100, (1,))


def test_cpu_presets_are_matched_by_the_solver():
    """cpu-demo/cpu-full's 2L x 180 (6 heads) is the floor match of 4L x 128's budget."""
    budget = non_embedding_params(4, 128, 512)
    shape = match_width(budget, 2, n_heads=6)
    assert (shape.d_model, shape.mlp_hidden, shape.non_embedding_params) == (180, 720, 779_220)
    assert budget == 788_608
