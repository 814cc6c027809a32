"""TrainConfig, presets, overrides, schedule, and the early validation errors."""

import dataclasses
import pathlib

import numpy as np
import pytest

from rt_jax.config import LoopConfig, MemoryConfig, ModelConfig
from rt_jax.data.config import DataConfig
from rt_jax.train.config import (
    PRESETS,
    MeshConfig,
    ModelPoint,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    get_preset,
    load_config,
    with_point,
)
from rt_jax.train.loop import check_vocab
from rt_jax.train.metrics import eval_steps
from rt_jax.train.optim import learning_rate_schedule


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid_and_round_trip(name):
    cfg = get_preset(name)
    assert cfg.compare, f"{name} names its comparison points"
    for point in cfg.compare:
        cell = with_point(cfg, point, cfg.seeds[-1])
        assert cell.model.n_layers == point.n_layers and cell.model.d_model == point.d_model
        assert cell.model.mlp_hidden == point.mlp_hidden and cell.seed == cfg.seeds[-1]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_presets_follow_the_reference_recipe():
    for name, steps, widths in (
        ("paper-150m", 12_500, {(12, 1024), (6, 1408)}),
        ("paper-300m", 25_000, {(24, 1024), (12, 1408), (6, 2048)}),
    ):
        cfg = get_preset(name)
        assert cfg.steps == steps and cfg.tokens_per_step() == 512 * 512
        assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (
            0.9,
            0.95,
            1e-8,
            0.0,
            1.0,
        )
        assert cfg.model.vocab_size == 32100 and cfg.model.embedding_size == 32128
        assert cfg.model.compute_dtype == "bfloat16" and cfg.data.corpus == "c4"
        assert {(p.n_layers, p.d_model) for p in cfg.compare} == widths
        assert {p.block_type for p in cfg.compare} == {"transformer", "recurrent"}
        for p in cfg.compare:
            assert p.d_model % p.n_heads == 0


def test_param_matched_pairs_are_close():
    for name in ("cpu-demo", "cpu-full"):
        cfg = get_preset(name)
        counts = [with_point(cfg, p, 0).model.non_embedding_params() for p in cfg.compare]
        assert max(counts) / min(counts) < 1.03, (name, counts)


def test_schedule_warmup_peak_and_floor():
    cfg = dataclasses.replace(get_preset("tiny"), steps=1000, lr=2e-3)
    sched = learning_rate_schedule(cfg)
    np.testing.assert_allclose(float(sched(0)), 0.1 * 2e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(200)), 0.55 * 2e-3, rtol=1e-5)  # halfway up
    np.testing.assert_allclose(float(sched(400)), 2e-3, rtol=1e-6)  # peak at 40%
    np.testing.assert_allclose(float(sched(700)), 0.55 * 2e-3, rtol=1e-4)  # cosine midpoint
    np.testing.assert_allclose(float(sched(1000)), 0.1 * 2e-3, rtol=1e-5)  # floor
    values = np.asarray([float(sched(s)) for s in range(0, 1001, 50)])
    assert np.all(np.diff(values[:9]) > 0) and np.all(np.diff(values[8:]) < 0)


def test_overrides_parse_by_type_and_follow_derived_fields():
    cfg = get_preset("tiny")
    out = apply_overrides(
        cfg,
        [
            "steps=7",
            "lr=0.01",
            "keep_best=false",
            "model.d_model=64",
            "model.n_heads=4",
            "data.seq_len=16",
            "mesh.tensor=2",
            "seeds=1,2,3",
            "coordinator_address=none",
        ],
    )
    assert (out.steps, out.lr, out.keep_best, out.seeds) == (7, 0.01, False, (1, 2, 3))
    assert out.model.d_model == 64 and out.model.mlp_hidden == 256  # follows d_model
    assert out.model.n_kv_heads == 4  # follows n_heads
    assert out.model.embedding_size == 264  # set explicitly in the preset: kept
    assert out.data.seq_len == 16 and out.mesh == MeshConfig(-1, 1, 2)
    assert (
        apply_overrides(cfg, ["model.mlp_hidden=100", "model.d_model=64"]).model.mlp_hidden == 100
    )
    # a section is validated once, after all its overrides: order does not matter
    both = apply_overrides(cfg, ["model.vocab_size=300", "model.embedding_size=304", "steps=3"])
    assert (both.model.vocab_size, both.model.embedding_size, both.steps) == (300, 304, 3)
    assert apply_overrides(cfg, ["steps=3", "steps=4"]).steps == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stepz=3", "unknown field 'stepz'"),
        ("model.width=3", "unknown field 'width' in ModelConfig"),
        ("steps=ten", "expected an int"),
        ("keep_best=maybe", "expected a bool"),
        ("steps=0", "steps"),
        ("model=3", "model is a section"),
        ("steps", "expected field=value"),
        ("model.n_heads=3", "n_heads"),
        ("compare=x", "cannot"),
        ("mesh.data=-1", None),
        ("mesh.fsdp=-1", "only one of mesh"),
        ("microbatches=3", "microbatches=3"),
    ],
)
def test_override_errors_name_the_field(override, message):
    cfg = get_preset("tiny")
    if message is None:
        apply_overrides(cfg, [override])
        return
    with pytest.raises(ValueError, match=message):
        apply_overrides(cfg, [override])


