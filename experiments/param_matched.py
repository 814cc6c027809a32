"""The main job: parameter-matched model families (Transformer, RT, LRT, recursive/MeSH) side by side.

    python -m experiments.param_matched --preset cpu-demo [--set field=value ...] [--out-dir results]
    python -m experiments.param_matched --preset cpu-lrt --models transformer,recurrent,lrt-shared,lrt-layerwise
    python -m experiments.param_matched --preset cpu-mesh --models transformer,recursive-base,mesh

``--models`` keeps the preset's points of those families (``ModelPoint.family_name``); the
same-shape families (transformer, recurrent, lrt-shared, lrt-layerwise) are added at the first
point's shape when the preset lacks them. A subset writes ``param_matched_<preset>_<families>.*``.

Trains every ``cfg.compare`` point with every seed in ``cfg.seeds`` (same data order, same tokens,
equal non-embedding parameters) through ``rt_jax.train.loop.train``, in run directories
``<runs-dir>/param_matched_<preset>/<point>_s<seed>`` (default runs-dir ``runs``), so an interrupted
job resumes where it stopped. Then writes, under ``--out-dir``:

* ``param_matched_<preset>.json``: one record per trained model and seed with ``model`` (the
  family: "transformer", "recurrent", "lrt-shared", "mesh", ...), ``layers``, ``depth`` (compute
  depth), ``width``, ``non_embedding_params``, ``seed``, ``val_ce``, ``tokens_per_s`` (LRT adds
  ``val_ce_parallel``; also heads, MLP, KV floats per token, FLOPs, steps, run dir, ...);
* ``param_matched_<preset>.md``: a table shaped like the paper's Table 1 (validation CE mean +- sd
  over seeds), every model against the Transformer of equal compute depth (tokens/s, train FLOPs
  and parameter ratios, CE difference vs the seed spread), the command, commit and machine;
* ``param_matched_<preset>.png``: training loss and validation CE curves of every run.

The three files are written to temporary names and renamed only after every run succeeded, so a
failed job never replaces an earlier good result (it writes ``param_matched_<preset>.failed.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from experiments.logs import LOG_FILE, log_to_file, setup_logging
from experiments.provenance import git_commit, machine
from rt_jax.train.config import PRESETS, TrainConfig, apply_overrides, get_preset, with_point
from rt_jax.train.flops import train_flops_per_token

log = logging.getLogger("param_matched")


def run_dir(runs_dir: str | os.PathLike, preset: str, point_name: str, seed: int) -> Path:
    """The run directory of one (point, seed) cell."""
    return Path(runs_dir) / f"param_matched_{preset}" / f"{point_name}_s{seed}"


def describe_points(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Exact shape and parameter counts of every compared model."""
    if not cfg.compare:
        raise ValueError("the preset has no compare points (TrainConfig.compare is empty)")
    rows = []
    for point in cfg.compare:
        model = with_point(cfg, point, cfg.seeds[0]).model
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
                "train_flops_per_token": train_flops_per_token(model, cfg.data.seq_len),
            }
        )
    return rows


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per compared model: CE mean/sd/min/max over seeds and median tokens/s."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        shape = {k: r.get(k) for k in _SHAPE_KEYS}
        row = rows.setdefault(r["name"], shape | {"ce": [], "tps": [], "ce_par": []})
        row["ce"].append(r["val_ce"])
        row["tps"].append(r["tokens_per_s"])
        if r.get("val_ce_parallel") is not None:
            row["ce_par"].append(r["val_ce_parallel"])
    out = []
    for row in rows.values():
        ce, tps, ce_par = row.pop("ce"), row.pop("tps"), row.pop("ce_par")
        mean, sd = _mean_sd(ce)
        extra = {}
        if ce_par:
            extra["val_ce_parallel_mean"] = _mean_sd(ce_par)[0]
        out.append(
            row
            | {
                "seeds": len(ce),
                "val_ce_mean": mean,
                "val_ce_sd": sd,
                "val_ce_min": min(ce),
                "val_ce_max": max(ce),
                "tokens_per_s": statistics.median(tps),
            }
            | extra
        )
    return out


_SHAPE_KEYS = (
    "name",
    "model",
    "options",
    "layers",
    "depth",
    "width",
    "heads",
    "mlp_hidden",
    "non_embedding_params",
    "kv_floats_per_token",
    "train_flops_per_token",
)

