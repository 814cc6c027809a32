"""The main job: model families (Transformer, RT, LRT, recursive/MeSH) compared as an experiment.

    python -m experiments.param_matched --preset cpu-full                 # tune, train, report
    python -m experiments.param_matched --preset cpu-full --part 0/2      # half the points, then
    python -m experiments.param_matched --preset cpu-full --part 1/2      # (another process) and
    python -m experiments.param_matched --preset cpu-full                 # merge: reuses all cells
    python -m experiments.param_matched --preset cpu-demo --retune --tune-only   # lr sweep only
    python -m experiments.param_matched --preset cpu-lrt --models transformer,lrt-shared

For every ``cfg.compare`` point (``--models`` keeps the points of those families; the same-shape
families transformer, recurrent, lrt-shared and lrt-layerwise are added at the first point's shape
when the preset lacks them):

1. **Learning rate.** A point with a fixed ``ModelPoint.lr`` (cpu-demo) trains at it (``--retune``
   tunes it anyway). Otherwise short tuning runs (``TrainConfig.tune_steps``, default steps // 3,
   scaled by a point's own ``steps``; seed ``seeds[0]``) try every lr of a log-spaced grid
   (``TrainConfig.tune_lrs`` or ``--lrs``, at least 3 values; default lr/2, lr, 2 lr) and pick the
   lowest CE on the **validation** split. When the pick is the grid's smallest or largest value, the
   grid is widened by one grid step on that side and that cell is run (up to ``MAX_WIDEN`` times;
   a pick still at an edge is flagged). A tuning run that diverges counts as infinitely bad.
2. **Seeds.** Every point trains once per seed in ``cfg.seeds`` at its picked lr. Seed ``s`` sets the
   initialisation and the training-data order (``data.shuffle_seed + s``), identical for every
   model, so differences between models are **paired** by seed. These runs evaluate on the
   **test** split (Shakespeare: four works held out from training and from the lr selection,
   ``rt_jax.data.corpus``; c4 has none and uses validation) at log-spaced steps.
3. **Statistics and views.** Per point: mean, sd and 95% t-interval of the final test CE over seeds,
   the slope of its last two evaluations (has it flattened?). Per comparison (a point against each
   of its baselines: ``ModelPoint.baselines``, else the Transformer of equal compute depth, else the
   first Transformer): the paired difference and its 95% t-interval at (a) equal parameters and
   tokens (the final CE), (b) **equal training FLOPs** (each run's CE curve interpolated linearly
   in log FLOPs at the larger budget both models reached) and (c) **equal wall-clock** (the same at
   the training time implied by the side-by-side tokens/s). The words in the Markdown follow the
   interval: "lower"/"higher" only when it excludes 0.

Every cell (tuning run or seed) writes its finished record to
``<parts-dir>/param_matched_<preset>_parts/<cell>.json`` (default parts-dir: ``--out-dir``; commit
these files): a rerun skips finished cells whose configuration is unchanged (a changed preset
reruns them), ``--part i/n`` runs only points ``i, i+n, ...`` (tuning and seeds; no results files),
and a run without ``--part`` reuses every finished cell, so it merges the parts. Run directories
(checkpoints, metrics) are ``<runs-dir>/param_matched_<preset>/<point>_s<seed>`` and
``.../tune/<point>_lr<lr>``, so an interrupted cell resumes from its checkpoint.

Writes, under ``--out-dir`` (to temporary names first, renamed only when every cell succeeded; a
failed job writes ``param_matched_<preset>.failed.json`` and leaves earlier results alone):
``param_matched_<preset>.json`` (settings, every tuning record, per-seed records with their curves,
summary, comparisons), ``.md`` (tuning table, results table with intervals, the three views, the
command, commits and machine) and ``.png`` (test CE against tokens and against training FLOPs, and
the tuning curves). ``--tune-only`` writes ``param_matched_<preset>_tuning.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from experiments import readme, stats
from experiments.logs import LOG_FILE, log_to_file, setup_logging
from experiments.provenance import git_commit, machine
from experiments.readme import display_name
from experiments.stats import fmt_interval
from rt_jax.train.config import (
    PRESETS,
    ModelPoint,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    get_preset,
    load_config,
    with_point,
)
from rt_jax.train.flops import train_flops_per_token

log = logging.getLogger("param_matched")

HARNESS = 2
"""Version of the results format (the README renderer reads older files too)."""
DEFAULT_GRID_FACTOR = 2.0
MAX_WIDEN = 2
LEVEL = 0.95


def run_dir(runs_dir: str | os.PathLike, preset: str, point_name: str, seed: int) -> Path:
    """The run directory of one (point, seed) cell."""
    return Path(runs_dir) / f"param_matched_{preset}" / f"{point_name}_s{seed}"


def tune_dir(runs_dir: str | os.PathLike, preset: str, point_name: str, lr: float) -> Path:
    """The run directory of one tuning cell."""
    return Path(runs_dir) / f"param_matched_{preset}" / "tune" / f"{point_name}_lr{lr:.4g}"


def parts_dir(base: str | os.PathLike, preset: str) -> Path:
    """The folder of finished-cell records of a preset's sweep."""
    return Path(base) / f"param_matched_{preset}_parts"


# --------------------------------------------------------------------------------------------
# The learning-rate grid.


