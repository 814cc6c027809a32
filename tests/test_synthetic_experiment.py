"""The synthetic-suite experiment runs end to end and writes its table, plot and records."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments.synthetic import Grid, main, sweep
from rt_jax.data.synthetic import make_batch
from rt_jax.models.lm import init_params
from rt_jax.train.tasks import TaskRun, masked_loss_and_accuracy, train_task


def _tiny(**kw):
    base = dict(
        task="parity", d_model=16, n_heads=2, mlp_hidden=32, seq_len=8, steps=3, batch_size=4
    )
    base.update(kw)
    return TaskRun(**base)


def test_masked_metrics_score_only_masked_positions():
    run = _tiny(task="copy", seq_len=9)
    config = run.model_config()
    params = init_params(config, jax.random.key(0))
    batch = make_batch("copy", 0, 4, 9)
    loss, acc = masked_loss_and_accuracy(params, batch, config)
    flipped = batch._replace(targets=np.where(batch.mask, batch.targets, 0))
    loss2, acc2 = masked_loss_and_accuracy(params, flipped, config)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    np.testing.assert_allclose(acc, acc2, rtol=1e-6)
    assert np.isfinite(float(loss)) and 0.0 <= float(acc) <= 1.0


def test_single_cell_cli_writes_record(tmp_path):
    out = tmp_path / "cell.json"
    main(
        "--task mod5 --model transformer --width 16 --heads 2 --seq-len 8 --steps 2 --batch 4 "
        f"--out {out}".split()
    )
    row = json.loads(out.read_text())
    keys = {"task", "model", "layers", "width", "seq_len", "seed", "steps", "accuracy"}
    assert keys <= set(row) and row["task"] == "mod5" and row["steps"] == 2


def test_sweep_writes_table_plot_and_json(tmp_path):
    grid = Grid("mini", ("parity",), (8,), (0,), 2, 1, 8, (1e-3,), batch_size=4)
    rows = sweep(grid, _tiny(), tmp_path)
    assert {r["model"] for r in rows} == {"transformer", "recurrent"}
    data = json.loads((tmp_path / "synthetic_mini.json").read_text())
    assert set(data["meta"]["lr_picks"]) == {"parity/transformer", "parity/recurrent"}
    table = (tmp_path / "synthetic_mini.md").read_text()
    assert "| parity | recurrent |" in table
    assert (tmp_path / "synthetic_mini.png").stat().st_size > 1000


def test_training_reduces_loss_on_parity_for_rt():
    result = train_task(dataclasses.replace(_tiny(seq_len=8, steps=25, lr=3e-3), impl="tiled"))
    first, last = result["curve"][0]["loss"], result["curve"][-1]["loss"]
    assert last < first


def test_bad_cell_raises():
    with pytest.raises(ValueError, match="seq_len"):
        _tiny(task="selective_copy", seq_len=4)


def test_tuning_picks_the_most_accurate_lr(monkeypatch):
    import experiments.synthetic as synthetic

    seen_steps = []

    def fake(run):
        seen_steps.append(run.steps)
        return {"accuracy": {5e-4: 0.9}.get(run.lr, 0.1), "final_loss": run.lr}

    monkeypatch.setattr(synthetic, "train_task", fake)
    grid = Grid("t", ("parity",), (8,), (0,), 2, 1, 8, (1e-4, 5e-4, 1e-3))
    lr, scores = synthetic._tune(grid, _tiny(), 8)
    assert lr == 5e-4 and scores == {"0.0001": 0.1, "0.0005": 0.9, "0.001": 0.1}
    # ties (all at chance) go to the lowest final loss; per-task tuning steps are used
    monkeypatch.setattr(
        synthetic, "train_task", lambda run: seen_steps.append(run.steps) or fake_tie(run)
    )

    def fake_tie(run):
        return {"accuracy": 0.5, "final_loss": {1e-3: 0.2}.get(run.lr, 0.7)}

    seen_steps.clear()
    grid = dataclasses.replace(grid, task_steps=(("parity", 6, 3),))
    lr, _ = synthetic._tune(grid, _tiny(), 8)
    assert lr == 1e-3 and seen_steps == [3, 3, 3] and grid.steps_for("parity") == (6, 3)


def test_split_sweep_parts_merge_into_one_table(tmp_path, monkeypatch):
    import experiments.synthetic as synthetic

    def fake(run):
        acc = 0.9 if run.block_type == "recurrent" else 0.5
        return {"accuracy": acc, "final_loss": 0.1, "seconds_per_step": 0.01}

    monkeypatch.setattr(synthetic, "train_task", fake)
    quick = synthetic.GRIDS["quick"]
    for task in quick.tasks:  # each part is a --tasks subset of the quick grid
        sweep(dataclasses.replace(quick, tasks=(task,)), _tiny(), tmp_path)
    parts = sorted(tmp_path.glob("synthetic_quick_part-*.json"))
    assert [p.name for p in parts] == [
        "synthetic_quick_part-parity.json",
        "synthetic_quick_part-recall.json",
    ]
    assert not (tmp_path / "synthetic_quick.md").exists()  # parts write no table
    with pytest.raises(ValueError, match="no rows for"):
        synthetic.merge(quick, parts[:1], tmp_path)
    rows = synthetic.merge(quick, parts, tmp_path)
    assert [r["task"] for r in rows] == ["parity"] * 4 + ["recall"] * 4
    table = (tmp_path / "synthetic_quick.md").read_text()
    assert "| parity | recurrent |" in table and "| recall | transformer |" in table
    assert (tmp_path / "synthetic_quick.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="another grid"):
        synthetic.merge(synthetic.GRIDS["default"], parts, tmp_path)


def test_sweep_resumes_from_its_progress_log(tmp_path, monkeypatch):
    import experiments.synthetic as synthetic

    calls = []

    def fake(run):
        calls.append(run)
        return {"accuracy": 0.5, "final_loss": 0.1, "seconds_per_step": 0.01}

    monkeypatch.setattr(synthetic, "train_task", fake)
    grid = Grid("t", ("parity",), (8, 16), (0,), 2, 1, 8, (1e-4, 1e-3))
    first = sweep(grid, _tiny(), tmp_path)
    assert len(calls) == 2 * (2 + 2)  # per model: 2 tuning runs + 2 lengths
    calls.clear()
    again = sweep(grid, _tiny(), tmp_path)  # everything is in the progress log: no training
    assert calls == [] and again == first
