"""Synthetic temporal-depth suite: one-layer Transformer vs Recurrent Transformer.

One cell:
    python -m experiments.synthetic --task parity --model recurrent --layers 1 --width 128 \
        --seq-len 64 --steps 300 --seed 0 --out results/parity_rt.json
The grid (results/synthetic.{json,md,png}); --quick is CI-sized, --full adds length 512 and tunes
the learning rate per cell:
    python -m experiments.synthetic --sweep [--quick | --full] [--out-dir results]
Split over processes or machines, then merged into the same table:
    python -m experiments.synthetic --sweep --tasks parity,mod5,s5        # -> synthetic_part-....json
    python -m experiments.synthetic --sweep --tasks recall,fuzzy_recall,noisy_recall,selective_copy,copy
    python -m experiments.synthetic --sweep --merge results/synthetic_part-*.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.provenance import git_commit, machine
from rt_jax.data.synthetic import TASKS
from rt_jax.train.tasks import TaskRun, train_task

MODELS = ("transformer", "recurrent")
LR_GRID = (1e-4, 5e-4, 1e-3)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A sweep: which cells, how long, and how learning rates are picked."""

    name: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    tune_steps: int
    tune_length: int
    lr_grid: tuple[float, ...]
    tune_per_cell: bool = False
    batch_size: int = 32
    task_steps: tuple[tuple[str, int, int], ...] = ()
    """Per-task (task, steps, tune_steps) overrides of ``steps`` / ``tune_steps``."""

    def steps_for(self, task: str) -> tuple[int, int]:
        """(training steps, tuning steps) of one task."""
        for name, steps, tune in self.task_steps:
            if name == task:
                return steps, tune
        return self.steps, self.tune_steps


STATE_TRACKING = ("parity", "mod5", "s5")

# The default grid fits about an hour on 2 quiet cores. Measured there (batch 16, one layer, width
# 128): a step takes about 0.04 / 0.075 / 0.155 s at N = 64 / 128 / 256, so one (task, model, seed)
# row of three lengths costs about 0.27 s per step. A one-layer RT needs about 150-200 steps to
# learn parity and about 700 to learn mod 5 at N = 64 (lr 1e-3), so the state-tracking tasks get
# 600 steps and the five MAD tasks 300; learning rates are tuned at N = 64 with runs of a third of
# the cell's steps.
GRIDS = {
    "quick": Grid("quick", ("parity", "recall"), (16, 32), (0,), 20, 10, 16, (1e-3,), batch_size=8),
    "default": Grid(
        "default",
        tuple(TASKS),
        (64, 128, 256),
        (0, 1),
        300,
        100,
        64,
        LR_GRID,
        batch_size=16,
        task_steps=tuple((t, 600, 200) for t in STATE_TRACKING),
    ),
    "full": Grid(
        "full", tuple(TASKS), (64, 128, 256, 512), (0, 1, 2), 2000, 300, 64, LR_GRID, True
    ),
}


def _run(args: argparse.Namespace, **changes: Any) -> TaskRun:
    base = TaskRun(
        task=args.task or "parity",
        block_type=args.model,
        n_layers=args.layers,
        d_model=args.width,
        n_heads=args.heads,
        mlp_hidden=args.mlp or 4 * args.width,
        seq_len=args.seq_len,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch,
        seed=args.seed,
        impl=args.impl,
    )
    return dataclasses.replace(base, **changes)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def _tune(grid: Grid, base: TaskRun, length: int) -> tuple[float, dict[str, float]]:
    """Pick the learning rate with the best accuracy after a short run (no run for one choice);
    ties (e.g. every rate still at chance) go to the lowest final training loss."""
    if len(grid.lr_grid) == 1:
        return grid.lr_grid[0], {}
    scores, losses = {}, {}
    _, tune_steps = grid.steps_for(base.task)
    for lr in grid.lr_grid:
        run = dataclasses.replace(base, seq_len=length, steps=tune_steps, lr=lr, seed=0)
        result = train_task(run)
        scores[str(lr)], losses[str(lr)] = result["accuracy"], result["final_loss"]
    best = max(grid.lr_grid, key=lambda lr: (scores[str(lr)], -losses[str(lr)]))
    return best, scores


