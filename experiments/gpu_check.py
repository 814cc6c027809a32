"""GPU check: compiled Pallas kernels, RT vs Transformer layer timings, paper-150m train tokens/s.

On one GPU (``make gpu-check`` = ``PYTHONPATH=. python -m experiments.gpu_check``; no install, the
machine's own JAX with the CUDA plugin):

1. ``tests``: the Pallas tile tests with the GPU (Triton) kernels compiled, not interpreted,
   and the in-place Fenwick-block kernels (``RT_PALLAS_COMPILED=1 pytest tests/test_pallas_tiles.py
   tests/test_pallas_fenwick_gpu.py -k "gpu and not tpu and not mesh"``; recorded as
   not run if pytest is not installed), plus two compiled checks that need no pytest: the RT layer
   with ``impl="pallas"`` against ``impl="tiled"`` and the Transformer layer with
   ``attention="flash"`` (cuDNN) against ``attention="xla"``, forward and all gradients.
2. ``layers``: one layer forward+backward in bf16 (B=16, D=1024, 16 heads of 64, F=4096) at N=512
   and N=2048: RT (tiled, pallas) against the Transformer (flash; xla beside it), compiled first,
   then timed interleaved; medians.
3. ``train``: the paper-150m train step (RT-12L and transformer-12L, 512 x 512 tokens) on one GPU,
   with the fewest microbatches whose compiled memory fits the device; tokens/s over a few steps.

Writes ``results/gpu_check.{json,md}`` (after every phase) with the command, commit and machine.
Exits with a clear message if no GPU is visible. ``--dry-run`` runs the same code on CPU at tiny
shapes (Pallas kernels in interpret mode) to check the logic; it never claims GPU numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PHASES = ("tests", "layers", "train")
LAYER_IMPLS = ("rt-tiled", "rt-pallas", "transformer-flash", "transformer-xla")
GIB = 1024**3
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (checked here, before JAX starts)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="results")
    ap.add_argument("--name", default="gpu_check", help="output file stem")
    ap.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}"
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the logic only")
    ap.add_argument("--batch", type=int, default=16, help="layer timings: sequences")
    ap.add_argument("--seq-lens", default="512,2048", help="layer timings: comma-separated N")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=4096)
    ap.add_argument("--impls", default=",".join(LAYER_IMPLS), help=f"subset of {LAYER_IMPLS}")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per layer")
    ap.add_argument("--preset", default="paper-150m")
    ap.add_argument("--points", default=None, help="default transformer-12L,recurrent-12L")
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--max-microbatches", type=int, default=64)
    ap.add_argument("--memory-fraction", type=float, default=0.9, help="of the device's memory")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what starts after this")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    args.impls = [p for p in args.impls.split(",") if p]
    for name, values, allowed in (
        ("phases", args.phases, PHASES),
        ("impls", args.impls, LAYER_IMPLS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {allowed}")
    try:
        args.seq_lens = [int(n) for n in args.seq_lens.split(",") if n]
    except ValueError:
        ap.error(f"--seq-lens must be comma-separated ints, got {args.seq_lens!r}")
    positive = {"batch": args.batch, "d_model": args.d_model, "heads": args.heads,
                "mlp": args.mlp, "reps": args.reps, "train_steps": args.train_steps}  # fmt: skip
    for name, value in positive.items():
        if value <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.seq_lens or min(args.seq_lens) <= 0:
        ap.error("--seq-lens must be positive")
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if args.dry_run:  # tiny shapes on CPU; the paper preset would take hours here
        args.batch, args.seq_lens, args.d_model, args.heads, args.mlp = 2, [16], 32, 2, 64
        args.preset, args.reps, args.train_steps = "tiny", 2, 1
        args.points = args.points or "transformer-2L,recurrent-2L"
    args.points = [p for p in (args.points or "transformer-12L,recurrent-12L").split(",") if p]
    return args


def require_gpu(dry_run: bool) -> list[Any]:
    """The visible GPUs; SystemExit with what to do when there are none (unless a dry run)."""
    import jax

    if dry_run:
        return jax.devices()
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        platforms = sorted({d.platform for d in jax.devices()})
        raise SystemExit(
            f"gpu-check needs a visible CUDA GPU, but JAX sees only {platforms} "
            f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}): run it on a GPU machine whose "
            "jax has the CUDA plugin, or pass --dry-run to check the script's logic on CPU"
        )
    return gpus


# --------------------------------------------------------------------------------------------
# 1. Compiled kernel checks.


def run_pallas_tests(timeout_s: float) -> dict[str, Any]:
    """The GPU Pallas tile tests, compiled (RT_PALLAS_COMPILED=1), in a pytest subprocess."""
    if importlib.util.find_spec("pytest") is None:
        return {"name": "pallas tile tests (compiled)", "status": "not run",
                "detail": "pytest is not installed on this machine"}  # fmt: skip
    # "not mesh": the sharded in-place test needs 8 devices (fake CPU ones under make test).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_pallas_tiles.py", "tests/test_pallas_fenwick_gpu.py",
           "-k", "gpu and not tpu and not mesh"]  # fmt: skip
    env = {**os.environ, "RT_PALLAS_COMPILED": "1", "JAX_PLATFORMS": ""}  # conftest defaults to cpu
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"name": "pallas tile tests (compiled)", "status": "failed",
                "detail": f"timed out after {timeout_s:.0f} s", "command": shlex.join(cmd)}  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {
        "name": "pallas tile tests (compiled)",
        "status": "passed" if proc.returncode == 0 else "failed",
        "detail": summary,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "RT_PALLAS_COMPILED=1 " + shlex.join(cmd),
        "output_tail": None if proc.returncode == 0 else (proc.stdout + proc.stderr)[-3000:],
    }


def _max_rel_err(a: Any, b: Any) -> float:
    import jax
    import numpy as np

    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        errs.append(float(np.max(np.abs(x - y))) / (float(np.max(np.abs(y))) + 1e-6))
    return max(errs)


def _layer_setup(cfg: Any, batch: int, n: int, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """One layer's parameters, an input x (float32 residual) and a cotangent for sum(z * c)."""
    import jax

    from rt_jax.models.lm import init_params

    params = jax.tree.map(lambda p: p[0], init_params(cfg, jax.random.key(seed))["blocks"])
    kx, kc = jax.random.split(jax.random.key(seed + 1))
    x = jax.random.normal(kx, (batch, n, cfg.d_model))
    c = jax.random.normal(kc, (batch, n, cfg.d_model))
    return params, x, c, cfg.attention_spec()


