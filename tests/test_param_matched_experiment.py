"""End to end: experiments.param_matched on the tiny preset (a few steps, real training): lr
tuning, seeds on the test split, resume, failure safety (tests/test_param_matched_harness.py
checks the harness's logic with a stand-in for training, in `make test`)."""

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
    "tune_steps=2",
    "seeds=0,1",
    f"data.data_dir={REPO / 'data_cache'}",
]
KEYS = ("model", "layers", "width", "non_embedding_params", "seed", "ce", "split", "tokens_per_s")


pytestmark = pytest.mark.timeout(1800)  # 10 real training cells; slow on a loaded machine


@pytest.fixture(scope="module", autouse=True)
def no_widening():
    """3 tuning cells per model (widening is checked without training in test_..._harness)."""
    widen, param_matched.MAX_WIDEN = param_matched.MAX_WIDEN, 0
    yield
    param_matched.MAX_WIDEN = widen


@pytest.fixture(scope="module")
def finished(tmp_path_factory, no_widening):
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
    assert sorted((r["name"], r["seed"]) for r in records) == [
        ("recurrent-2L", 0), ("recurrent-2L", 1), ("transformer-2L", 0), ("transformer-2L", 1)
    ]  # fmt: skip
    for r in records:
        assert all(k in r for k in KEYS)
        assert r["model"] in ("transformer", "recurrent") and r["split"] == "test"
        assert (r["layers"], r["width"], r["non_embedding_params"]) == (2, 32, 24_864)
        assert 0 < r["ce"] < 8 and r["tokens_per_s"] > 0
        assert r["tokens_per_s_during_training"] > 0  # the run's own; tokens_per_s is side by side
        assert r["curve"][-1][0] == 4 and r["curve"][-1][1] == r["ce"]
        assert (
            Path(r["run_dir"]) == base / "runs" / "param_matched_tiny" / f"{r['name']}_s{r['seed']}"
        )
        assert (Path(r["run_dir"]) / "metrics.jsonl").exists()
    for t in payload["tuning"].values():
        assert len(t["val_ce"]) >= 3 and t["pick"] in t["tried"]
    assert all(r["split"] == "validation" and r["steps"] == 2 for r in payload["tune_records"])
    (comp,) = payload["comparisons"]
    assert set(comp["views"]) == {"params", "flops", "wallclock"}
    md = (results / "param_matched_tiny.md").read_text()
    assert "| Transformer (transformer-2L) | 2 | 32 |" in md
    assert "Learning rate per model" in md and "Equal training FLOPs" in md
    assert "python -m experiments.param_matched --preset tiny" in md
    assert "Commit" in md or "commits" in md
    assert (results / "param_matched_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(results.glob("*.tmp")) and not list(results.glob(".*.tmp"))
    parts = results / "param_matched_tiny_parts"
    assert len(list(parts.glob("final_*.json"))) == 4 and len(list(parts.glob("tune_*.json"))) >= 6


def test_rerun_resumes_without_retraining(finished):
    base, argv = finished
    run_dirs = sorted((base / "runs" / "param_matched_tiny").glob("*_s*"))
    before = {d: (d / "metrics.jsonl").read_text() for d in run_dirs}
    old = json.loads((base / "results" / "param_matched_tiny.json").read_text())["records"]
    assert param_matched.main(argv) == 0
    assert {d: (d / "metrics.jsonl").read_text() for d in run_dirs} == before
    new = json.loads((base / "results" / "param_matched_tiny.json").read_text())["records"]
    assert [r["ce"] for r in new] == [r["ce"] for r in old]


def test_failed_run_keeps_previous_results(finished, monkeypatch, capsys):
    base, argv = finished
    results = base / "results"
    good = {p.name: p.read_bytes() for p in results.glob("param_matched_tiny.*")}

    def broken(cfg, workdir, progress):
        raise FloatingPointError("loss=nan at step 3")

    monkeypatch.setattr(param_matched, "_train_cell", broken)
    other = [a.replace("eval_batches=1", "eval_batches=2") for a in argv]  # new cells: all train
    assert param_matched.main(other) == 1
    assert "2 of 4 cells failed" in capsys.readouterr().err
    failed = json.loads((results / "param_matched_tiny.failed.json").read_text())
    assert failed["failures"][0]["error"].startswith("FloatingPointError")
    for name, content in good.items():
        assert (results / name).read_bytes() == content


def test_bad_field_is_named():
    with pytest.raises(SystemExit):
        param_matched.main(["--preset", "tiny", "--set", "model.no_such_field=1"])
    with pytest.raises(ValueError, match="compare"):
        param_matched.describe_points(dataclasses.replace(get_preset("tiny"), compare=()))


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
