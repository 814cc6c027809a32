"""experiments.param_matched's harness without training: a model of CE stands in for `train`.

Checks lr tuning (pick, widening at an edge, divergence), that tuning scores on validation and the
seeds on test with paired data orders, the finished-cell records (a rerun retrains nothing, a
changed config reruns), `--part i/n` plus a merge equal to one run, and the report's words.
"""

from __future__ import annotations

import json
import math

import pytest

from experiments import param_matched as pm
from experiments import readme
from rt_jax.train.config import get_preset
from rt_jax.train.loop import NonFiniteLossError
from rt_jax.train.metrics import eval_steps

BEST_LR = {"transformer": 1.2e-2, "recurrent": 3e-3}  # the transformer's optimum is off the grid
OFFSET = {"transformer": 0.0, "recurrent": -0.1}
ARGS = ["seeds=0,1,2", "steps=30", "eval_points=4", "log_every=10"]


class FakeTrain:
    """CE(lr, step, seed) = 2 + offset + log2(lr / best)^2 / 10 + 3 / (1 + step / 10) + noise."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, workdir, progress):
        block = cfg.model.block_type
        self.calls.append(
            dict(block=block, lr=cfg.lr, seed=cfg.seed, steps=cfg.steps, split=cfg.eval_split,
                 shuffle=cfg.data.shuffle_seed)
        )  # fmt: skip
        if cfg.lr > 2e-2:
            raise NonFiniteLossError("loss=nan at step 3")
        noise = 0.01 * ((cfg.seed * 7 + 3) % 5 - 2)

        def ce(step):
            return (
                2 + OFFSET[block] + math.log2(cfg.lr / BEST_LR[block]) ** 2 / 10
                + 3 / (1 + step / 10) + noise
            )  # fmt: skip

        history = [{"step": s, "loss": ce(s) + 0.05} for s in range(10, cfg.steps + 1, 10)]
        history += [{"step": s, "val_ce": ce(s)} for s in eval_steps(cfg.steps, cfg.eval_points)]
        history.sort(key=lambda h: h["step"])
        return {
            "val_ce": ce(cfg.steps),
            "tokens_per_s": 1000.0,
            "steps": cfg.steps,
            "history": history,
        }


@pytest.fixture
def fake(monkeypatch):
    f = FakeTrain()
    monkeypatch.setattr(pm, "_train_cell", f)
    return f


def _run(tmp_path, overrides=(), **kw):
    return pm.run(
        "tiny", [*ARGS, *overrides], tmp_path / "results", tmp_path / "runs",
        progress=False, throughput_rounds=0, **kw,
    )  # fmt: skip


def test_tunes_widens_and_reports(tmp_path, fake):
    payload = _run(tmp_path)
    t, r = payload["tuning"]["transformer-2L"], payload["tuning"]["recurrent-2L"]
    assert r["grid"] == [1.5e-3, 3e-3, 6e-3] and r["pick"] == pytest.approx(3e-3)
    assert r["widened"] == 0 and not r["at_edge"]
    # 6e-3 is the grid's top: widened to 1.2e-2 (the optimum, again an edge) and 2.4e-2 (diverges)
    assert t["pick"] == pytest.approx(1.2e-2) and t["widened"] == 2 and not t["at_edge"]
    assert t["val_ce"]["0.024"] is None and set(t["val_ce"]) == {
        "0.0015",
        "0.003",
        "0.006",
        "0.012",
        "0.024",
    }
    tunes = [c for c in fake.calls if c["steps"] == 10]
    finals = [c for c in fake.calls if c["steps"] == 30]
    assert len(tunes) == 5 + 3 and all(c["split"] == "validation" and c["seed"] == 0 for c in tunes)
    assert len(finals) == 6 and all(c["split"] == "test" for c in finals)
    assert {(c["seed"], c["shuffle"]) for c in finals} == {(0, 0), (1, 1), (2, 2)}  # paired order
    assert all(c["lr"] == pytest.approx(1.2e-2) for c in finals if c["block"] == "transformer")
    (comp,) = payload["comparisons"]
    assert comp["name"] == "recurrent-2L" and comp["baseline"] == "transformer-2L"
    diff = comp["views"]["params"]["diff"]
    assert diff["mean"] == pytest.approx(-0.1 + 0.1 * math.log2(3e-3 / 3e-3) ** 2, abs=1e-9)
    assert diff["hi"] < 0 and comp["views"]["params"]["verdict"].startswith("lower CE than")
    flops = comp["views"]["flops"]  # RT costs more per token: read at the Transformer's budget
    assert flops["baseline_step"] == pytest.approx(30) and flops["model_step"] < 30
    md = (tmp_path / "results" / "param_matched_tiny.md").read_text()
    for text in (
        "Learning rate per model",
        "**0.012**",
        "grid widened 2x",
        "Equal training FLOPs",
        "Equal wall-clock",
        "lower CE than transformer-2L",
        "95% CI",
        "Last-eval slope",
    ):
        assert text in md, text  # fmt: skip
    assert "beats" not in md
    saved = json.loads((tmp_path / "results" / "param_matched_tiny.json").read_text())
    assert saved["harness"] == pm.HARNESS and len(saved["tune_records"]) == 8
    assert (tmp_path / "results" / "param_matched_tiny.png").read_bytes()[:4] == b"\x89PNG"
    section = "\n".join(readme.render_new("tiny", saved))  # the README's view of the same file
    assert "| Recurrent Transformer (recurrent-2L) | 2 |" in section
    assert "recurrent-2L vs transformer-2L: at equal tokens lower CE than transformer-2L" in section
    assert "| recurrent-2L vs transformer-2L | - | 30 / 30 |" in md  # final CE: steps shown


def test_final_ce_of_unequal_steps_is_not_called_equal_tokens(tmp_path, fake):
    """A point trained longer than its baseline (cpu-lrt's transformer-4L-long) differs in tokens."""
    saved = _run(tmp_path)
    for row in saved["summary"]:
        if row["name"] == "transformer-2L":
            row["steps"] = 60
    section = "\n".join(readme.render_new("tiny", saved))
    assert "at equal tokens" not in section
    assert "recurrent-2L vs transformer-2L: at their final steps (30 vs 60: not equal tokens)" in (
        section
    )


def test_rerun_skips_finished_cells_and_reruns_changed_ones(tmp_path, fake):
    first = _run(tmp_path)
    parts = sorted(p.name for p in (tmp_path / "results" / "param_matched_tiny_parts").iterdir())
    assert len(parts) == 8 + 6 and "final_recurrent-2L_s2.json" in parts
    fake.calls.clear()
    again = _run(tmp_path)
    assert fake.calls == [] and again["summary"] == first["summary"]
    _run(tmp_path, ["eval_batches=3"])  # changes the seeds' and tuning cells' config: all rerun
    assert len(fake.calls) == 14


def test_parts_then_merge_equal_one_run(tmp_path, fake):
    one = _run(tmp_path / "one")
    fake.calls.clear()
    a = _run(tmp_path / "split", part=(0, 2))
    b = _run(tmp_path / "split", part=(1, 2))
    assert {r["name"] for r in a["records"]} == {"transformer-2L"}
    assert {r["name"] for r in b["records"]} == {"recurrent-2L"}
    assert not (tmp_path / "split" / "results" / "param_matched_tiny.json").exists()
    n = len(fake.calls)
    merged = _run(tmp_path / "split")
    assert len(fake.calls) == n  # the merge trains nothing
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(merged["summary"]) == strip(one["summary"])
    assert merged["comparisons"] == one["comparisons"]


def test_fixed_lr_points_do_not_tune(tmp_path, fake):
    payload = pm.run(
        "cpu-demo", ["steps=12", "eval_points=2", "log_every=6", "seeds=0"],
        tmp_path / "results", tmp_path / "runs", progress=False, throughput_rounds=0,
    )  # fmt: skip
    assert all(t["fixed"] for t in payload["tuning"].values())
    assert all(c["steps"] == 12 and c["split"] == "test" for c in fake.calls)
    assert len(fake.calls) == 2
    md = (tmp_path / "results" / "param_matched_cpu-demo.md").read_text()
    assert "fixed in the preset" in md and "1 seed: no interval, no claim" in md


def test_grid_and_argument_checks():
    assert pm.check_grid([4e-3, 1e-3, 2e-3]) == (1e-3, 2e-3, 4e-3)
    for bad in ([1e-3, 2e-3], [1e-3, 2e-3, 5e-3], [0.0, 1e-3, 2e-3], [1e-3, 1e-3, 1e-3]):
        with pytest.raises(ValueError, match="--lrs"):
            pm.check_grid(bad, "--lrs")
    assert (
        pm.widen((1.0, 2.0, 4.0), 2.0, 1.0) == 0.5 and pm.widen((1.0, 2.0, 4.0), 2.0, 2.0) is None
    )
    assert pm.choose({1.0: 2.0, 2.0: None, 4.0: 1.5}) == 4.0
    with pytest.raises(RuntimeError, match="diverged"):
        pm.choose({1.0: None, 2.0: float("nan")})
    assert pm.parse_part("1/3") == (1, 3)
    with pytest.raises(ValueError, match="--part"):
        pm.parse_part("3/3")
    with pytest.raises(SystemExit):
        pm.main(["--preset", "tiny", "--lrs", "1e-3,3e-3"])


def test_presets_have_their_controls_and_three_seeds():
    for name in ("cpu-full", "cpu-lrt", "cpu-mesh"):
        cfg = get_preset(name)
        assert len(cfg.seeds) >= 3 and len(pm.check_grid(cfg.tune_lrs)) >= 3
        pm.describe_points(cfg)  # baselines name existing points
    assert len(get_preset("cpu-full").compare) == 4
    mesh = {r["name"]: r for r in pm.describe_points(get_preset("cpu-mesh"))}
    eq = mesh["vanilla-6L-eq"]
    assert eq["non_embedding_params"] == mesh["transformer-6L"]["non_embedding_params"] == 1_182_848
    assert "embed_scale=true" in eq["options"] and "0+6R1+0" in eq["options"]
    lrt = get_preset("cpu-lrt")
    rows = {r["name"]: r for r in pm.describe_points(lrt)}
    assert {"looped-4R2", "looped-4R3", "transformer-4L-long"} <= set(rows)
    long_flops, lrt_flops = (
        rows["transformer-4L-long"]["train_flops"],
        rows["lrt-shared-4L"]["train_flops"],
    )
    assert long_flops == pytest.approx(lrt_flops, rel=2e-3)
    demo = get_preset("cpu-demo")
    assert all(p.lr > 0 for p in demo.compare) and len(demo.seeds) == 1


def test_cpu_demo_lrs_are_the_committed_tuning_picks():
    tuning = json.loads(
        (readme.REPO / "results" / "param_matched_cpu-demo_tuning.json").read_text()
    )
    assert not tuning["commit"].endswith("-dirty")
    for point in get_preset("cpu-demo").compare:
        t = tuning["tuning"][point.name]
        assert not t["fixed"] and len(t["val_ce"]) >= 3 and not t["at_edge"]
        assert point.lr == pytest.approx(t["pick"])


def test_sigterm_stops_the_sweep(tmp_path, monkeypatch):
    from rt_jax.train.loop import Preempted

    calls = []

    def preempted(cfg, workdir, progress):
        calls.append(cfg.lr)
        raise Preempted("SIGTERM: saved step 3")

    monkeypatch.setattr(pm, "_train_cell", preempted)
    with pytest.raises(Preempted):
        _run(tmp_path)
    assert len(calls) == 1  # no other cell started