def check_grid(lrs: tuple[float, ...] | list[float], where: str = "TrainConfig.tune_lrs") -> tuple:
    """The grid sorted; ValueError (naming ``where``) unless >= 3 distinct positive log-spaced lrs."""
    grid = tuple(sorted(float(x) for x in lrs))
    if len(grid) < 3 or any(not x > 0 for x in grid):
        raise ValueError(f"{where}={lrs!r}: give at least 3 positive learning rates")
    ratios = [b / a for a, b in zip(grid, grid[1:], strict=False)]
    if min(ratios) <= 1.0 + 1e-9 or max(ratios) / min(ratios) > 1.02:
        raise ValueError(
            f"{where}={lrs!r} is not log-spaced (ratios {[f'{r:.3g}' for r in ratios]}): use a "
            "constant ratio, e.g. 1e-3,2e-3,4e-3"
        )
    return grid


def tuning_grid(cfg: TrainConfig, point: ModelPoint, lrs: tuple[float, ...] | None = None) -> tuple:
    """The grid a point is tuned on: ``lrs`` (``--lrs``), else ``cfg.tune_lrs``, else lr/2, lr, 2 lr
    around the point's fixed lr or the preset's."""
    if lrs:
        return check_grid(lrs, "--lrs")
    if cfg.tune_lrs:
        return check_grid(cfg.tune_lrs)
    centre = point.lr or cfg.lr
    return (centre / DEFAULT_GRID_FACTOR, centre, centre * DEFAULT_GRID_FACTOR)


def widen(tried: tuple[float, ...], factor: float, pick: float) -> float | None:
    """The lr one grid step beyond ``pick`` when it is the smallest or largest tried, else None."""
    if math.isclose(pick, min(tried), rel_tol=1e-9):
        return pick / factor
    if math.isclose(pick, max(tried), rel_tol=1e-9):
        return pick * factor
    return None


def choose(results: dict[float, float | None]) -> float:
    """The lr of the lowest CE (a diverged run, None, never wins; ties: the smaller lr)."""
    finite = {lr: ce for lr, ce in results.items() if ce is not None and math.isfinite(ce)}
    if not finite:
        raise RuntimeError(f"every tuning run diverged (lrs {sorted(results)}): lower the grid")
    return min(sorted(finite), key=lambda lr: finite[lr])