def sweep(grid: Grid, base: TaskRun, out_dir: Path) -> list[dict[str, Any]]:
    """Run the grid and write ``synthetic.{json,md,png}`` (``synthetic_<grid>`` for non-default;
    a subset of the grid's tasks writes a part JSON, see ``merge``)."""
    rows, picks = [], {}
    start = time.perf_counter()
    # Finished cells and lr picks are appended to a JSONL log as they complete; a rerun with the
    # same grid and out_dir resumes from it instead of retraining them.
    progress = out_dir / f"{_stem(grid, _is_part(grid))}.progress.jsonl"
    done: dict[tuple, dict[str, Any]] = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            item = json.loads(line)
            if "pick" in item:
                picks[item["pick"]] = item["value"]
            else:
                done[(item["task"], item["model"], item["seq_len"], item["seed"])] = item
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(item: dict[str, Any]) -> None:
        with progress.open("a") as f:
            f.write(json.dumps(item) + "\n")

    def pick(key: str, cell_base: TaskRun, length: int) -> float:
        if key not in picks:
            lr, scores = _tune(grid, cell_base, length)
            picks[key] = {"lr": lr, "tuning_accuracy": scores}
            log({"pick": key, "value": picks[key]})
        return picks[key]["lr"]

    for task in grid.tasks:
        for model in MODELS:
            steps, _ = grid.steps_for(task)
            cell_base = dataclasses.replace(base, task=task, block_type=model, steps=steps)
            if not grid.tune_per_cell:
                lr = pick(f"{task}/{model}", cell_base, grid.tune_length)
            for length in grid.lengths:
                if grid.tune_per_cell:
                    lr = pick(f"{task}/{model}/{length}", cell_base, length)
                for seed in grid.seeds:
                    if (task, model, length, seed) in done:
                        rows.append(done[(task, model, length, seed)])
                        continue
                    run = dataclasses.replace(cell_base, seq_len=length, seed=seed, lr=lr)
                    result = train_task(run)
                    row = _record(run, result)
                    rows.append(row)
                    log(row)
                    print(
                        f"{task:15s} {model:12s} N={length:4d} seed={seed} lr={lr:g} "
                        f"acc={row['accuracy']:.3f} ({row['seconds_per_step'] * 1e3:.0f} ms/step)",
                        flush=True,
                    )
    meta = {
        "grid": dataclasses.asdict(grid),
        "lr_picks": picks,
        "wall_seconds": time.perf_counter() - start,
        "command": " ".join(
            [Path(sys.executable).name, "-m", "experiments.synthetic", *sys.argv[1:]]
        ),
        "commit": git_commit(),
        "machine": machine(),
    }
    write_results(grid, rows, meta, out_dir, part=_is_part(grid))
    return rows


def _is_part(grid: Grid) -> bool:
    """Whether ``grid`` runs a ``--tasks`` subset of the named grid."""
    named = GRIDS.get(grid.name)
    return named is not None and grid.tasks != named.tasks


def _stem(grid: Grid, part: bool) -> str:
    stem = "synthetic" if grid.name == "default" else f"synthetic_{grid.name}"
    return stem + ("_part-" + "-".join(grid.tasks) if part else "")


