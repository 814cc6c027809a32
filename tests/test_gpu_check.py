"""experiments.gpu_check on CPU: argument checks, the no-GPU failure, a tiny dry run's results."""

from __future__ import annotations

import json

import pytest

from experiments import gpu_check


def test_arguments_are_checked():
    args = gpu_check.parse_args(["--phases", "layers", "--seq-lens", "512,2048"])
    assert args.phases == ["layers"] and args.seq_lens == [512, 2048]
    assert args.batch == 16 and args.d_model == 1024 and args.heads == 16 and args.mlp == 4096
    assert args.points == ["transformer-12L", "recurrent-12L"] and args.preset == "paper-150m"
    for bad in (["--phases", "bench"], ["--impls", "rt-fast"], ["--seq-lens", "a"],
                ["--heads", "3"], ["--reps", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_fails_fast_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="gpu-check needs a visible CUDA GPU"):
        gpu_check.main(["--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written: no half results


def test_dry_run_writes_results(tmp_path):
    """Tiny shapes on CPU: the layer timing and train-step code run and the files are written."""
    payload = gpu_check.main(
        [
            "--dry-run",
            "--phases",
            "layers,train",
            "--impls",
            "transformer-xla",  # one cheap layer: an RT layer compile costs a minute here
            "--points",
            "transformer-2L",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data == json.loads(json.dumps(payload))
    assert data["dry_run"] is True and data["command"].startswith("python -m experiments.gpu_check")
    assert data["commit"] and "JAX" in data["machine"]
    layers = {r["impl"]: r for r in data["layers"]}
    assert set(layers) == {"transformer-xla"}
    for row in layers.values():
        assert "error" not in row, row
        assert row["fwdbwd_ms"] > 0 and row["reps"] == 2 and row["seq_len"] == 16
    train = {r["point"]: r for r in data["train"]}
    assert set(train) == {"transformer-2L"}
    for row in train.values():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["microbatches"] >= 1 and row["total_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["step_s"], rel=0.01)
    md = (tmp_path / "gpu_check.md").read_text()
    assert (
        "DRY RUN" in md
        and "| transformer-xla | 2 | 16 | 32 |" in md
        and "| tiny | transformer-2L |" in md
    )


def test_microbatch_search_doubles_until_it_fits():
    """The fewest microbatches whose compiled memory fits: doubling, compile errors skipped."""
    sizes = {1: None, 2: 300, 4: 150, 8: 80}  # None: the compile failed

    def compile_at(micro):
        total = sizes[micro]
        if total is None:
            return None, "step", {"error": "RESOURCE_EXHAUSTED"}
        return f"compiled-{micro}", "step", {"total_bytes": total, "compile_s": 0.1}

    found, tried = gpu_check.fit_microbatches(1, 8, 200.0, compile_at, float("inf"))
    assert found == (4, "compiled-4", "step")
    assert [t["microbatches"] for t in tried] == [1, 2, 4] and "error" in tried[0]
    found, tried = gpu_check.fit_microbatches(1, 8, 10.0, compile_at, float("inf"))
    assert found is None and [t["microbatches"] for t in tried] == [1, 2, 4, 8]
    found, _ = gpu_check.fit_microbatches(2, 8, None, compile_at, float("inf"))
    assert found[0] == 2  # no known device memory: the first that compiles
    assert gpu_check.fit_microbatches(1, 8, None, compile_at, 0.0) == (None, [])  # out of time
