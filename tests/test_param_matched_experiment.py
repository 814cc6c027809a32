"""End to end: experiments.param_matched on the tiny preset (a few steps), resume, failure safety."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import param_matched
from rt_jax.train.config import get_preset

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "steps=4",
    "log_every=2",
    "eval_points=1",
    "eval_batches=1",
    "checkpoint_every=4",
    f"data.data_dir={REPO / 'data_cache'}",
]
KEYS = ("model", "layers", "width", "non_embedding_params", "seed", "val_ce", "tokens_per_s")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("param_matched")
    argv = ["--preset", "tiny", "--no-progress", "--out-dir", str(base / "results")]
    argv += ["--runs-dir", str(base / "runs"), "--throughput-rounds", "2"]
    for item in FAST:
        argv += ["--set", item]
    assert param_matched.main(argv) == 0
    return base, argv


def test_writes_json_markdown_png(finished):
    base, _ = finished
    results = base / "results"
    payload = json.loads((results / "param_matched_tiny.json").read_text())
    records = payload["records"]
    assert [(r["name"], r["seed"]) for r in records] == [("transformer-2L", 0), ("recurrent-2L", 0)]
    for r in records:
        assert all(k in r for k in KEYS)
        assert r["model"] in ("transformer", "recurrent")
        assert (r["layers"], r["width"], r["non_embedding_params"]) == (2, 32, 24_864)
        assert 0 < r["val_ce"] < 8 and r["tokens_per_s"] > 0
        assert r["tokens_per_s_during_training"] > 0  # the run's own; tokens_per_s is side by side
        metrics = Path(r["run_dir"]) / "metrics.jsonl"
        assert metrics.exists()
        assert Path(r["run_dir"]) == base / "runs" / "param_matched_tiny" / f"{r['name']}_s0"
    (comp,) = payload["comparisons"]
    ratio = records[1]["tokens_per_s"] / records[0]["tokens_per_s"]
    assert comp["tokens_per_s_ratio"] == pytest.approx(ratio)
    md = (results / "param_matched_tiny.md").read_text()
    assert "| Transformer | 2 | 32 |" in md and "| Recurrent Transformer | 2 | 32 |" in md
    assert "KV floats/token" in md and "Model vs Transformer of equal depth" in md
    assert "python -m experiments.param_matched --preset tiny" in md
    assert "Commit:" in md and "CPUs" in md
    assert (results / "param_matched_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(results.glob("*.tmp")) and not list(results.glob(".*.tmp"))


def test_rerun_resumes_without_retraining(finished):
    base, argv = finished
    run_dirs = sorted((base / "runs" / "param_matched_tiny").iterdir())
    before = {d: (d / "metrics.jsonl").read_text() for d in run_dirs}
    old = json.loads((base / "results" / "param_matched_tiny.json").read_text())["records"]
    assert param_matched.main(argv) == 0
    assert {d: (d / "metrics.jsonl").read_text() for d in run_dirs} == before
    new = json.loads((base / "results" / "param_matched_tiny.json").read_text())["records"]
    assert [r["val_ce"] for r in new] == [r["val_ce"] for r in old]


def test_failed_run_keeps_previous_results(finished, monkeypatch, capsys):
    base, argv = finished
    results = base / "results"
    good = {p.name: p.read_bytes() for p in results.glob("param_matched_tiny.*")}

    def broken(cfg, workdir, progress):
        raise FloatingPointError("loss=nan at step 3")

    monkeypatch.setattr(param_matched, "_train_cell", broken)
    assert param_matched.main(argv) == 1
    assert "2 of 2 runs failed" in capsys.readouterr().err
    failed = json.loads((results / "param_matched_tiny.failed.json").read_text())
    assert failed["failures"][0]["error"].startswith("FloatingPointError")
    for name, content in good.items():
        assert (results / name).read_bytes() == content


def test_bad_field_is_named():
    with pytest.raises(SystemExit):
        param_matched.main(["--preset", "tiny", "--set", "model.no_such_field=1"])
    with pytest.raises(ValueError, match="compare"):
        param_matched.describe_points(dataclasses.replace(get_preset("tiny"), compare=()))


def test_comparison_verdicts():
    common = dict(non_embedding_params=1000, train_flops_per_token=10.0)
    rows = [
        dict(name="t4", model="transformer", layers=4, depth=4, tokens_per_s=100.0, val_ce_mean=3.0,
             val_ce_sd=0.01, val_ce_min=2.99, val_ce_max=3.01, **common),
        dict(name="r4", model="recurrent", layers=4, depth=4, tokens_per_s=70.0, val_ce_mean=2.9,
             val_ce_sd=0.02, val_ce_min=2.88, val_ce_max=2.92, **common),
        dict(name="t8", model="transformer", layers=8, depth=8, tokens_per_s=50.0, val_ce_mean=3.1,
             val_ce_sd=None, val_ce_min=3.1, val_ce_max=3.1, **common),
    ]  # fmt: skip
    (c,) = param_matched.comparisons(rows)
    assert c["layers"] == 4 and c["tokens_per_s_ratio"] == pytest.approx(0.7)
    assert c["baseline"] == "t4" and c["train_flops_ratio"] == pytest.approx(1.0)
    assert c["val_ce_diff_vs_transformer"] == pytest.approx(-0.1)
    assert c["exceeds_spread"] is True and c["seed_ranges_overlap"] is False


def test_models_selects_and_adds_same_shape_families():
    cfg = get_preset("tiny")
    only = param_matched.select_models(cfg, ["recurrent"])
    assert [p.family_name for p in only.compare] == ["recurrent"]
    added = param_matched.select_models(cfg, ["transformer", "lrt-shared"])
    assert [p.family_name for p in added.compare] == ["transformer", "lrt-shared"]
    assert added.compare[1].options == "memory.kind=shared"
    assert added.compare[1].n_layers == cfg.compare[0].n_layers
    with pytest.raises(ValueError, match="need a preset"):
        param_matched.select_models(cfg, ["mesh"])