def tuning_steps(cfg: TrainConfig, point: ModelPoint) -> int:
    """Steps of a point's tuning runs: ``tune_steps`` (0: steps // 3), scaled by its own steps."""
    base = cfg.tune_steps or max(1, cfg.steps // 3)
    if point.steps:
        base = max(1, round(base * point.steps / cfg.steps))
    return base


def report_split(cfg: TrainConfig) -> str:
    """The split the seeds report on: ``test`` for local corpora, ``validation`` for c4."""
    return "validation" if cfg.data.corpus == "c4" else "test"


def tune_config(cfg: TrainConfig, point: ModelPoint, lr: float) -> TrainConfig:
    """The config of one tuning cell: short, seed ``seeds[0]``, scored on validation."""
    seed = cfg.seeds[0]
    cell = with_point(cfg, point, seed)
    steps = tuning_steps(cfg, point)
    return dataclasses.replace(
        cell,
        lr=lr,
        steps=steps,
        eval_split="validation",
        eval_points=1,
        checkpoint_every=min(cell.checkpoint_every, steps),
        keep_best=False,
        data=dataclasses.replace(cell.data, shuffle_seed=cell.data.shuffle_seed + seed),
    )


def final_config(cfg: TrainConfig, point: ModelPoint, lr: float, seed: int) -> TrainConfig:
    """The config of one seed cell: the point's steps, picked lr, seeded data order, test split."""
    cell = with_point(cfg, point, seed)
    return dataclasses.replace(
        cell,
        lr=lr,
        eval_split=report_split(cfg),
        keep_best=False,
        checkpoint_every=min(cell.checkpoint_every, cell.steps),
        data=dataclasses.replace(cell.data, shuffle_seed=cell.data.shuffle_seed + seed),
    )


_NOT_RESULT = {"distributed", "coordinator_address", "num_processes", "process_id"}
_NOT_RESULT_DATA = {"data_dir", "cache_dir", "prefetch"}


def fingerprint(cell: TrainConfig) -> str:
    """A hash of everything in a cell's config that can change its result (not paths)."""
    d = {k: v for k, v in config_to_dict(cell).items() if k not in _NOT_RESULT}
    d["data"] = {k: v for k, v in d["data"].items() if k not in _NOT_RESULT_DATA}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress:
    """Finished-cell records, one JSON file per cell (committed under results/)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, key: str) -> Path:
        """The record file of a cell."""
        return self.directory / f"{key}.json"

    def get(self, key: str, fp: str) -> dict[str, Any] | None:
        """The finished record of ``key`` if it was run with config fingerprint ``fp``."""
        path = self.path(key)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fp:
            log.warning("%s was run with another config: rerunning the cell", path)
            return None
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Write a record atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{key}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.path(key))


# --------------------------------------------------------------------------------------------
# Points, baselines, cells.


def describe_points(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Exact shape, parameter counts and training FLOPs of every compared model."""
    if not cfg.compare:
        raise ValueError("the preset has no compare points (TrainConfig.compare is empty)")
    names = [p.name for p in cfg.compare]
    if len(set(names)) != len(names):
        raise ValueError(f"TrainConfig.compare: point names must be unique, got {names}")
    rows = []
    for point in cfg.compare:
        cell = with_point(cfg, point, cfg.seeds[0])
        model = cell.model
        fpt = train_flops_per_token(model, cfg.data.seq_len)
        rows.append(
            {
                "name": point.name,
                "model": point.family_name,
                "block_type": model.block_type,
                "options": point.options,
                "layers": model.n_layers,
                "depth": model.cache_layers,
                "width": model.d_model,
                "heads": model.n_heads,
                "mlp_hidden": model.mlp_hidden,
                "non_embedding_params": model.non_embedding_params(),
                "total_params": model.total_params(),
                "kv_floats_per_token": model.kv_floats_per_token(),
                "train_flops_per_token": fpt,
                "steps": cell.steps,
                "tokens": cell.steps * cfg.tokens_per_step(),
                "train_flops": fpt * cell.steps * cfg.tokens_per_step(),
            }
        )
    for point in cfg.compare:
        for name in baselines_of(cfg, point, rows):
            if name not in names:
                raise ValueError(
                    f"ModelPoint {point.name!r}: baseline {name!r} is not a point of this "
                    f"comparison ({names})"
                )
    return rows


def baselines_of(cfg: TrainConfig, point: ModelPoint, rows: list[dict[str, Any]]) -> list[str]:
    """The points ``point`` is compared against: ``point.baselines``, else (for non-Transformers)
    the first Transformer of equal compute depth, else the first Transformer."""
    if point.baselines:
        return [b.strip() for b in point.baselines.split(",") if b.strip()]
    if point.family_name == "transformer":
        return []
    by_name = {r["name"]: r for r in rows}
    plain = [p for p in cfg.compare if p.family_name == "transformer" and not p.steps]
    if not plain or point.name not in by_name:
        return []
    depth = by_name[point.name]["depth"]
    same = [p for p in plain if by_name.get(p.name, {}).get("depth") == depth]
    return [(same or plain)[0].name]


def _prepare_workdir(cell: TrainConfig, workdir: Path) -> None:
    """Clear a run directory that holds a run of other settings (lr, steps, data order)."""
    from rt_jax.data.corpus import remove_tree

    config = workdir / "config.json"
    if not config.exists():
        return
    try:
        old = load_config(config)
    except (TypeError, ValueError):
        old = None
    if old is None or fingerprint(old) != fingerprint(cell):
        log.warning("%s holds a run of other settings: starting it afresh", workdir)
        remove_tree(workdir)


def _train_cell(cfg: TrainConfig, workdir: Path, progress: bool) -> dict[str, Any]:
    from rt_jax.train.loop import train

    with log_to_file(workdir):  # Orbax / absl INFO of this run: <workdir>/log.txt
        return train(cfg, workdir, progress=progress)


def _run_cell(cell: TrainConfig, workdir: Path, progress: bool, *, tuning: bool) -> dict[str, Any]:
    """Train one cell and return its record (a diverged tuning run is a record, not an error)."""
    from rt_jax.train.loop import NonFiniteLossError

    _prepare_workdir(cell, workdir)
    started = time.time()
    try:
        result = _train_cell(cell, workdir, progress)
    except NonFiniteLossError as err:
        if not tuning:
            raise
        return {"ce": None, "diverged": True, "error": str(err), "wall_s": time.time() - started}
    history = result["history"]
    curve = [[h["step"], h["val_ce"]] for h in history if "val_ce" in h]
    extras = {k.removeprefix("val_ce_"): v for k, v in result.items() if k.startswith("val_ce_")}
    train_curve = [[h["step"], h["loss"]] for h in history if "loss" in h]
    if result["val_ce"] is None or result["tokens_per_s"] is None:
        raise RuntimeError(
            "the run logged no evaluation CE or no throughput: set eval_points >= 1 and "
            "log_every <= steps"
        )
    return {
        "ce": result["val_ce"],
        "diverged": False,
        "ce_extra": extras,
        "curve": curve,
        "train_curve": train_curve,
        "final_train_loss": train_curve[-1][1] if train_curve else None,
        "tokens_per_s_during_training": result["tokens_per_s"],
        "wall_s": time.time() - started,
    }


def _cell_meta(cell: TrainConfig, point: ModelPoint, kind: str, run: Path) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": point.name,
        "model": point.family_name,
        "lr": cell.lr,
        "seed": cell.seed,
        "steps": cell.steps,
        "tokens": cell.steps * cell.tokens_per_step(),
        "split": cell.eval_split,
        "eval_batches": cell.eval_batches,
        "shuffle_seed": cell.data.shuffle_seed,
        "fingerprint": fingerprint(cell),
        "run_dir": str(run),
    }


