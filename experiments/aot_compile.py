"""Compile each preset's sharded train step ahead of time for real TPU topologies, from a CPU host.

For every preset, every model of its comparison (``cfg.compare``, or the preset's own model) and
every topology, this builds ``rt_jax.train.step.build_train_step`` on a mesh of the topology's
devices (PyPI ``libtpu`` + ``jax.experimental.topologies.get_topology_desc``), runs
``.lower(...).compile()`` (a real XLA:TPU compile) and reports per device:

* memory from ``compiled.memory_analysis()``: arguments, outputs, temporaries, the donated
  (aliased) part, and ``total = arguments + outputs - aliased + temporaries``, against the chip's HBM;
* model FLOPs per step, analytic (``rt_jax.train.flops``, causal half, 3x forward), in total and per
  device, and the step time that would take at the chip's bf16 peak. XLA's own
  ``cost_analysis()["flops"]`` is recorded too as ``xla_flops_per_device``, but it counts a scan
  body once (the layer scan, the RT position loop, microbatches), so it undercounts: it is not the
  number to use.

A cell that does not fit is retried with doubled ``microbatches`` (and then ``model.remat``), up to
``--max-microbatches``, and the first variant that fits is reported as the suggestion. Each compile
runs in its own subprocess (own environment, ``JAX_PLATFORMS=cpu``; a compiler crash or time-out
fails one cell, not the run).

Command that wrote results/aot_compile.{json,md}:

    JAX_PLATFORMS=cpu .venv/bin/python -m experiments.aot_compile \
        --presets paper-150m,paper-300m --topologies v5e:2x2,v6e:2x2,v5p:2x2x1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.provenance import git_commit, machine

DEFAULT_PRESETS = ("paper-150m", "paper-300m")
DEFAULT_TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1")
GIB = 1024**3


def _cell_config(preset: str, overrides: list[str], point_name: str | None, extra: list[str]):
    """The single-model TrainConfig of one cell (imports jax lazily: only workers need it)."""
    from rt_jax.train.config import apply_overrides, get_preset, with_point

    cfg = apply_overrides(get_preset(preset), overrides)
    if point_name is not None:
        points = {p.name: p for p in cfg.compare}
        if point_name not in points:
            raise ValueError(f"preset {preset} has no compare point {point_name!r}: {list(points)}")
        cfg = with_point(cfg, points[point_name], cfg.seeds[0])
    return apply_overrides(cfg, extra)


def compile_cell(
    preset: str,
    overrides: list[str],
    point_name: str | None,
    topology: str,
    extra: list[str],
) -> dict[str, Any]:
    """Compile one (preset, point, topology) train step; return its memory/FLOP report."""
    import jax
    from jax.experimental import topologies

    from rt_jax.train import flops
    from rt_jax.train.sharding import make_mesh
    from rt_jax.train.step import build_train_step

    cfg = _cell_config(preset, overrides, point_name, extra)
    topo = topologies.get_topology_desc(topology, platform="tpu")
    devices = list(topo.devices)
    device_kind = devices[0].device_kind
    mesh = make_mesh(cfg.mesh, devices)
    t0 = time.perf_counter()
    train_step = build_train_step(cfg, mesh)
    lowered = train_step.step.lower(train_step.abstract_state, train_step.batch_spec)
    state_b = _per_device_bytes(train_step.abstract_state)
    batch_b = _per_device_bytes(train_step.batch_spec)
    oom = None
    try:
        compiled = lowered.compile()
    except Exception as err:  # XLA:TPU refuses programs that exceed HBM: report the numbers
        oom = _parse_oom(str(err))
        if oom is None:
            raise
    compile_s = time.perf_counter() - t0

    if oom is None:
        mem = compiled.memory_analysis()
        args_b = int(mem.argument_size_in_bytes)
        out_b = int(mem.output_size_in_bytes)
        temp_b = int(mem.temp_size_in_bytes)
        alias_b = int(mem.alias_size_in_bytes)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    else:  # no executable: arguments from the shardings, temporaries from XLA's message
        args_b, out_b, alias_b = state_b + batch_b, state_b, state_b
        temp_b = oom["required_bytes"]
        xla_flops = float("nan")
    total_b = args_b + out_b - alias_b + temp_b

    model, n_dev = cfg.model, len(devices)
    step_flops = flops.train_flops_per_step(model, cfg.data.seq_len, cfg.data.batch_size)
    peak = flops.peak_flops_per_device(device_kind, "bfloat16")
    hbm = flops.hbm_bytes_per_device(device_kind)
    return {
        "preset": preset,
        "point": point_name or f"{model.block_type}-{model.n_layers}L",
        "block_type": model.block_type,
        "impl": model.impl,
        "layers": model.n_layers,
        "width": model.d_model,
        "heads": model.n_heads,
        "mlp_hidden": model.mlp_hidden,
        "non_embedding_params": model.non_embedding_params(),
        "total_params": model.total_params(),
        "compute_dtype": model.compute_dtype,
        "remat": model.remat,
        "topology": topology,
        "device_kind": device_kind,
        "n_devices": n_dev,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape), strict=True)),
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "microbatches": cfg.microbatches,
        "argument_bytes": args_b,
        "output_bytes": out_b,
        "temp_bytes": temp_b,
        "alias_bytes": alias_b,
        "total_bytes": total_b,
        "hbm_bytes": hbm,
        "fits": False if oom else (None if hbm is None else total_b <= hbm),
        "xla_out_of_memory": None if oom is None else oom["message"],
        "state_bytes_per_device": state_b,
        "model_flops_per_step": step_flops,
        "model_flops_per_device": step_flops / n_dev,
        "ideal_step_s_at_peak": None if peak is None else step_flops / n_dev / peak,
        "xla_flops_per_device": xla_flops,
        "compile_s": round(compile_s, 2),
        "jax_version": jax.__version__,
    }


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _parse_oom(message: str) -> dict[str, Any] | None:
    """XLA:TPU's "Ran out of memory in memory space hbm" compile error as numbers, else None."""
    import re

    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None
    m = re.search(
        r"required for ([^(]+?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
        message,
    )
    first = next((line for line in message.splitlines() if "memory" in line), message)[:400]
    if m is None:
        return {"required_bytes": 0, "available_bytes": None, "message": first}
    return {
        "what": m.group(1),
        "required_bytes": int(float(m.group(2)) * _UNITS[m.group(3)]),
        "available_bytes": int(float(m.group(4)) * _UNITS[m.group(5)]),
        "message": first,
    }


