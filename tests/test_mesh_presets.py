"""The MeSH paper's ablation presets (issue 15): every point builds, the sweeps vary what their
table varies, and one point of each CPU preset trains two steps (the full runs are hours)."""

from __future__ import annotations

import dataclasses

import pytest

from rt_jax.models.family import get_family
from rt_jax.train.config import PRESETS, apply_overrides, get_preset, with_point
from rt_jax.train.loop import train
from rt_jax.train.presets import MESH_ABLATIONS, _mesh_ablation

CPU_PRESETS = [name for name in MESH_ABLATIONS if name.startswith("cpu-")]


def _models(name: str) -> dict:
    cfg = get_preset(name)
    models = {p.name: with_point(cfg, p, cfg.seeds[0]).model for p in cfg.compare}
    for model in models.values():
        get_family(model).validate(model, cfg.data.seq_len)
        assert model.block_style == "neox" and model.embed_scale and model.rotary_pct == 0.25
    return models


@pytest.mark.parametrize("name", MESH_ABLATIONS)
def test_preset_points_build(name):
    assert name in PRESETS
    models = _models(name)
    depths = {m.cache_layers for m in models.values()}
    assert len(depths) == 1, f"{name}: every point has the same compute depth, got {depths}"
    if name.endswith("buffer"):
        assert sorted(m.loop.n_slots for m in models.values()) == [3, 4, 5, 6]
    if name.endswith("handoff"):
        handoffs = {(m.loop.handoff, m.loop.alpha) for m in models.values() if m.loop.enabled}
        assert len(handoffs) == len(_mesh_ablation.HANDOFFS) == 8
    if name.endswith("untied"):
        vanilla, untied = models[next(iter(models))], models["vanilla+mesh-untied"]
        routers = untied.loop.extra_params(untied)
        assert untied.non_embedding_params() == vanilla.non_embedding_params() + routers
        rec = models["recursive+mesh"]
        assert rec.non_embedding_params() < untied.non_embedding_params()
    if name.endswith("alloc"):
        assert all(m.loop.parsed().n_loop == 2 for m in models.values() if m.loop.enabled)


def test_paper_shapes_are_pythias():
    models = _models("paper-mesh-handoff")
    vanilla = models["vanilla-24L"]
    assert vanilla.non_embedding_params() == 302_311_424  # Pythia-410M
    assert models["mesh"].loop.extra_params(models["mesh"]) == 30_750  # Table 1's 410M routers
    assert _mesh_ablation.alloc_layouts(24)[:2] == ("0+12R2+0", "1+11R2+1")


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_one_point_trains_two_steps(name, tmp_path):
    cfg = apply_overrides(
        get_preset(name), ["steps=2", "eval_points=1", "eval_batches=1", "log_every=1"]
    )
    picks = {"cpu-mesh-handoff": "dynamic-comb", "cpu-mesh-untied": "vanilla+mesh-untied"}
    point = next(p for p in cfg.compare if p.name == picks.get(name, cfg.compare[-1].name))
    cell = dataclasses.replace(with_point(cfg, point, 0), checkpoint_every=2)
    result = train(cell, tmp_path, progress=False)
    assert result["steps"] == 2 and result["val_ce"] > 0
