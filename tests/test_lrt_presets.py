"""The LRT experiment presets (issue 14): every point builds, and one point of each trains 2
steps and reports the LRT evaluation numbers (exact, parallel, per pass, per position bucket)."""

import dataclasses

import numpy as np
import pytest

from rt_jax.data.config import DataConfig
from rt_jax.models.family import get_family
from rt_jax.train.config import get_preset, with_point
from rt_jax.train.loop import train

PRESETS = {"cpu-lrt-ablation": "lrt-shared-both-L2-S2", "cpu-lrt-strategy": "lrt-chunked-4x32"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_points_build(name):
    cfg = get_preset(name)
    names = [p.name for p in cfg.compare]
    assert len(set(names)) == len(names) and names[0] == "transformer-4L"
    for point in cfg.compare:
        cell = with_point(cfg, point, cfg.seeds[0])
        get_family(cell.model).validate(cell.model, cfg.data.seq_len)
        assert cell.model.memory.enabled == (point.family == "lrt")


@pytest.mark.parametrize("name", list(PRESETS))
def test_one_point_trains_two_steps(name, tmp_path):
    cfg = get_preset(name)
    point = next(p for p in cfg.compare if p.name == PRESETS[name])
    cell = with_point(cfg, point, 0)
    small = dataclasses.replace(
        cell,
        data=dataclasses.replace(cell.data, seq_len=64, batch_size=8),
        steps=2,
        log_every=1,
        eval_points=1,
        eval_batches=1,
        checkpoint_every=100,
    )
    assert isinstance(small.data, DataConfig)
    out = train(small, tmp_path / "run", progress=False)
    assert out["steps"] == 2 and np.isfinite(out["val_ce"])
    keys = set(out)
    assert {"val_ce_parallel", "val_ce_pass0", "val_ce_pos0_32", "val_ce_pos32_64"} <= keys
    assert f"val_ce_pass{cell.model.memory.passes}" in keys