def _fwd_bwd(cfg: Any) -> Any:
    """jit of (params, x, c) -> (z, d sum(z*c) / d(params, x)) for cfg's layer."""
    import jax

    from rt_jax.models.lm import layer_function

    layer, spec = layer_function(cfg), cfg.attention_spec()

    def run(params: Any, x: Any, c: Any) -> Any:
        z, vjp = jax.vjp(lambda p, x: layer(p, x, spec), params, x)
        return z, vjp(c.astype(z.dtype))

    return jax.jit(run)


def compiled_check(name: str, test_cfg: Any, ref_cfg: Any, batch: int, n: int, tol: float) -> dict:
    """Forward and all gradients of ``test_cfg``'s layer against ``ref_cfg``'s (same params)."""
    t0 = time.perf_counter()
    try:
        params, x, c, _ = _layer_setup(ref_cfg, batch, n)
        got = _fwd_bwd(test_cfg)(params, x, c)
        want = _fwd_bwd(ref_cfg)(params, x, c)
        err = _max_rel_err(got, want)
        status, detail = (
            ("passed" if err <= tol else "failed"),
            f"max rel err {err:.2e} (tol {tol:g})",
        )
    except Exception as e:  # a kernel that does not compile is a result, not a crash
        status, detail = "failed", f"{type(e).__name__}: {str(e)[:800]}"
    return {"name": name, "status": status, "detail": detail,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def kernel_checks(dry_run: bool) -> list[dict[str, Any]]:
    """The compiled checks that need no pytest (see the module docstring)."""
    from rt_jax.config import ModelConfig

    rt = ModelConfig(d_model=64, n_heads=4, n_layers=1, block_type="recurrent", impl="tiled",
                     leaf_size=16)  # fmt: skip
    tf = ModelConfig(d_model=128, n_heads=2, n_layers=1, block_type="transformer",
                     compute_dtype="bfloat16")  # fmt: skip
    out = []
    if dry_run:
        out.append({"name": "rt layer impl=pallas vs tiled", "status": "not run",
                    "detail": "dry run (interpreted kernels are tested by make test)"})  # fmt: skip
    else:
        pallas = dataclasses.replace(rt, impl="pallas")
        out.append(compiled_check("rt layer impl=pallas vs tiled (float32, N=96)", pallas, rt, 2, 96,
                                  1e-4))  # fmt: skip
    flash = dataclasses.replace(tf, attention="flash", interpret=dry_run)
    out.append(compiled_check("transformer layer attention=flash vs xla (bf16, N=96)", flash, tf, 2,
                              96, 3e-2))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# 2. Layer timings.


def layer_config(impl: str, args: argparse.Namespace) -> Any:
    """The one-layer ModelConfig of a LAYER_IMPLS entry, bf16."""
    from rt_jax.config import ModelConfig

    base = ModelConfig(d_model=args.d_model, n_heads=args.heads, mlp_hidden=args.mlp, n_layers=1,
                       compute_dtype="bfloat16", leaf_size=32)  # fmt: skip
    block, variant = impl.split("-")
    if block == "rt":
        return dataclasses.replace(base, block_type="recurrent", impl=variant,
                                   interpret=args.dry_run and variant == "pallas")  # fmt: skip
    return dataclasses.replace(base, block_type="transformer", attention=variant,
                               interpret=args.dry_run and variant == "flash")  # fmt: skip


def time_layers(args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    """Compile every (impl, N) layer fwd+bwd, then time them interleaved; one row per pair."""
    import jax

    rows = []
    for n in args.seq_lens:
        ready = []
        for impl in args.impls:
            row: dict[str, Any] = {"impl": impl, "batch": args.batch, "seq_len": n,
                                   "d_model": args.d_model, "heads": args.heads, "mlp": args.mlp}  # fmt: skip
            rows.append(row)
            if time.perf_counter() > deadline:
                row["error"] = "skipped: out of the time budget"
                continue
            cfg = layer_config(impl, args)
            try:
                params, x, c, _ = _layer_setup(cfg, args.batch, n)
                t0 = time.perf_counter()
                compiled = _fwd_bwd(cfg).lower(params, x, c).compile()
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                mem = compiled.memory_analysis()
                row["temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else None
                jax.block_until_ready(compiled(params, x, c))  # warm-up
                ready.append((row, compiled, (params, x, c)))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:800]}"
        times: dict[int, list[float]] = {id(r): [] for r, _, _ in ready}
        for _ in range(args.reps):
            for row, compiled, inputs in ready:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                times[id(row)].append(time.perf_counter() - t0)
        for row, _, _ in ready:
            row["fwdbwd_ms"] = round(1e3 * statistics.median(times[id(row)]), 3)
            row["reps"] = args.reps
        base = next((r for r in rows if r["seq_len"] == n and r["impl"] == "transformer-flash"
                     and "fwdbwd_ms" in r), None)  # fmt: skip
        for row in rows:
            if row["seq_len"] == n and base is not None and "fwdbwd_ms" in row:
                row["vs_transformer_flash"] = round(row["fwdbwd_ms"] / base["fwdbwd_ms"], 3)
    return rows


# --------------------------------------------------------------------------------------------
# 3. Train-step throughput.


def _device_memory(device: Any) -> int | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def fit_microbatches(
    start: int, upper: int, cap: float | None, compile_at: Any, deadline: float
) -> tuple[tuple[int, Any, Any] | None, list[dict[str, Any]]]:
    """The fewest microbatches (start, 2 start, ... <= upper) whose program compiles within
    ``cap`` bytes (None = no limit known): ((micro, compiled, step) or None, what was tried).
    ``compile_at(micro)`` returns (compiled or None, step, info with total_bytes or error)."""
    tried: list[dict[str, Any]] = []
    micro = start
    while micro <= upper and time.perf_counter() <= deadline:
        compiled, step, info = compile_at(micro)
        tried.append({"microbatches": micro, **info})
        if compiled is not None and (cap is None or info["total_bytes"] <= cap):
            return (micro, compiled, step), tried
        micro *= 2
    return None, tried


def time_train_step(args: argparse.Namespace, point: str, device: Any, deadline: float) -> dict:
    """Tokens/s of one preset point's train step on one device, at the fewest microbatches
    (from the preset's, doubling) whose compiled memory fits ``memory_fraction`` of the device."""
    from rt_jax.train.config import apply_overrides, get_preset, with_point
    from rt_jax.train.sharding import make_mesh
    from rt_jax.train.step import build_train_step

    base = get_preset(args.preset)
    points = {p.name: p for p in base.compare}
    row: dict[str, Any] = {"preset": args.preset, "point": point}
    if point not in points:
        row["error"] = f"preset {args.preset} has no point {point!r}: {sorted(points)}"
        return row
    cfg = with_point(base, points[point], base.seeds[0])
    if args.dry_run and cfg.model.attention == "flash":
        cfg = apply_overrides(cfg, ["model.interpret=true"])
    limit = _device_memory(device)
    row.update(block_type=cfg.model.block_type, impl=cfg.model.impl, attention=cfg.model.attention,
               layers=cfg.model.n_layers, batch_size=cfg.data.batch_size,
               seq_len=cfg.data.seq_len, device_memory_bytes=limit)  # fmt: skip

    def compile_at(micro: int) -> tuple[Any, Any, dict[str, Any]]:
        cfg_m = apply_overrides(cfg, [f"microbatches={micro}"])
        step = build_train_step(cfg_m, make_mesh(cfg_m.mesh, [device]))
        t0 = time.perf_counter()
        try:
            compiled = step.step.lower(step.abstract_state, step.batch_spec).compile()
        except Exception as e:  # e.g. out of memory at compile time: try more microbatches
            return None, step, {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        mem = compiled.memory_analysis()
        total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)  # fmt: skip
        return (
            compiled,
            step,
            {"total_bytes": total, "compile_s": round(time.perf_counter() - t0, 1)},
        )

    cap = None if limit is None else args.memory_fraction * limit
    upper = min(args.max_microbatches, cfg.data.batch_size)
    found, tried = fit_microbatches(cfg.microbatches, upper, cap, compile_at, deadline)
    row["tried"] = tried
    if found is None:
        row["error"] = f"no microbatching up to {tried[-1]['microbatches'] if tried else '-'} fits"
        if time.perf_counter() > deadline:
            row["error"] += " (stopped: out of the time budget)"
        return row
    micro, compiled, step = found
    total, compile_s = tried[-1]["total_bytes"], tried[-1]["compile_s"]
    row.update(microbatches=micro, total_bytes=total, compile_s=compile_s)
    try:
        row.update(_run_steps(compiled, step, cfg, args.train_steps))
    except Exception as e:  # e.g. out of memory at run time despite the compiled estimate
        row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    return row


def _run_steps(compiled: Any, step: Any, cfg: Any, steps: int) -> dict[str, Any]:
    """One warm-up step, then ``steps`` timed steps on fixed random tokens."""
    import jax
    import numpy as np

    state = step.init()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(cfg.data.batch_size, cfg.data.seq_len + 1))
    batch = {"tokens": jax.device_put(tokens.astype(np.int32), step.batch_sharding["tokens"])}
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    return {"steps": steps, "step_s": round(elapsed / steps, 4),
            "tokens_per_s": round(tokens_per_step * steps / elapsed, 1),
            "loss": float(metrics["loss"])}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Results.


