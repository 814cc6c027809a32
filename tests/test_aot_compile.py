"""experiments.aot_compile: one tiny train step compiled for a real TPU topology (libtpu) from CPU."""

from __future__ import annotations

import json

import libtpu  # noqa: F401  (a test dependency; compiles for TPU need it)
import pytest

from experiments import aot_compile


def test_tiny_compiles_for_v5e(tmp_path):
    records = aot_compile.run(
        ["tiny"],
        ["v5e:2x2"],
        [],
        tmp_path,
        points=["transformer-2L"],
        command="python -m experiments.aot_compile --presets tiny",
    )
    (r,) = records
    assert "error" not in r, r.get("error")
    assert r["device_kind"] == "TPU v5 lite" and r["n_devices"] == 4
    assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert r["hbm_bytes"] == 16 * 1024**3 and r["fits"] is True
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
        assert isinstance(r[key], int) and r[key] >= 0
    assert r["argument_bytes"] > 0
    assert r["total_bytes"] == (
        r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]
    )
    # state (params + 2 Adam moments, float32) is replicated on the data-parallel mesh
    n_params = r["total_params"]
    assert r["argument_bytes"] >= 3 * 4 * n_params
    from rt_jax.config import ModelConfig
    from rt_jax.train.flops import train_flops_per_step

    model = ModelConfig(
        vocab_size=257, embedding_size=264, d_model=32, n_heads=2, n_layers=2, mlp_hidden=128,
        block_type="transformer",
    )  # fmt: skip
    assert n_params == model.total_params()
    assert r["model_flops_per_step"] == train_flops_per_step(model, 32, 8)
    assert r["model_flops_per_device"] == r["model_flops_per_step"] / 4
    assert r["ideal_step_s_at_peak"] == pytest.approx(r["model_flops_per_device"] / 197e12)
    payload = json.loads((tmp_path / "aot_compile.json").read_text())
    assert payload["records"][0]["point"] == "transformer-2L"
    md = (tmp_path / "aot_compile.md").read_text()
    assert "| tiny | transformer-2L | v5e:2x2 (TPU v5 lite) | 4,1,1 | 8 x 32 / 1 |" in md
    assert "memory_analysis" in md
    (tmp_path / "aot_compile.md").unlink()
    aot_compile.main(["--render-only", "--out-dir", str(tmp_path)])
    assert (tmp_path / "aot_compile.md").read_text() == md


def test_suggestions_double_microbatches_then_remat():
    record = {"batch_size": 64, "mesh": {"data": 4, "fsdp": 1}, "microbatches": 2, "remat": False}
    assert aot_compile._suggestions(record, 16) == [
        ["microbatches=4"],
        ["microbatches=8"],
        ["microbatches=16"],
        ["microbatches=16", "model.remat=true"],
    ]
    record = {"batch_size": 8, "mesh": {"data": 4, "fsdp": 1}, "microbatches": 1, "remat": True}
    assert aot_compile._suggestions(record, 16) == [["microbatches=2"]]


def test_worker_failure_becomes_a_record():
    job = {"preset": "tiny", "overrides": [], "point": "transformer-2L", "topology": "v5e:2x2"}
    record = aot_compile._run_worker({**job, "extra": []}, timeout_s=0.01)
    assert record["error"].startswith("compile timed out")
    md = aot_compile.markdown([record], "cmd", "host", "abc")
    assert "| tiny | transformer-2L | v5e:2x2 |" in md and "compile timed out" in md


def test_parse_xla_oom_message():
    msg = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (20.26G) exceeds available HBM (15.75G)."
    )
    oom = aot_compile._parse_oom(msg)
    assert oom["required_bytes"] == int(20.26 * 1024**3)
    assert oom["available_bytes"] == int(15.75 * 1024**3)
    assert aot_compile._parse_oom("INVALID_ARGUMENT: bad mesh") is None