def _run_worker(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run compile_cell in a subprocess with its own environment; an error becomes a record."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # no /tmp/libtpu_lockfile: several compiles may run
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "experiments.aot_compile", "--worker", json.dumps(job)]
    base = {
        "preset": job["preset"],
        "point": job["point"],
        "topology": job["topology"],
        "extra": job["extra"],
    }
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {**base, "error": f"compile timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("AOT_RESULT "):
            return {**json.loads(line[len("AOT_RESULT ") :]), "extra": job["extra"]}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {**base, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)[-1500:]}


def _suggestions(record: dict[str, Any], max_micro: int) -> list[list[str]]:
    """Variants to try when a cell does not fit: doubled microbatches, then also remat."""
    per_shard = record["batch_size"] // (record["mesh"]["data"] * record["mesh"]["fsdp"])
    out, micro = [], record["microbatches"]
    while micro * 2 <= max_micro and per_shard % (micro * 2) == 0:
        micro *= 2
        out.append([f"microbatches={micro}"])
    if not record["remat"]:
        out.append([f"microbatches={micro}", "model.remat=true"])
    return out


def _fmt_gib(b: float | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def markdown(records: list[dict[str, Any]], command: str, machine: str, commit: str) -> str:
    """The results table as Markdown."""
    lines = [
        "# Ahead-of-time TPU compiles of the paper presets' train steps",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{commit}`; host: {machine}.",
        "",
        "Per-device memory from `compiled.memory_analysis()` (GiB): total = arguments + outputs "
        "- donated (aliased) + temporaries. Model TFLOPs per step are analytic (matmuls, causal "
        "half, 3x forward, no recomputation); XLA's cost_analysis counts a scan body once and is "
        'not used. Ideal step = per-device model FLOPs / bf16 peak. "XLA OOM": XLA:TPU '
        "refused the program (its temporaries exceed HBM); the temporaries are the size from its "
        "error message and the arguments/outputs are computed from the state's shardings.",
        "",
        "| preset | model | topology | mesh (d,f,t) | batch x len / micro | args | outputs "
        "| temps | total | HBM | % HBM | fits | TFLOPs/step | ideal step (s) | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        extra = " ".join(r.get("extra") or [])
        name = r["point"] + (f" [{extra}]" if extra else "")
        if r.get("block_type") == "recurrent" and r.get("impl", "tiled") != "tiled":
            name += f" ({r['impl']})"
        if "error" in r:
            lines.append(
                f"| {r['preset']} | {name} | {r['topology']} | | | | | | | | | error | | | |"
            )
            continue
        m = r["mesh"]
        fits = {True: "yes", False: "**no**", None: "?"}[r["fits"]]
        if r.get("xla_out_of_memory"):
            fits = "**no** (XLA OOM)"
        elif r["fits"] and r["total_bytes"] > 0.95 * r["hbm_bytes"]:
            fits = "yes (tight: > 95%)"
        pct = "-" if not r["hbm_bytes"] else f"{100 * r['total_bytes'] / r['hbm_bytes']:.0f}"
        ideal = "-" if r["ideal_step_s_at_peak"] is None else f"{r['ideal_step_s_at_peak']:.3f}"
        lines.append(
            f"| {r['preset']} | {name} | {r['topology']} ({r['device_kind']}) "
            f"| {m['data']},{m['fsdp']},{m['tensor']} "
            f"| {r['batch_size']} x {r['seq_len']} / {r['microbatches']} "
            f"| {_fmt_gib(r['argument_bytes'])} | {_fmt_gib(r['output_bytes'])} "
            f"| {_fmt_gib(r['temp_bytes'])} | {_fmt_gib(r['total_bytes'])} "
            f"| {_fmt_gib(r['hbm_bytes'])} | {pct} | {fits} "
            f"| {r['model_flops_per_step'] / 1e12:.1f} "
            f"| {ideal} | {r['compile_s']:.0f} |"
        )
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["", "Errors:", ""]
        for r in errors:
            lines.append(f"- {r['preset']} / {r['point']} / {r['topology']}: {r['error']}")
    suggestions = [r for r in records if r.get("suggestion_for")]
    if suggestions:
        lines += ["", "Suggestions (first variant that fits, per cell that did not):", ""]
        for r in suggestions:
            lines.append(
                f"- {r['preset']} / {r['point']} / {r['topology']}: `--set "
                + " --set ".join(r["extra"])
                + f"` -> {_fmt_gib(r['total_bytes'])} GiB of {_fmt_gib(r['hbm_bytes'])} GiB"
            )
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _compile_with_suggestions(
    job: dict[str, Any], suggest: bool, max_microbatches: int, timeout_s: float
) -> list[dict[str, Any]]:
    """One cell, then (if it does not fit) variants until one fits: the records to keep."""
    record = _run_worker(job, timeout_s)
    _print_record(record)
    out = [record]
    if suggest and record.get("fits") is False:
        for extra in _suggestions(record, max_microbatches):
            alt = _run_worker({**job, "extra": extra}, timeout_s)
            alt["suggestion_for"] = True
            _print_record(alt)
            if alt.get("fits"):
                out.append(alt)
                break
        else:
            record["suggestion"] = "no tried variant fits"
    return out


def run(
    presets: list[str],
    topologies: list[str],
    overrides: list[str],
    out_dir: Path,
    *,
    points: list[str] | None = None,
    suggest: bool = True,
    max_microbatches: int = 32,
    timeout_s: float = 1800.0,
    jobs: int = 1,
    name: str = "aot_compile",
    command: str = "",
) -> list[dict[str, Any]]:
    """Compile every cell (``jobs`` at a time), try fitting variants for the ones that do not fit,
    and rewrite the results after every finished cell (so an interrupted run keeps its table)."""
    from concurrent.futures import ThreadPoolExecutor

    from rt_jax.train.config import apply_overrides, get_preset

    cells = []
    for preset in presets:
        cfg = apply_overrides(get_preset(preset), overrides)
        names = [p.name for p in cfg.compare] or [None]
        if points:
            names = [n for n in names if n in points]
        if cfg.model.impl != "tiled":  # impl only changes RT blocks: skip the Transformer points
            kinds = {p.name: p.block_type for p in cfg.compare}
            names = [n for n in names if kinds.get(n, cfg.model.block_type) == "recurrent"]
        for topology in topologies:
            for point in names:
                cells.append(
                    {
                        "preset": preset,
                        "overrides": overrides,
                        "point": point,
                        "topology": topology,
                        "extra": [],
                    }
                )
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "commit": git_commit(), "machine": machine()}
    done: list[list[dict[str, Any]] | None] = [None] * len(cells)

    def write() -> list[dict[str, Any]]:
        records = [r for group in done if group for r in group]
        payload = {**meta, "records": records}
        _write_atomic(out_dir / f"{name}.json", json.dumps(payload, indent=2) + "\n")
        md = markdown(records, command, meta["machine"], meta["commit"])
        _write_atomic(out_dir / f"{name}.md", md)
        return records

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [
            pool.submit(_compile_with_suggestions, c, suggest, max_microbatches, timeout_s)
            for c in cells
        ]
        for i, future in enumerate(futures):
            done[i] = future.result()
            write()
    return write()