def markdown(payload: dict[str, Any]) -> str:
    """The results page."""
    lines = [
        "# GPU check"
        + (" (DRY RUN on CPU: tiny shapes, no GPU numbers)" if payload["dry_run"] else ""),
        "",
        f"Command: `{payload['command']}`  ",
        f"Commit: `{payload['commit']}`; machine: {payload['machine']}.",
        "",
        "## Compiled kernel checks",
        "",
        "| check | status | detail | s |",
        "|---|---|---|---|",
    ]
    for t in payload["tests"]:
        detail = str(t.get("detail", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {t['name']} | {t['status']} | {detail} | {t.get('seconds', '')} |")
    lines += [
        "",
        "## One layer forward+backward, bf16 (median of interleaved repetitions)",
        "",
        "| impl | B | N | D | heads | F | fwd+bwd (ms) | / transformer-flash | compile (s) | temps (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["layers"]:
        if "error" in r:
            ratio = comp = temp = "—"
            ms = f"error: {r['error'][:120]}".replace("|", "/")
        else:
            ms, ratio = (
                f"{r['fwdbwd_ms']:.2f}",
                f"{r.get('vs_transformer_flash', float('nan')):.2f}",
            )
            comp = f"{r['compile_s']:.1f}"
            temp = "—" if r.get("temp_bytes") is None else f"{r['temp_bytes'] / GIB:.2f}"
        lines.append(f"| {r['impl']} | {r['batch']} | {r['seq_len']} | {r['d_model']} | "
                     f"{r['heads']} | {r['mlp']} | {ms} | {ratio} | {comp} | {temp} |")  # fmt: skip
    lines += [
        "",
        "## Train step on one device (synthetic tokens)",
        "",
        "| preset | point | attention | batch x len / micro | memory (GiB) | step (s) | tokens/s | compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["train"]:
        if "error" in r:
            err = r["error"][:160].replace("|", "/")
            lines.append(f"| {r['preset']} | {r['point']} | {r.get('attention', '')} | "
                         f"error: {err} | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {r['preset']} | {r['point']} | {r['attention']} | {r['batch_size']} x "
            f"{r['seq_len']} / {r['microbatches']} | {r['total_bytes'] / GIB:.1f} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.0f} |"
        )
    lines += ["", f"Total time: {payload['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def write(payload: dict[str, Any], out_dir: Path, name: str) -> None:
    """Write ``name``.json and ``name``.md (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in (
        (".json", json.dumps(payload, indent=2) + "\n"),
        (".md", markdown(payload)),
    ):
        path = out_dir / f"{name}{suffix}"
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases, writing the results after each; returns the payload."""
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    devices = require_gpu(args.dry_run)
    import jax

    from experiments.provenance import git_commit, machine

    argv_s = sys.argv[1:] if argv is None else argv
    payload: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "experiments.gpu_check", *argv_s]),
        "commit": git_commit(),
        "machine": machine(),
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "tests": [],
        "layers": [],
        "train": [],
        "elapsed_s": 0.0,
    }
    out_dir = Path(args.out_dir)

    def flush() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - start, 1)
        write(payload, out_dir, args.name)

    if "tests" in args.phases:
        if args.dry_run:
            payload["tests"].append({"name": "pallas tile tests (compiled)", "status": "not run",
                                     "detail": "dry run"})  # fmt: skip
        else:
            payload["tests"].append(
                run_pallas_tests(timeout_s=max(30.0, deadline - time.perf_counter()))
            )
        payload["tests"] += kernel_checks(args.dry_run)
        flush()
    if "layers" in args.phases:
        payload["layers"] = time_layers(args, deadline)
        flush()
    if "train" in args.phases:
        for point in args.points:
            payload["train"].append(time_train_step(args, point, devices[0], deadline))
            flush()
    flush()
    failed = [t["name"] for t in payload["tests"] if t["status"] == "failed"]
    print(markdown(payload))
    if failed:
        print(f"gpu-check: FAILED checks: {failed}", file=sys.stderr)
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