def _finished(record: dict[str, Any], commit: str) -> dict[str, Any]:
    return record | {
        "commit": commit,
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def tune_point(
    cfg: TrainConfig,
    point: ModelPoint,
    store: Progress,
    runs_dir: Path,
    preset: str,
    *,
    progress: bool,
    lrs: tuple[float, ...] | None,
    retune: bool,
    commit: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick a point's lr (see the module docstring); returns (tuning summary, tuning records)."""
    if point.lr and not retune and not lrs:
        return {"name": point.name, "fixed": True, "pick": point.lr, "grid": [point.lr]}, []
    grid = tuning_grid(cfg, point, lrs)
    factor = grid[1] / grid[0]
    tried: dict[float, dict[str, Any]] = {}
    todo = list(grid)
    widened = 0
    while True:
        for lr in todo:
            cell = tune_config(cfg, point, lr)
            key = f"tune_{point.name}_lr{lr:.4g}"
            record = store.get(key, fingerprint(cell))
            if record is None:
                workdir = tune_dir(runs_dir, preset, point.name, lr)
                log.info(
                    "tuning %s at lr %.4g (%d steps) in %s", point.name, lr, cell.steps, workdir
                )
                record = _cell_meta(cell, point, "tune", workdir)
                record.update(_run_cell(cell, workdir, progress, tuning=True))
                record = _finished(record, commit)
                store.put(key, record)
            else:
                log.info("tuning %s at lr %.4g: finished earlier (%s)", point.name, lr, key)
            tried[lr] = record
            ce = record["ce"]
            log.info(
                "  %s lr %.4g: validation CE %s",
                point.name,
                lr,
                "diverged" if ce is None else f"{ce:.4f}",
            )
        pick = choose({lr: r["ce"] for lr, r in tried.items()})
        beyond = widen(tuple(tried), factor, pick)
        if beyond is None or widened >= MAX_WIDEN:
            break
        widened += 1
        log.info(
            "  %s: the pick %.4g is at the grid's edge: widening to %.4g", point.name, pick, beyond
        )
        todo = [beyond]
    summary = {
        "name": point.name,
        "fixed": False,
        "grid": list(grid),
        "tried": sorted(tried),
        "steps": tuning_steps(cfg, point),
        "split": "validation",
        "val_ce": {f"{lr:.4g}": tried[lr]["ce"] for lr in sorted(tried)},
        "pick": pick,
        "widened": widened,
        "at_edge": widen(tuple(tried), factor, pick) is not None,
    }
    return summary, [tried[lr] for lr in sorted(tried)]


# --------------------------------------------------------------------------------------------
# Statistics over finished seeds.


def _final_slope(curve: list[list[float]]) -> dict[str, float] | None:
    pts = [p for p in curve if p[0] > 0]
    if len(pts) < 2:
        return None
    (s0, c0), (s1, c1) = pts[-2], pts[-1]
    return {
        "from_step": s0,
        "to_step": s1,
        "delta": c1 - c0,
        "per_1k_steps": 1000 * (c1 - c0) / (s1 - s0),
    }


def summarise(
    points: list[dict[str, Any]], records: list[dict[str, Any]], tuning: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per point: its shape, lr pick, the test-CE interval over seeds, tokens/s, slope."""
    out = []
    for p in points:
        mine = [r for r in records if r["name"] == p["name"]]
        if not mine:
            continue
        ce = {r["seed"]: r["ce"] for r in mine}
        slopes = [s for s in (_final_slope(r["curve"]) for r in mine) if s is not None]
        extras = {}
        for key in sorted({k for r in mine for k in r.get("ce_extra", {})}):
            extras[f"ce_{key}_mean"] = statistics.fmean(
                r["ce_extra"][key] for r in mine if key in r.get("ce_extra", {})
            )
        row = (
            dict(p)
            | {
                "lr": mine[0]["lr"],
                "lr_fixed": tuning.get(p["name"], {}).get("fixed", False),
                "lr_at_edge": tuning.get(p["name"], {}).get("at_edge", False),
                "split": mine[0]["split"],
                "seeds": sorted(ce),
                "ce_by_seed": {str(s): v for s, v in sorted(ce.items())},
                "ce": stats.interval(list(ce.values()), LEVEL),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                "final_slope": None
                if not slopes
                else {
                    "from_step": slopes[0]["from_step"],
                    "to_step": slopes[0]["to_step"],
                    "delta_mean": statistics.fmean(s["delta"] for s in slopes),
                    "per_1k_steps_mean": statistics.fmean(s["per_1k_steps"] for s in slopes),
                },
            }
            | extras
        )
        out.append(row)
    return out


def _ce_at(record: dict[str, Any], x_of_step: float, budget: float) -> float | None:
    curve = [(step * x_of_step, ce) for step, ce in record["curve"]]
    return stats.log_interpolate(curve, budget)


def comparisons(
    cfg: TrainConfig, summary: list[dict[str, Any]], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every point against each of its baselines, paired by seed, in three views."""
    rows = {r["name"]: r for r in summary}
    tokens_per_step = cfg.tokens_per_step()
    out = []
    for point in cfg.compare:
        r = rows.get(point.name)
        if r is None:
            continue
        for base_name in baselines_of(cfg, point, summary):
            b = rows.get(base_name)
            if b is None:
                continue
            seeds_r = {x["seed"]: x for x in records if x["name"] == r["name"]}
            seeds_b = {x["seed"]: x for x in records if x["name"] == b["name"]}
            views = {}
            views["params"] = {
                "budget": None,
                "model_step": r["steps"],
                "baseline_step": b["steps"],
                "diff": stats.paired(
                    {s: x["ce"] for s, x in seeds_r.items()},
                    {s: x["ce"] for s, x in seeds_b.items()},
                    LEVEL,
                ),
            }
            for view, unit_r, unit_b, final_r, final_b in (
                (
                    "flops",
                    r["train_flops_per_token"] * tokens_per_step,
                    b["train_flops_per_token"] * tokens_per_step,
                    r["train_flops"],
                    b["train_flops"],
                ),
                (
                    "wallclock",
                    tokens_per_step / r["tokens_per_s"],
                    tokens_per_step / b["tokens_per_s"],
                    r["steps"] * tokens_per_step / r["tokens_per_s"],
                    b["steps"] * tokens_per_step / b["tokens_per_s"],
                ),
            ):
                budget = min(final_r, final_b)
                at_r = {s: _ce_at(x, unit_r, budget) for s, x in seeds_r.items()}
                at_b = {s: _ce_at(x, unit_b, budget) for s, x in seeds_b.items()}
                at_r = {s: v for s, v in at_r.items() if v is not None}
                at_b = {s: v for s, v in at_b.items() if v is not None}
                views[view] = {
                    "budget": budget,
                    "model_step": budget / unit_r,
                    "baseline_step": budget / unit_b,
                    "model_ce": stats.interval(list(at_r.values()), LEVEL) if at_r else None,
                    "baseline_ce": stats.interval(list(at_b.values()), LEVEL) if at_b else None,
                    "diff": stats.paired(at_r, at_b, LEVEL),
                }
            for v in views.values():
                v["verdict"] = stats.verdict(v["diff"], base_name)
            out.append(
                {
                    "name": r["name"],
                    "model": r["model"],
                    "baseline": base_name,
                    "tokens_per_s_ratio": r["tokens_per_s"] / b["tokens_per_s"],
                    "train_flops_per_token_ratio": r["train_flops_per_token"]
                    / b["train_flops_per_token"],
                    "train_flops_ratio": r["train_flops"] / b["train_flops"],
                    "non_embedding_params_ratio": r["non_embedding_params"]
                    / b["non_embedding_params"],
                    "views": views,
                }
            )
    return out


SAME_SHAPE_FAMILIES = {
    "transformer": ("transformer", ""),
    "recurrent": ("recurrent", ""),
    "lrt-shared": ("transformer", "memory.kind=shared"),
    "lrt-layerwise": ("transformer", "memory.kind=layerwise"),
}
"""Families ``--models`` can add to any preset at the shape of its first point: block type and
ModelPoint options."""


def select_models(cfg: TrainConfig, models: list[str]) -> TrainConfig:
    """``cfg`` comparing only the families in ``models`` (ValueError naming what is available).

    A family without a point in the preset is added at the first point's shape when it is one of
    ``SAME_SHAPE_FAMILIES``; others (recursive layouts) need a preset that defines them.
    """
    if not cfg.compare:
        raise ValueError("the preset has no compare points (TrainConfig.compare is empty)")
    available = {p.family_name for p in cfg.compare}
    base = cfg.compare[0]
    points = []
    for family in models:
        chosen = [p for p in cfg.compare if p.family_name == family]
        if not chosen and family in SAME_SHAPE_FAMILIES:
            block_type, options = SAME_SHAPE_FAMILIES[family]
            chosen = [
                dataclasses.replace(
                    base,
                    name=f"{family}-{base.n_layers}L",
                    block_type=block_type,
                    family=family,
                    options=options,
                )
            ]
        if not chosen:
            raise ValueError(
                f"--models {family!r}: this preset has points for {sorted(available)}; "
                f"{sorted(SAME_SHAPE_FAMILIES)} can be added at its first point's shape, "
                "other families need a preset that defines them (e.g. cpu-mesh)"
            )
        points.extend(p for p in chosen if p not in points)
    return dataclasses.replace(cfg, compare=tuple(points))


# --------------------------------------------------------------------------------------------
# Reports.


def _fmt_budget(view: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e12:.3f} TFLOP" if view == "flops" else f"{value:,.0f} s"


VIEW_TITLES = {
    "params": "Final test CE (equal parameters; equal tokens only where both ran the same steps)",
    "flops": "Equal training FLOPs (CE interpolated in log FLOPs at the larger budget both reached)",
    "wallclock": "Equal wall-clock (CE at the training time implied by the side-by-side tokens/s)",
}


def tuning_lines(tuning: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of every lr tried, its validation CE and the pick."""
    lines = [
        "| Model | Tuning steps | lr tried (validation CE) | Pick | Note |",
        "|---|---|---|---|---|",
    ]
    for name, t in tuning.items():
        if t["fixed"]:
            lines.append(f"| {name} | - | - | {t['pick']:.4g} | fixed in the preset |")
            continue
        tried = ", ".join(
            f"{lr}: " + ("diverged" if ce is None else f"{ce:.4f}")
            for lr, ce in t["val_ce"].items()
        )
        note = (
            "pick at the edge of the widened grid"
            if t["at_edge"]
            else (f"grid widened {t['widened']}x" if t["widened"] else "inside the grid")
        )
        lines.append(f"| {name} | {t['steps']} | {tried} | **{t['pick']:.4g}** | {note} |")
    return lines


def markdown(preset: str, cfg: TrainConfig, payload: dict[str, Any]) -> str:
    """The report: settings, tuning, results with intervals, the three views, provenance."""
    summary, comps, meta = payload["summary"], payload["comparisons"], payload
    split = summary[0]["split"] if summary else report_split(cfg)
    families = ", ".join(display_name(m) for m in dict.fromkeys(r["model"] for r in summary))
    parallel = any("ce_parallel_mean" in r for r in summary)
    lines = [
        f"# Comparison `{preset}` ({families})",
        "",
        f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens per step, {cfg.steps} steps unless a "
        f"point says otherwise; corpus `{cfg.data.corpus}` / tokenizer `{cfg.data.tokenizer}`; "
        f"seeds {', '.join(str(s) for s in cfg.seeds)} (seed s: init and data order s, the same "
        f"for every model, so differences are paired); learning rate picked per model on the "
        f"validation split, results on the `{split}` split ({cfg.eval_batches} batches at "
        f"{cfg.eval_points} log-spaced steps); RT impl `{cfg.model.impl}`, compute dtype "
        f"`{cfg.model.compute_dtype}`.",
        "",
        "## Learning rate per model",
        "",
        *tuning_lines(payload["tuning"]),
        "",
        "## Results",
        "",
        "| Model (point) | Layers (depth) | Width | Non-emb. params | Train FLOPs/token | Steps "
        "| lr | Tokens/s | Test CE: mean ± sd [95% CI] | Last-eval slope (per 1k steps) |"
        + (" CE, parallel |" if parallel else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if parallel else ""),
    ]
    for r in summary:
        layers = str(r["layers"]) if r["layers"] == r["depth"] else f"{r['layers']} ({r['depth']})"
        slope = r["final_slope"]
        slope_text = (
            "-"
            if slope is None
            else (f"{slope['per_1k_steps_mean']:+.4f} ({slope['from_step']}→{slope['to_step']})")
        )
        line = (
            f"| {display_name(r['model'])} ({r['name']}) | {layers} | {r['width']} "
            f"| {r['non_embedding_params']:,} | {r['train_flops_per_token'] / 1e6:.2f}M | {r['steps']:,} "
            f"| {r['lr']:.4g} | {r['tokens_per_s']:,.0f} | {fmt_interval(r['ce'])} | {slope_text} |"
        )
        if parallel:
            par = r.get("ce_parallel_mean")
            line += f" {par:.4f} |" if par is not None else " - |"
        lines.append(line)
    for view, title in VIEW_TITLES.items():
        if not comps:
            break
        lines += [
            "",
            f"## {title}",
            "",
            "| Model vs baseline | Budget | Steps (model / baseline) | Difference: mean ± sd "
            "[95% CI] | Reading |",
            "|---|---|---|---|---|",
        ]
        for c in comps:
            v = c["views"][view]
            steps = f"{v['model_step']:,.0f} / {v['baseline_step']:,.0f}"
            lines.append(
                f"| {c['name']} vs {c['baseline']} | {_fmt_budget(view, v['budget'])} | {steps} "
                f"| {fmt_interval(v['diff'], signed=True)} | {v['verdict']} |"
            )
    if comps:
        lines += [
            "",
            "| Model vs baseline | Non-emb. params ratio | Train FLOPs/token ratio | Train FLOPs "
            "ratio (whole run) | Tokens/s ratio |",
            "|---|---|---|---|---|",
        ]
        for c in comps:
            lines.append(
                f"| {c['name']} vs {c['baseline']} | {c['non_embedding_params_ratio']:.3f} "
                f"| {c['train_flops_per_token_ratio']:.2f} | {c['train_flops_ratio']:.2f} "
                f"| {c['tokens_per_s_ratio']:.2f} |"
            )
    commits = sorted({r["commit"] for r in payload["records"] + payload["tune_records"]})
    lines += [
        "",
        "Differences are model minus baseline (negative: the model's CE is lower), paired by seed, "
        "with a t-interval over the seeds; the reading says lower/higher only when the interval "
        "excludes 0. Equal-FLOPs and equal-wall-clock CE are read off each run's log-spaced "
        "evaluation curve, linear in log budget, at the smaller of the two runs' final budgets: "
        "the longer-trained model is then read mid-schedule (before its learning rate has "
        "decayed), which favours the baseline; a control trained to the larger budget with a "
        "full schedule (cpu-lrt's transformer-4L-long) is the stricter test. Tokens/s is the "
        "training throughput timed side by side after training (every model's compiled train "
        "step in one process, interleaved rounds, median). The slope is the CE change between "
        "the last two evaluations, per 1,000 steps (mean over seeds): near 0 means flattened. "
        "Train FLOPs count every training pass (analytic). Depth is the compute depth (a "
        "recursive core counts once per iteration).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Cells run at commits: {', '.join(f'`{c}`' for c in commits)}; report written at "
        f"`{meta['commit']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Finished: {meta['finished']}; cells' own wall time: {payload['cells_wall_s'] / 60:.1f} "
        f"min (this invocation: {meta['wall_s'] / 60:.1f} min; finished cells are read from "
        f"`{meta['parts']}`, not retrained)",
    ]
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path, title: str) -> None:
    """Test CE against tokens and against training FLOPs (mean over seeds), and the lr tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_tok, ax_flops, ax_lr) = plt.subplots(1, 3, figsize=(17, 4.8))
    names = [r["name"] for r in payload["summary"]]
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    rows = {r["name"]: r for r in payload["summary"]}
    tokens_per_step = payload["settings"]["tokens_per_step"]
    for name in names:
        mine = [r for r in payload["records"] if r["name"] == name]
        steps = sorted({s for r in mine for s, _ in r["curve"] if s > 0})
        mean = [
            statistics.fmean(ce for r in mine for s2, ce in r["curve"] if s2 == s) for s in steps
        ]
        tok = np.asarray(steps, float) * tokens_per_step
        ax_tok.plot(tok, mean, marker="o", ms=3, color=colours[name], label=name)
        ax_flops.plot(
            tok * rows[name]["train_flops_per_token"], mean, marker="o", ms=3, color=colours[name]
        )
        t = payload["tuning"].get(name, {})
        if not t.get("fixed", True):
            pts = [(float(lr), ce) for lr, ce in t["val_ce"].items() if ce is not None]
            if pts:
                ax_lr.plot(
                    *zip(*sorted(pts), strict=True), marker="o", color=colours[name], label=name
                )
    split = payload["summary"][0]["split"] if payload["summary"] else "test"
    ax_tok.set(
        xscale="log",
        xlabel="training tokens",
        ylabel=f"{split} CE/token",
        title=f"{split} CE vs tokens",
    )
    ax_flops.set(
        xscale="log",
        xlabel="training FLOPs (analytic)",
        ylabel=f"{split} CE/token",
        title=f"{split} CE vs training FLOPs",
    )
    ax_lr.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="validation CE/token",
        title="lr tuning (short runs)",
    )
    for ax in (ax_tok, ax_flops, ax_lr):
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8)
    fig.suptitle(title + " (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _write_outputs(out_dir: Path, stem: str, files: dict[str, Any]) -> None:
    """Write every file to a temporary name first, then rename them all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    for suffix, content in files.items():
        final = out_dir / f"{stem}{suffix}"
        tmp = out_dir / f".{stem}{suffix}.tmp"
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        staged.append((tmp, final))
    for tmp, final in staged:
        os.replace(tmp, final)


def measure_throughput(cfg: TrainConfig, rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Training tokens/s of every compare point, timed side by side in this process.

    Each point's sharded train step is built, compiled and warmed up once; then ``rounds`` rounds
    time ``steps`` steps of every point in turn (interleaved, so machine load hits all points
    alike) on a fixed random batch. Returns the median tokens/s per point name.
    """
    import jax
    import numpy as np

    from rt_jax.train.sharding import make_mesh
    from rt_jax.train.step import build_train_step

    cells = {}
    for point in cfg.compare:
        point_cfg = with_point(cfg, point, cfg.seeds[0])
        ts = build_train_step(point_cfg, make_mesh(point_cfg.mesh))
        spec = ts.batch_spec["tokens"]
        tokens = np.random.default_rng(0).integers(0, point_cfg.model.vocab_size, spec.shape)
        batch = {"tokens": jax.device_put(tokens.astype(spec.dtype), ts.batch_sharding["tokens"])}
        state = ts.init()
        state, metrics = ts.step(state, batch)  # compile and warm up
        jax.block_until_ready(metrics)
        cells[point.name] = [ts, state, batch]
    speeds: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(rounds):
        for name, cell in cells.items():
            ts, state, batch = cell
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = ts.step(state, batch)
            jax.block_until_ready(metrics)
            speeds[name].append(steps * cfg.tokens_per_step() / (time.perf_counter() - start))
            cell[1] = state
    return {name: statistics.median(v) for name, v in speeds.items()}


def parse_part(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n (ValueError naming ``--part``)."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--part {text!r}: need 0 <= i < n")
    return i, n


def parse_lrs(text: str | None) -> tuple[float, ...] | None:
    """``"1e-3,2e-3,4e-3"`` -> a checked log-spaced grid (ValueError naming ``--lrs``)."""
    if not text:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lrs {text!r}: expected comma-separated floats") from None
    return check_grid(values, "--lrs")


def run(
    preset: str,
    overrides: list[str],
    out_dir: str | os.PathLike = "results",
    runs_dir: str | os.PathLike = "runs",
    *,
    progress: bool = True,
    command: str | None = None,
    throughput_rounds: int = 15,
    models: list[str] | None = None,
    lrs: tuple[float, ...] | None = None,
    part: tuple[int, int] | None = None,
    tune_only: bool = False,
    retune: bool = False,
    parts_base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Tune, train every point x seed (resuming finished cells), then write the results.

    SIGTERM stops the sweep (``rt_jax.train.loop.Preempted``) after the running cell saved its
    checkpoint; rerun to resume."""
    from rt_jax.train.loop import Preempted

    started = time.time()
    cfg = apply_overrides(get_preset(preset), overrides)
    full_compare = cfg.compare
    if models:
        cfg = select_models(cfg, models)
    points = describe_points(cfg)
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    store = Progress(parts_dir(parts_base or out_dir, preset))
    commit = git_commit()  # of this process's code, recorded in every cell it finishes
    if commit.endswith("-dirty"):
        log.warning("the checkout has uncommitted changes: these records will say -dirty")
    log.info("models of preset %s:", preset)
    reference = points[0]["non_embedding_params"]
    for p in points:
        log.info(
            "  %-20s %-14s L=%-3d D=%-5d non-embedding %s (%+.2f%% vs %s), %d steps, %.2fM FLOPs/token",
            p["name"],
            p["model"],
            p["layers"],
            p["width"],
            f"{p['non_embedding_params']:,}",
            100.0 * (p["non_embedding_params"] - reference) / reference,
            points[0]["name"],
            p["steps"],
            p["train_flops_per_token"] / 1e6,
        )
    mine = [p for i, p in enumerate(cfg.compare) if part is None or i % part[1] == part[0]]
    tuning: dict[str, dict[str, Any]] = {}
    tune_records: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    by_name = {p["name"]: p for p in points}

    def failed(point: ModelPoint, seed: int | None, workdir: Path, err: Exception) -> None:
        log.error("%s seed %s failed: %s", point.name, seed, err)
        failures.append(
            {
                "name": point.name,
                "seed": seed,
                "run_dir": str(workdir),
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        )

    for point in mine:
        try:
            summary, tried = tune_point(
                cfg,
                point,
                store,
                runs_dir,
                preset,
                progress=progress,
                lrs=lrs,
                retune=retune,
                commit=commit,
            )
        except Preempted:  # SIGTERM: the cell saved its checkpoint; stop the sweep
            raise
        except Exception as err:  # keep going with the other points; report this one
            failed(point, None, tune_dir(runs_dir, preset, point.name, 0.0).parent, err)
            continue
        tuning[point.name], tune_records = summary, tune_records + tried
        if tune_only:
            continue
        for seed in cfg.seeds:
            cell = final_config(cfg, point, summary["pick"], seed)
            key = f"final_{point.name}_s{seed}"
            workdir = run_dir(runs_dir, preset, point.name, seed)
            record = store.get(key, fingerprint(cell))
            if record is None:
                log.info("training %s seed %d at lr %.4g in %s", point.name, seed, cell.lr, workdir)
                try:
                    record = _cell_meta(cell, point, "final", workdir)
                    record.update(_run_cell(cell, workdir, progress, tuning=False))
                except Preempted:
                    raise
                except Exception as err:  # keep training the other cells; report this one
                    failed(point, seed, workdir, err)
                    continue
                record = _finished(record, commit)
                store.put(key, record)
            else:
                log.info("%s seed %d: finished earlier (%s)", point.name, seed, key)
            records.append({**by_name[point.name], **record})
            log.info("  %s seed %d: %s CE %.4f", point.name, seed, record["split"], record["ce"])

    stem = f"param_matched_{preset}"
    if cfg.compare != full_compare:  # a --models subset never replaces the preset's full result
        stem += "_" + "-".join(dict.fromkeys(p.family_name for p in cfg.compare))
    meta = {
        "harness": HARNESS,
        "preset": preset,
        "stem": stem,
        "overrides": list(overrides),
        "command": command or f"python -m experiments.param_matched --preset {preset}",
        "commit": commit,
        "machine": machine(),
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.time() - started,
        "parts": str(store.directory),
    }
    if failures:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.failed.json"
        path.write_text(json.dumps({**meta, "failures": failures, "records": records}, indent=2))
        total = len(mine) * (1 if tune_only else len(cfg.seeds))
        raise RuntimeError(
            f"{len(failures)} of {total} cells failed (first: {failures[0]['name']} seed "
            f"{failures[0]['seed']}: {failures[0]['error']}); details in {path}. Earlier results "
            f"in {out_dir} were left untouched; rerun to resume (finished cells are kept in "
            f"{store.directory})"
        )
    settings = {
        "steps": cfg.steps,
        "tune_steps": cfg.tune_steps or max(1, cfg.steps // 3),
        "tune_lrs": list(lrs or cfg.tune_lrs),
        "seeds": list(cfg.seeds),
        "tokens_per_step": cfg.tokens_per_step(),
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "corpus": cfg.data.corpus,
        "tokenizer": cfg.data.tokenizer,
        "eval_batches": cfg.eval_batches,
        "eval_points": cfg.eval_points,
        "split": report_split(cfg),
        "level": LEVEL,
    }
    payload = {**meta, "settings": settings, "points": points, "tuning": tuning}
    payload["tune_records"] = tune_records
    if part is not None:
        log.info(
            "part %d/%d finished (%d tuning and %d seed cells in %s); run without --part to merge",
            part[0], part[1], len(tune_records), len(records), store.directory,
        )  # fmt: skip
        return payload | {"records": records}
    if tune_only:
        _write_outputs(
            out_dir,
            f"{stem}_tuning",
            {
                ".json": json.dumps(payload, indent=2) + "\n",
                ".md": f"# Learning-rate tuning: `{preset}`\n\n"
                + "\n".join(tuning_lines(tuning))
                + f"\n\nCommand: `{meta['command']}`  \nCommit: `{meta['commit']}`  \n"
                f"Machine: {meta['machine']}\n",
            },
        )
        return payload | {"records": []}
    if throughput_rounds:
        log.info(
            "timing the train steps of every point side by side (%d rounds)", throughput_rounds
        )
        side = measure_throughput(cfg, rounds=throughput_rounds)
    else:  # each run's own median (machine load during that run skews it)
        side = {}
    for record in records:
        record["tokens_per_s"] = side.get(record["name"], record["tokens_per_s_during_training"])
    payload["throughput"] = "side by side" if side else "during training"
    payload["records"] = records
    payload["summary"] = summarise(points, records, tuning)
    payload["comparisons"] = comparisons(cfg, payload["summary"], records)
    payload["cells_wall_s"] = sum(r.get("wall_s", 0.0) for r in records + tune_records)
    _write_outputs(
        out_dir,
        stem,
        {
            ".json": json.dumps(payload, indent=2) + "\n",
            ".md": markdown(preset, cfg, payload),
            ".png": lambda tmp: plot(payload, tmp, f"param_matched {preset}"),
        },
    )
    stale = out_dir / f"{stem}.failed.json"
    if stale.exists():
        stale.unlink()
    return payload


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the Markdown report at the end."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field for every run, e.g. steps=100, seeds=0,1,2",
    )
    parser.add_argument("--out-dir", default="results", help="where the results files go")
    parser.add_argument("--runs-dir", default="runs", help="parent of the run directories")
    parser.add_argument(
        "--parts-dir", default=None, help="parent of the finished-cell records (default --out-dir)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"libraries' INFO (Orbax, absl) on the console too (always in each run dir's {LOG_FILE})",
    )
    parser.add_argument(
        "--throughput-rounds",
        type=int,
        default=15,
        help="interleaved timing rounds of all train steps after training (0: each run's own)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated model families to compare, e.g. transformer,recurrent,lrt-shared,"
        "lrt-layerwise (default: every point of the preset)",
    )
    parser.add_argument(
        "--lrs", default="", help="log-spaced lr grid for every point, e.g. 1e-3,2e-3,4e-3"
    )
    parser.add_argument(
        "--part", default="", help="i/n: run only points i, i+n, ... (merge: rerun without it)"
    )
    parser.add_argument(
        "--tune-only", action="store_true", help="only the lr tuning (writes <stem>_tuning.*)"
    )
    parser.add_argument(
        "--retune", action="store_true", help="tune points that have a fixed lr in the preset too"
    )
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
        if models:
            cfg = select_models(cfg, models)
        describe_points(cfg)
        lrs, part = parse_lrs(args.lrs), parse_part(args.part)
        for point in cfg.compare:
            if not (point.lr and not args.retune and not lrs):
                tuning_grid(cfg, point, lrs)
    except ValueError as err:
        parser.error(str(err))
    raw = sys.argv[1:] if argv is None else argv
    command = "python -m experiments.param_matched " + shlex.join(raw)
    try:
        payload = run(
            args.preset,
            args.overrides,
            args.out_dir,
            args.runs_dir,
            progress=not args.no_progress,
            command=command,
            throughput_rounds=args.throughput_rounds,
            models=models,
            lrs=lrs,
            part=part,
            tune_only=args.tune_only,
            retune=args.retune,
            parts_base=args.parts_dir,
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if part is not None:
        print(f"part {args.part}: cells in {payload['parts']}; rerun without --part to merge")
        return 0
    md = Path(args.out_dir) / f"{payload['stem']}{'_tuning' if args.tune_only else ''}.md"
    print(md.read_text())
    if not args.tune_only and Path(args.out_dir).resolve() == (readme.REPO / "results").resolve():
        readme.main([])  # the README's generated tables follow the results just written
    print(f"wrote {md} (and .json{'' if args.tune_only else ', .png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