def test_vocab_mismatch_names_the_field():
    cfg = get_preset("tiny")
    check_vocab(cfg)  # byte tokenizer: 257
    bad = apply_overrides(cfg, ["model.vocab_size=256"])
    with pytest.raises(ValueError, match=r"model.vocab_size=256 .* set model.vocab_size=257"):
        check_vocab(bad)


def test_mesh_resolution():
    assert MeshConfig(-1, 2, 2).resolve(8) == (2, 2, 2)
    assert MeshConfig(1, -1, 1).resolve(4) == (1, 4, 1)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(-1, 3, 1).resolve(8)
    assert MeshConfig(2, 2, 1).resolve(8) == (2, 2, 1)  # the first 4 devices
    with pytest.raises(ValueError, match="need 16 devices but only 8"):
        MeshConfig(4, 4, 1).resolve(8)


def test_eval_steps_are_log_spaced():
    steps = eval_steps(1000, 10)
    assert steps[0] == 0 and steps[-1] == 1000 and steps[1] == 1
    assert len(steps) == 11  # 0 and 10 distinct log-spaced points
    ratios = np.diff(np.log(steps[1:]))
    assert np.allclose(ratios, np.log(1000) / 9, atol=0.16)  # rounding moves the small ones
    assert eval_steps(5, 0) == []


def test_with_point_keeps_the_data_order():
    cfg = get_preset("tiny")
    point = ModelPoint("recurrent-1L", "recurrent", 1, 48, 3, 96)
    cell = with_point(cfg, point, 5)
    assert cell.model.block_type == "recurrent" and cell.model.n_kv_heads == 3
    assert cell.data == cfg.data and cell.seed == 5 and cell.compare == ()


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.5)
    with pytest.raises(ValueError, match="data.batch_size=8 is not divisible by microbatches=3"):
        TrainConfig(data=DataConfig(batch_size=8), microbatches=3)
    with pytest.raises(ValueError, match="float64"):
        TrainConfig(model=ModelConfig(compute_dtype="float64"))


DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("preset", ["cpu-lrt", "cpu-mesh"])
def test_run_configs_saved_before_the_sections_load(preset):
    """Configs written by ``save_config`` before the family sections existed (flat ``memory``,
    ``memory_*``, ``loop``, ``handoff``, ``mesh_slots`` and flat ModelPoint options; the files in
    tests/data were written by commit 444658c) load as the same models."""
    old = load_config(DATA / f"run_config_{preset}_flat.json")
    new = get_preset(preset)
    assert old.model == new.model
    new_points = {p.name: p for p in new.compare}  # the presets have gained points since
    for old_point in old.compare:
        new_point = new_points[old_point.name]
        assert old_point.options != new_point.options or not old_point.options
        assert with_point(old, old_point, 0).model == with_point(new, new_point, 0).model


def test_single_model_run_configs_saved_before_the_sections_load():
    lrt = load_config(DATA / "run_config_lrt-shared-4L_s1_flat.json").model
    assert lrt.family == "lrt" and lrt.memory == MemoryConfig(kind="shared", reset_token=256)
    mesh = load_config(DATA / "run_config_mesh_s0_flat.json").model
    assert mesh.family == "recursive" and mesh.embed_scale
    assert mesh.loop == LoopConfig(layout="1+2R2+1", handoff="mesh")
    assert (
        config_from_dict(config_to_dict(load_config(DATA / "run_config_mesh_s0_flat.json"))).model
        == mesh
    )


def test_section_overrides_and_the_old_flat_names():
    cfg = apply_overrides(
        get_preset("cpu-lrt"), ["model.memory.kind=shared", "model.memory.layer=2"]
    )
    assert cfg.model.memory == MemoryConfig(kind="shared", layer=2, reset_token=256)
    cfg = apply_overrides(
        get_preset("cpu-demo"),
        ["model.loop.layout=1+2R2+1", "model.loop.handoff=mesh", "model.n_layers=4"],
    )
    assert cfg.model.family == "recursive" and cfg.model.cache_layers == 6
    with pytest.raises(ValueError, match=r"model\.memory\.layer"):
        apply_overrides(get_preset("cpu-lrt"), ["model.memory_layer=2"])
    with pytest.raises(ValueError, match=r"memory\.layer=9"):
        apply_overrides(get_preset("cpu-lrt"), ["model.memory.kind=shared", "model.memory.layer=9"])
    with pytest.raises(ValueError, match=r"loop\.handoff='ring'"):
        apply_overrides(get_preset("cpu-demo"), ["model.loop.handoff=ring"])