def _print_record(r: dict[str, Any]) -> None:
    extra = " ".join(r.get("extra") or [])
    head = f"{r['preset']:<11} {r['point']:<18} {r['topology']:<10} {extra:<32}"
    if "error" in r:
        print(f"{head} ERROR ...{r['error'][-400:]}", flush=True)
        return
    print(
        f"{head} total {r['total_bytes'] / GIB:7.2f} GiB of {_fmt_gib(r['hbm_bytes'])} "
        f"fits={r['fits']} temps {r['temp_bytes'] / GIB:.2f} GiB "
        f"{r['model_flops_per_step'] / 1e12:.1f} TFLOP/step compile {r['compile_s']:.0f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--topologies", default=",".join(DEFAULT_TOPOLOGIES))
    parser.add_argument("--points", default="", help="comma-separated compare point names")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--name", default="aot_compile", help="output file stem")
    parser.add_argument("--no-suggest", action="store_true")
    parser.add_argument("--max-microbatches", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=1, help="compiles running at once")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the .md from the existing .json"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render_only:
        stem = Path(args.out_dir) / args.name
        payload = json.loads(stem.with_suffix(".json").read_text())
        md = markdown(payload["records"], payload["command"], payload["machine"], payload["commit"])
        _write_atomic(stem.with_suffix(".md"), md)
        return
    if args.worker is not None:
        job = json.loads(args.worker)
        record = compile_cell(
            job["preset"], job["overrides"], job["point"], job["topology"], job["extra"]
        )
        print("AOT_RESULT " + json.dumps(record), flush=True)
        return
    command = "python -m experiments.aot_compile " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    records = run(
        [p for p in args.presets.split(",") if p],
        [t for t in args.topologies.split(",") if t],
        args.overrides,
        Path(args.out_dir),
        points=[p for p in args.points.split(",") if p] or None,
        suggest=not args.no_suggest,
        max_microbatches=args.max_microbatches,
        timeout_s=args.timeout,
        jobs=args.jobs,
        name=args.name,
        command=command.strip(),
    )
    if any("error" in r for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
