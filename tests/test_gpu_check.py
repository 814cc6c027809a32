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
            "rt-tiled,transformer-xla",
            "--out-dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data == json.loads(json.dumps(payload))
    assert data["dry_run"] is True and data["command"].startswith("python -m experiments.gpu_check")
    assert data["commit"] and "JAX" in data["machine"]
    layers = {r["impl"]: r for r in data["layers"]}
    assert set(layers) == {"rt-tiled", "transformer-xla"}
    for row in layers.values():
        assert "error" not in row, row
        assert row["fwdbwd_ms"] > 0 and row["reps"] == 2 and row["seq_len"] == 16
    train = {r["point"]: r for r in data["train"]}
    assert set(train) == {"transformer-2L", "recurrent-2L"}
    for row in train.values():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["microbatches"] >= 1 and row["total_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx(8 * 32 / row["step_s"], rel=0.01)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| rt-tiled | 2 | 16 | 32 |" in md and "recurrent-2L" in md


def test_train_step_raises_microbatches_until_it_fits(monkeypatch):
    """With a tiny device memory the search doubles the microbatches and reports what it tried."""
    import jax

    args = gpu_check.parse_args(["--dry-run", "--max-microbatches", "2"])
    monkeypatch.setattr(gpu_check, "_device_memory", lambda device: 1)  # 1 byte: nothing fits
    row = gpu_check.time_train_step(args, "transformer-2L", jax.devices()[0], float("inf"))
    assert row["error"].startswith("no microbatching up to 2 fits")
    assert [t["microbatches"] for t in row["tried"]] == [1, 2]
    assert all(t["total_bytes"] > 1 for t in row["tried"])