def write_results(
    grid: Grid, rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path, part: bool
) -> None:
    """Write the grid's JSON (and, for a whole grid, Markdown and PNG); a ``--tasks`` subset
    writes only ``<stem>_part-<tasks>.json``, for ``--merge``."""
    stem = _stem(grid, part)
    _write_atomic(out_dir / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    if part:
        return
    _write_atomic(out_dir / f"{stem}.md", _markdown(grid, rows, meta))
    _plot(grid, rows, out_dir / f"{stem}.png")


def merge(grid: Grid, parts: list[Path], out_dir: Path) -> list[dict[str, Any]]:
    """Combine part JSONs (``--tasks`` subsets of ``grid`` run in separate processes) into the
    grid's results; ValueError if a task of the grid is missing or a part ran another grid."""
    rows: list[dict[str, Any]] = []
    metas = []
    mine = json.loads(
        json.dumps({k: v for k, v in dataclasses.asdict(grid).items() if k != "tasks"})
    )
    for path in parts:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        if {k: v for k, v in meta["grid"].items() if k != "tasks"} != mine:
            raise ValueError(f"{path} was run with another grid than {grid.name!r}")
        rows += data["rows"]
        metas.append(meta)
    missing = [t for t in grid.tasks if not any(r["task"] == t for r in rows)]
    if missing:
        raise ValueError(f"the parts have no rows for {missing}: run them with --tasks")
    rows.sort(key=lambda r: (grid.tasks.index(r["task"]), r["model"], r["seq_len"], r["seed"]))
    merged_command = " ".join(["python", "-m", "experiments.synthetic", *sys.argv[1:]])
    meta = {
        "grid": dataclasses.asdict(grid),
        "lr_picks": {k: v for m in metas for k, v in m["lr_picks"].items()},
        "wall_seconds": max(m["wall_seconds"] for m in metas),
        "command": "; ".join(m["command"] for m in metas) + f"; then {merged_command}",
        "commit": ", ".join(dict.fromkeys(m["commit"] for m in metas)),
        "machine": metas[0]["machine"],
        "parts": [str(p) for p in parts],
        "notes": [n for m in metas for n in m.get("notes", [])],
    }
    write_results(grid, rows, meta, out_dir, part=False)
    return rows


def _record(run: TaskRun, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": run.task,
        "model": run.block_type,
        "layers": run.n_layers,
        "width": run.d_model,
        "seq_len": run.seq_len,
        "seed": run.seed,
        "steps": run.steps,
        "lr": run.lr,
        "accuracy": result["accuracy"],
        "final_loss": result["final_loss"],
        "seconds_per_step": result["seconds_per_step"],
    }


def _summary(rows: list[dict[str, Any]], task: str, model: str, length: int) -> tuple[float, float]:
    accs = [
        r["accuracy"]
        for r in rows
        if (r["task"], r["model"], r["seq_len"]) == (task, model, length)
    ]
    return float(np.mean(accs)), float(np.max(accs) - np.min(accs)) if len(accs) > 1 else 0.0


def _markdown(grid: Grid, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = "| task | model | steps | lr | " + " | ".join(f"N={n}" for n in grid.lengths) + " |"
    lines = [
        f"# Synthetic suite ({grid.name} grid)",
        "",
        f"Token accuracy on held-out sequences (scored positions only), mean +- range over seeds "
        f"{list(grid.seeds)}; one layer, width {rows[0]['width'] if rows else '?'}; "
        f"batch {grid.batch_size}; training steps per task in the steps column; lr tuned over "
        f"{list(grid.lr_grid)} with runs of {grid.tune_steps} steps"
        + "".join(f" ({t}: {tune})" for t, _, tune in grid.task_steps)
        + f" at N={grid.tune_length}"
        + (" per cell" if grid.tune_per_cell else "")
        + " (picked rate in the lr column; ties broken by final training loss).",
        "",
        f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['machine']}, "
        f"{meta['wall_seconds'] / 60:.1f} min).",
        "",
    ]
    lines += [f"Note: {note}" for note in meta.get("notes", [])] + (
        [""] if meta.get("notes") else []
    )
    lines += [
        head,
        "|" + "---|" * (4 + len(grid.lengths)),
    ]
    for task in grid.tasks:
        for model in MODELS:
            lrs = sorted({r["lr"] for r in rows if (r["task"], r["model"]) == (task, model)})
            cells = []
            for n in grid.lengths:
                mean, spread = _summary(rows, task, model, n)
                cells.append(f"{mean:.3f} +- {spread / 2:.3f}")
            lr_text = ",".join(f"{lr:g}" for lr in lrs)
            steps = grid.steps_for(task)[0]
            lines.append(f"| {task} | {model} | {steps} | {lr_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(grid: Grid, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(grid.tasks))
    nrows = -(-len(grid.tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, grid.tasks, strict=False):
        for model in MODELS:
            stats = [_summary(rows, task, model, n) for n in grid.lengths]
            means = [s[0] for s in stats]
            errs = [s[1] / 2 for s in stats]
            ax.errorbar(grid.lengths, means, yerr=errs, marker="o", capsize=3, label=model)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("token accuracy")
    for ax in list(axes.flat)[len(grid.tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=sorted(TASKS))
    p.add_argument("--model", choices=MODELS, default="recurrent")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 x width)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", default="tiled", choices=("reference", "tiled", "pallas"))
    p.add_argument("--out", type=Path, help="JSON file for a single cell")
    p.add_argument("--sweep", action="store_true", help="run a grid instead of one cell")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized grid")
    size.add_argument("--full", action="store_true", help="the large grid (bigger machines)")
    p.add_argument("--out-dir", type=Path, default=Path("results"))
    p.add_argument(
        "--tasks",
        default="",
        help="with --sweep: run only these comma-separated tasks of the grid (writes a part JSON "
        "for --merge; splits a sweep over processes or machines)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="PART_JSON",
        help="with --sweep: combine part JSONs into the grid's table, plot and JSON",
    )
    args = p.parse_args(argv)
    if args.sweep:
        grid = GRIDS["quick" if args.quick else "full" if args.full else "default"]
        if args.merge:
            merge(grid, args.merge, args.out_dir)
            return
        if args.tasks:
            tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
            unknown = [t for t in tasks if t not in grid.tasks]
            if unknown:
                p.error(f"--tasks {unknown} are not in the {grid.name} grid {grid.tasks}")
            grid = dataclasses.replace(grid, tasks=tasks)
        base = dataclasses.replace(_run(args), batch_size=grid.batch_size)
        sweep(grid, base, args.out_dir)
        return
    if args.task is None:
        p.error("--task is required unless --sweep is given")
    run = _run(args)
    row = _record(run, train_task(run))
    print(json.dumps(row))
    if args.out:
        _write_atomic(args.out, json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
