"""The README's results tables are generated from results/*.json (experiments.readme)."""

from __future__ import annotations

import json

import pytest

from experiments import readme

RESULTS = readme.REPO / "results"


def test_readme_matches_the_results_files():
    text = (readme.REPO / "README.md").read_text()
    generated = readme.sections(RESULTS)
    assert set(generated) == {f"param_matched:{p}" for p in readme.PRESETS} | {
        "tpu_cost",
        "mesh_probe",
        "synthetic",
        "bench_block",
        "bench_decode",
        "bench_decode_lrt",
    }
    stale = readme.stale_sections(text, generated)
    assert not stale, f"README out of date in {stale}: run python -m experiments.readme"


def test_current_harness_results_come_from_a_clean_tree():
    for preset in readme.PRESETS:
        path = RESULTS / f"param_matched_{preset}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if not data.get("harness"):
            continue  # the previous harness's files say their commit in the README section
        commits = {r["commit"] for r in data["records"] + data["tune_records"]}
        assert not any(c.endswith("-dirty") for c in commits), (path, commits)


def test_render_replaces_only_between_markers_and_detects_drift():
    begin, end = readme.markers("param_matched:x")
    text = f"head\n{begin}\nold numbers\n{end}\ntail\n"
    out = readme.render(text, {"param_matched:x": "| new | table |"})
    assert out == f"head\n{begin}\n| new | table |\n{end}\ntail\n"
    assert readme.stale_sections(text, {"param_matched:x": "| new | table |"}) == [
        "param_matched:x"
    ]
    assert readme.stale_sections(out, {"param_matched:x": "| new | table |"}) == []
    with pytest.raises(ValueError, match="markers"):
        readme.render("no markers here", {"param_matched:x": ""})


def test_synthetic_bold_only_where_the_seed_ranges_separate(tmp_path):
    def row(model, n, seed, acc):
        return {"task": "parity", "model": model, "seq_len": n, "seed": seed, "steps": 10,
                "accuracy": acc}  # fmt: skip

    rows = [row("transformer", 8, s, a) for s, a in ((0, 0.50), (1, 0.52))]
    rows += [row("recurrent", 8, s, a) for s, a in ((0, 0.90), (1, 1.00))]
    rows += [row("transformer", 16, s, a) for s, a in ((0, 0.50), (1, 0.60))]
    rows += [row("recurrent", 16, s, a) for s, a in ((0, 0.55), (1, 0.70))]  # ranges overlap
    meta = {"commit": "abc1234", "wall_seconds": 60}
    (tmp_path / "synthetic.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    table = readme.synthetic_section(tmp_path).splitlines()
    assert table[2] == "| Task | Steps | Transformer N=8 / 16 | Recurrent Transformer N=8 / 16 |"
    assert table[4] == "| parity | 10 | 0.51 / 0.55 | **0.95** / 0.62 |"