DISPLAY_NAMES = {
    "transformer": "Transformer",
    "recurrent": "Recurrent Transformer",
    "lrt-shared": "LRT (shared)",
    "lrt-layerwise": "LRT (layerwise)",
    "recursive-base": "Recursive (base)",
    "recursive-residual": "Recursive (+residual)",
    "recursive-anchor": "Recursive (+anchor)",
    "recursive-anchor-emb": "Recursive (+anchor*)",
    "mesh": "Recursive (+MeSH)",
}

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


def comparisons(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every non-Transformer row against the Transformer of the same compute depth: tokens/s and
    train-FLOPs ratios, CE difference, and whether it exceeds the seed spread."""
    baselines = {r["depth"]: r for r in summary if r["model"] == "transformer"}
    out = []
    for r in sorted(summary, key=lambda r: (-r["depth"], r["name"])):
        t = baselines.get(r["depth"])
        if r["model"] == "transformer" or t is None:
            continue
        diff = r["val_ce_mean"] - t["val_ce_mean"]
        spreads = [s for s in (t["val_ce_sd"], r["val_ce_sd"]) if s is not None]
        spread = max(spreads) if spreads else None
        out.append(
            {
                "name": r["name"],
                "model": r["model"],
                "baseline": t["name"],
                "layers": r["layers"],
                "depth": r["depth"],
                "tokens_per_s_ratio": r["tokens_per_s"] / t["tokens_per_s"],
                "train_flops_ratio": r["train_flops_per_token"] / t["train_flops_per_token"],
                "non_embedding_params_ratio": r["non_embedding_params"] / t["non_embedding_params"],
                "val_ce_diff_vs_transformer": diff,
                "max_seed_sd": spread,
                "exceeds_spread": None if spread is None else abs(diff) > 2 * spread,
                "seed_ranges_overlap": max(t["val_ce_min"], r["val_ce_min"])
                <= min(t["val_ce_max"], r["val_ce_max"]),
            }
        )
    return out


def _fmt_ce(row: dict[str, Any]) -> str:
    if row["val_ce_sd"] is None:
        return f"{row['val_ce_mean']:.4f}"
    return (
        f"{row['val_ce_mean']:.4f} ± {row['val_ce_sd']:.4f} "
        f"({row['val_ce_min']:.4f}–{row['val_ce_max']:.4f})"
    )


def display_name(model: str) -> str:
    """Human-readable name of a model family."""
    return DISPLAY_NAMES.get(model, model)


def markdown(
    preset: str,
    cfg: TrainConfig,
    summary: list[dict[str, Any]],
    comps: list[dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    """The Table-1-shaped report."""
    seeds = ", ".join(str(s) for s in cfg.seeds)
    families = ", ".join(display_name(m) for m in dict.fromkeys(r["model"] for r in summary))
    parallel = any("val_ce_parallel_mean" in r for r in summary)
    lines = [
        f"# Parameter-matched comparison: `{preset}` ({families})",
        "",
        f"{cfg.steps} steps x {cfg.data.batch_size} x {cfg.data.seq_len} tokens "
        f"({cfg.steps * cfg.tokens_per_step():,} tokens per model), corpus "
        f"`{cfg.data.corpus}` / tokenizer `{cfg.data.tokenizer}`, lr {cfg.lr:g}, seeds {seeds}, "
        f"RT impl `{cfg.model.impl}`, compute dtype `{cfg.model.compute_dtype}`.",
        "",
        "| Model | Layers (depth) | Width | Heads | MLP | Options | Non-emb. params "
        "| KV floats/token | Train FLOPs/token | Tokens/s | Val CE (mean ± sd, min–max) |"
        + (" Val CE, parallel |" if parallel else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if parallel else ""),
    ]
    order = sorted(summary, key=lambda r: (r["model"] != "transformer", -r["depth"], r["name"]))
    for r in order:
        layers = str(r["layers"]) if r["layers"] == r["depth"] else f"{r['layers']} ({r['depth']})"
        line = (
            f"| {display_name(r['model'])} | {layers} | {r['width']} | {r['heads']} "
            f"| {r['mlp_hidden']} | {r.get('options') or '-'} | {r['non_embedding_params']:,} "
            f"| {r['kv_floats_per_token']:,} | {r['train_flops_per_token'] / 1e6:.2f}M "
            f"| {r['tokens_per_s']:,.0f} | {_fmt_ce(r)} |"
        )
        if parallel:
            par = r.get("val_ce_parallel_mean")
            line += f" {par:.4f} |" if par is not None else " - |"
        lines.append(line)
    if comps:
        lines += [
            "",
            "| Model vs Transformer of equal depth | Tokens/s ratio | Train FLOPs ratio "
            "| Non-emb. params ratio | Val CE difference | Larger seed sd | Difference > 2 sd? |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in comps:
            sd = "-" if c["max_seed_sd"] is None else f"{c['max_seed_sd']:.4f}"
            exceeds = {True: "yes", False: "no", None: "n/a (1 seed)"}[c["exceeds_spread"]]
            lines.append(
                f"| {display_name(c['model'])} ({c['name']}) vs {c['baseline']} "
                f"| {c['tokens_per_s_ratio']:.2f} | {c['train_flops_ratio']:.2f} "
                f"| {c['non_embedding_params_ratio']:.3f} "
                f"| {c['val_ce_diff_vs_transformer']:+.4f} | {sd} | {exceeds} |"
            )
    best = min(summary, key=lambda r: r["val_ce_mean"])
    lines += [
        "",
        f"Lowest mean validation CE: {best['name']} ({best['val_ce_mean']:.4f}).",
        "",
        "Validation CE is per token on the held-out split at the last step"
        + (
            " (LRT: the exact recurrence, token by token with the carried memory; the parallel "
            "column scores each position by the last training pass that computed it)"
            if parallel
            else ""
        )
        + ". Depth is the compute depth (a recursive core counts once per iteration). tokens/s "
        "is training throughput timed side by side after training: every model's compiled train "
        "step in one process, interleaved rounds, median (``tokens_per_s_during_training`` in the "
        "JSON keeps each run's own median over logged windows, which machine load during that "
        "run skews). Train FLOPs/token counts every training pass (analytic). sd is over seeds.",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`  ",
        f"Machine: {meta['machine']}  ",
        f"Finished: {meta['finished']} (this invocation: {meta['wall_s'] / 60:.1f} min; runs "
        "already complete in their run directories are not retrained)",
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and validation CE against step for every run (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({r["name"] for r in records})
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    styles = ("-", "--", ":", "-.")
    seeds = sorted({r["seed"] for r in records})
    for r in records:
        history = _read_metrics(Path(r["run_dir"]) / "metrics.jsonl")
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        val = [(h["step"], h["val_ce"]) for h in history if "val_ce" in h]
        style = styles[seeds.index(r["seed"]) % len(styles)]
        label = f"{r['name']} s{r['seed']}"
        if train:
            ax_train.plot(*zip(*train, strict=True), style, color=colours[r["name"]], label=label)
        if val:
            ax_val.plot(
                *zip(*val, strict=True),
                style,
                marker="o",
                ms=3,
                color=colours[r["name"]],
                label=label,
            )
    ax_train.set(xlabel="step", ylabel="training loss (CE/token)", title="training loss")
    ax_val.set(xlabel="step", ylabel="validation CE/token", title="validation CE")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
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
) -> dict[str, Any]:
    """Train every point x seed, then write the JSON, Markdown and PNG results (see the docstring)."""
    started = time.time()
    cfg = apply_overrides(get_preset(preset), overrides)
    full_compare = cfg.compare
    if models:
        cfg = select_models(cfg, models)
    points = describe_points(cfg)
    log.info("parameter-matched models of preset %s:", preset)
    reference = points[0]["non_embedding_params"]
    for p in points:
        log.info(
            "  %-18s %-11s L=%-3d D=%-5d H=%-3d F=%-6d non-embedding %s (%+.2f%% vs %s), total %s",
            p["name"],
            p["model"],
            p["layers"],
            p["width"],
            p["heads"],
            p["mlp_hidden"],
            f"{p['non_embedding_params']:,}",
            100.0 * (p["non_embedding_params"] - reference) / reference,
            points[0]["name"],
            f"{p['total_params']:,}",
        )
    records, failures = [], []
    by_name = {p["name"]: p for p in points}
    for seed in cfg.seeds:
        for point in cfg.compare:
            workdir = run_dir(runs_dir, preset, point.name, seed)
            log.info("training %s seed %d in %s", point.name, seed, workdir)
            try:
                result = _train_cell(with_point(cfg, point, seed), workdir, progress)
            except Exception as err:  # keep training the other cells; report this one
                log.error("%s seed %d failed: %s", point.name, seed, err)
                failures.append(
                    {
                        "name": point.name,
                        "seed": seed,
                        "run_dir": str(workdir),
                        "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc(),
                    }
                )
                continue
            history = result["history"]
            losses = [h["loss"] for h in history if "loss" in h]
            record = dict(by_name[point.name])
            record.update(
                seed=seed,
                val_ce=result["val_ce"],
                **{k: v for k, v in result.items() if k.startswith("val_ce_")},
                tokens_per_s=result["tokens_per_s"],
                final_train_loss=losses[-1] if losses else None,
                steps=result["steps"],
                tokens_trained=result["steps"] * cfg.tokens_per_step(),
                run_dir=str(workdir),
            )
            if record["val_ce"] is None or record["tokens_per_s"] is None:
                failures.append(
                    {
                        "name": point.name,
                        "seed": seed,
                        "run_dir": str(workdir),
                        "error": "the run logged no validation CE or no throughput: "
                        "set eval_points >= 1 and log_every <= steps",
                    }
                )
                continue
            records.append(record)
            log.info(
                "  %s seed %d: val_ce %.4f, %.0f tokens/s",
                point.name,
                seed,
                record["val_ce"],
                record["tokens_per_s"],
            )

    if throughput_rounds and not failures:
        log.info(
            "timing the train steps of every point side by side (%d rounds)", throughput_rounds
        )
        side = measure_throughput(cfg, rounds=throughput_rounds)
        for record in records:
            record["tokens_per_s_during_training"] = record["tokens_per_s"]
            record["tokens_per_s"] = side[record["name"]]

    out_dir = Path(out_dir)
    stem = f"param_matched_{preset}"
    if cfg.compare != full_compare:  # a --models subset never replaces the preset's full result
        stem += "_" + "-".join(dict.fromkeys(p.family_name for p in cfg.compare))
    meta = {
        "preset": preset,
        "stem": stem,
        "overrides": list(overrides),
        "command": command or f"python -m experiments.param_matched --preset {preset}",
        "commit": git_commit(),
        "machine": machine(),
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.time() - started,
    }
    if failures:
        out_dir.mkdir(parents=True, exist_ok=True)
        failed = out_dir / f"{stem}.failed.json"
        failed.write_text(json.dumps({**meta, "failures": failures, "records": records}, indent=2))
        raise RuntimeError(
            f"{len(failures)} of {len(cfg.compare) * len(cfg.seeds)} runs failed "
            f"(first: {failures[0]['name']} seed {failures[0]['seed']}: {failures[0]['error']}); "
            f"details in {failed}. Earlier results in {out_dir} were left untouched; rerun to "
            "resume the runs from their checkpoints"
        )
    summary = summarise(records)
    comps = comparisons(summary)
    payload = {**meta, "records": records, "summary": summary, "comparisons": comps}
    _write_outputs(
        out_dir,
        stem,
        {
            ".json": json.dumps(payload, indent=2) + "\n",
            ".md": markdown(preset, cfg, summary, comps, meta),
            ".png": lambda tmp: plot(records, tmp, f"param_matched {preset}"),
        },
    )
    stale = out_dir / f"{stem}.failed.json"
    if stale.exists():
        stale.unlink()
    return payload


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


def _train_cell(cfg: TrainConfig, workdir: Path, progress: bool) -> dict[str, Any]:
    from rt_jax.train.loop import train

    with log_to_file(workdir):  # Orbax / absl INFO of this run: <workdir>/log.txt
        return train(cfg, workdir, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the Markdown table at the end."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=PRESETS)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field for every run, e.g. steps=100, seeds=0,1",
    )
    parser.add_argument("--out-dir", default="results", help="where the results files go")
    parser.add_argument("--runs-dir", default="runs", help="parent of the run directories")
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
        help="interleaved timing rounds of all train steps after training (0: skip)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated model families to compare, e.g. transformer,recurrent,lrt-shared,"
        "lrt-layerwise (default: every point of the preset)",
    )
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
        if models:
            cfg = select_models(cfg, models)
        describe_points(cfg)
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
        )
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    md = Path(args.out_dir) / f"{payload['stem']}.md"
    print(md.read_text())
    print(f"wrote {md}, .json and .png ({len(payload['records'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
