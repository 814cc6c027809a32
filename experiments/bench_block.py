"""One Recurrent Transformer layer (reference / tiled) against one Transformer layer, side by side.

Full run (the numbers in results/bench_block.{json,md}):

    JAX_PLATFORMS=cpu python -m experiments.bench_block --seq-lens 128 256 512 1024 2048 4096 \
        --batch 16 --d-model 256 --heads 4 --mlp 1024 --out results/bench_block.json

Memory growth only (compiles, no timing):

    JAX_PLATFORMS=cpu python -m experiments.bench_block --seq-lens 1024 2048 4096 8192 \
        --impls tiled transformer --memory-only --out results/bench_block_memory.json

For every N, all implementations are compiled first (``compile_s`` = seconds to compile the jitted
forward+backward; ``temp_bytes`` = XLA ``memory_analysis()`` temporary bytes of that program), then
timed interleaved (impl after impl, repetition after repetition) and the medians are reported.
Forward+backward = gradient of sum(z * c) w.r.t. the layer parameters and its input, for a fixed
random cotangent c. The reference's plain-autodiff backward stores its whole K/V buffer at every
step (O(N^2) memory); above ``--max-temp-gb`` it is compiled and its ``temp_bytes`` reported, but
it is not run (``fwdbwd_ms`` null).

The platform comes from the environment (``JAX_PLATFORMS``; set ``JAX_PLATFORMS=cpu`` for the
CPU numbers above). On an accelerator, for example:

    python -m experiments.bench_block --impls tiled pallas transformer --dtype bfloat16 \
        --batch 1 8 32 --seq-lens 1024 4096 --out results/bench_block_gpu.json

``--dtype`` is the matmul compute dtype (parameters and the residual stream stay float32, as in
training); ``pallas`` is the tiled layer with the Pallas tile kernels (``--interpret`` runs them
in interpret mode, the only way on CPU); ``--batch`` takes several sizes (a sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rt_jax.config import ModelConfig
from rt_jax.models.lm import init_params
from rt_jax.ops.reference import recurrent_layer_reference
from rt_jax.ops.tiled import recurrent_layer_tiled
from rt_jax.ops.transformer import transformer_layer

IMPLS = ("reference", "tiled", "pallas", "transformer")
DEFAULT_IMPLS = ("reference", "tiled", "transformer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="one or more batch sizes")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="matmul dtype"
    )
    ap.add_argument(
        "--interpret", action="store_true", help="run the pallas impl in interpret mode (CPU)"
    )
    ap.add_argument("--memory-only", action="store_true", help="compile and report temp_bytes only")
    ap.add_argument("--out", default="results/bench_block.json")
    ap.add_argument("--leaf-size", type=int, default=32, help="leaf size of the tiled layer")
    ap.add_argument("--position", default="alibi", choices=("alibi", "rope", "none"))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    ap.add_argument(
        "--reference-work-limit",
        type=float,
        default=2.0e5,
        help="reference repetitions: at most max(1, limit / (batch * N^2 / 1024))",
    )
    ap.add_argument("--max-temp-gb", type=float, default=6.0, help="skip running above this")
    args = ap.parse_args(argv)
    for n in args.seq_lens + args.batch:
        if n <= 0:
            ap.error(f"--seq-lens and --batch must be positive, got {n}")
    if args.d_model % args.heads:
        ap.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    if "pallas" in args.impls:
        try:
            layer_fn("pallas", args.leaf_size, args.interpret)
        except ValueError as err:
            ap.error(f"--impls pallas: {err}")
    return args


def layer_fn(impl: str, leaf_size: int, interpret: bool = False) -> Callable:
    """The pure layer function (params, x, spec) -> z of an implementation.

    ``pallas`` raises ValueError where its kernels cannot run (on CPU without ``interpret``).
    """
    if impl == "reference":
        return recurrent_layer_reference
    if impl == "tiled":
        return lambda p, x, s: recurrent_layer_tiled(p, x, s, leaf_size=leaf_size)
    if impl == "pallas":
        from rt_jax.ops.pallas_tiles import pallas_tile_ops

        ops = pallas_tile_ops(interpret=interpret)
        return lambda p, x, s: recurrent_layer_tiled(p, x, s, leaf_size=leaf_size, tile_ops=ops)
    return transformer_layer


def _time_ms(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def bench_seq_len(args: argparse.Namespace, n: int, batch: int) -> list[dict]:
    """Compile, measure memory and (unless --memory-only) time every implementation at one
    (batch, N)."""
    config = ModelConfig(
        d_model=args.d_model,
        n_heads=args.heads,
        mlp_hidden=args.mlp,
        n_layers=1,
        position=args.position,
        compute_dtype=args.dtype,
    )
    spec = config.attention_spec()
    params = jax.tree.map(lambda a: a[0], init_params(config, jax.random.PRNGKey(0))["blocks"])
    kx, kc = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (batch, n, args.d_model), jnp.float32)
    cot = jax.random.normal(kc, x.shape, jnp.float32)

    compiled = {}
    records = {}
    for impl in args.impls:
        fn = layer_fn(impl, args.leaf_size, args.interpret)
        fwd = jax.jit(lambda p, x, fn=fn: fn(p, x, spec))
        fwdbwd = jax.jit(
            jax.grad(lambda p, x, fn=fn: jnp.sum(fn(p, x, spec) * cot), argnums=(0, 1))
        )
        t0 = time.perf_counter()
        fwdbwd_c = fwdbwd.lower(params, x).compile()
        compile_s = time.perf_counter() - t0
        temp = int(fwdbwd_c.memory_analysis().temp_size_in_bytes)
        records[impl] = {
            "impl": impl,
            "seq_len": n,
            "batch": batch,
            "d_model": args.d_model,
            "fwd_ms": None,
            "fwdbwd_ms": None,
            "temp_bytes": temp,
            "compile_s": round(compile_s, 3),
        }
        if not args.memory_only:
            compiled[impl] = (fwd.lower(params, x).compile(), fwdbwd_c, temp)
        if args.dtype != "float32":
            records[impl]["dtype"] = args.dtype
        print(
            f"  B={batch} N={n} {impl}: compiled fwd+bwd in {compile_s:.1f}s, temp {temp / 2**20:.1f} MiB"
        )

    if args.memory_only:
        return list(records.values())

    runnable = {k: v for k, v in compiled.items() if v[2] <= args.max_temp_gb * 2**30}
    times = {impl: {"fwd": [], "fwdbwd": []} for impl in runnable}
    for fwd_c, fwdbwd_c, _ in runnable.values():  # warm-up
        jax.block_until_ready(fwd_c(params, x))
        jax.block_until_ready(fwdbwd_c(params, x))
    ref_reps = max(1, int(args.reference_work_limit / (batch * n * n / 1024)))
    for rep in range(args.reps):
        for impl, (fwd_c, fwdbwd_c, _) in runnable.items():
            if impl == "reference" and rep >= min(ref_reps, args.reps):
                continue
            times[impl]["fwd"].append(_time_ms(fwd_c, params, x))
            times[impl]["fwdbwd"].append(_time_ms(fwdbwd_c, params, x))
    for impl, t in times.items():
        records[impl]["fwd_ms"] = round(statistics.median(t["fwd"]), 3)
        records[impl]["fwdbwd_ms"] = round(statistics.median(t["fwdbwd"]), 3)
    for impl in compiled.keys() - runnable.keys():  # too much memory for the backward: fwd only
        fwd_c = compiled[impl][0]
        fwd_temp = fwd_c.memory_analysis().temp_size_in_bytes
        if fwd_temp > args.max_temp_gb * 2**30:
            print(f"  N={n} {impl}: not run (forward temp {fwd_temp / 2**30:.1f} GiB)")
            continue
        jax.block_until_ready(fwd_c(params, x))
        records[impl]["fwd_ms"] = round(_time_ms(fwd_c, params, x), 3)
    return list(records.values())


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def summary_tables(records: list[dict]) -> tuple[str, str]:
    """(plain-text table, Markdown tables) of one batch size's records with the ratios."""
    rows = [["N", "impl", "fwd ms", "fwd+bwd ms", "temp MiB", "compile s"]]
    for r in records:
        rows.append(
            [
                str(r["seq_len"]),
                r["impl"],
                _fmt(r["fwd_ms"]),
                _fmt(r["fwdbwd_ms"]),
                _fmt(r["temp_bytes"], 2**-20),
                _fmt(r["compile_s"]),
            ]
        )
    by = {(r["seq_len"], r["impl"]): r for r in records}
    pallas = any(r["impl"] == "pallas" for r in records)
    ratio_rows = [
        ["N", "tiled/transf fwd", "tiled/transf fwd+bwd", "ref/tiled fwd", "ref/tiled fwd+bwd"]
        + (["pallas/tiled fwd", "pallas/tiled fwd+bwd"] if pallas else [])
    ]
    for n in sorted({r["seq_len"] for r in records}):
        t, tr, ref, pl = (
            by.get((n, "tiled"), {}),
            by.get((n, "transformer"), {}),
            by.get((n, "reference"), {}),
            by.get((n, "pallas"), {}),
        )
        ratio_rows.append(
            [
                str(n),
                _ratio(t.get("fwd_ms"), tr.get("fwd_ms")),
                _ratio(t.get("fwdbwd_ms"), tr.get("fwdbwd_ms")),
                _ratio(ref.get("fwd_ms"), t.get("fwd_ms")),
                _ratio(ref.get("fwdbwd_ms"), t.get("fwdbwd_ms")),
            ]
            + (
                [
                    _ratio(pl.get("fwd_ms"), t.get("fwd_ms")),
                    _ratio(pl.get("fwdbwd_ms"), t.get("fwdbwd_ms")),
                ]
                if pallas
                else []
            )
        )
    mem_rows = [["N", "tiled temp growth", "transformer temp growth"]]
    ns = sorted({r["seq_len"] for r in records})
    for a, b in zip(ns, ns[1:], strict=False):
        if b == 2 * a:
            mem_rows.append(
                [
                    f"{a}->{b}",
                    *(
                        _ratio(
                            by.get((b, i), {}).get("temp_bytes"),
                            by.get((a, i), {}).get("temp_bytes"),
                        )
                        for i in ("tiled", "transformer")
                    ),
                ]
            )

    def text(tab):
        widths = [max(len(row[c]) for row in tab) for c in range(len(tab[0]))]
        return "\n".join(
            "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in tab
        )

    def md(tab):
        out = ["| " + " | ".join(tab[0]) + " |", "|" + "---|" * len(tab[0])]
        out += ["| " + " | ".join(row) + " |" for row in tab[1:]]
        return "\n".join(out)

    timed = any(r["fwd_ms"] is not None for r in records)
    tabs = [rows] + ([ratio_rows] if timed else []) + ([mem_rows] if len(mem_rows) > 1 else [])
    return "\n\n".join(text(t) for t in tabs), "\n\n".join(md(t) for t in tabs)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables, write JSON and Markdown."""
    args = parse_args(argv)
    records = []
    for batch in args.batch:
        for n in args.seq_lens:
            records.extend(bench_seq_len(args, n, batch))
    if len(args.batch) == 1:
        text, md = summary_tables(records)
    else:  # a batch sweep: one set of tables per batch size
        parts = [summary_tables([r for r in records if r["batch"] == b]) for b in args.batch]
        text = "\n\n".join(f"batch {b}\n{t}" for b, (t, _) in zip(args.batch, parts, strict=True))
        md = "\n\n".join(
            f"## Batch {b}\n\n{m}" for b, (_, m) in zip(args.batch, parts, strict=True)
        )
    print(text)
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    command = "python -m experiments.bench_block " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    md_path = os.path.splitext(args.out)[0] + ".md"
    dtype_note = f", compute dtype {args.dtype}" if args.dtype != "float32" else ""
    if "pallas" in args.impls:
        dtype_note += f", pallas {'interpret' if args.interpret else 'compiled'}"
    with open(md_path, "w") as f:
        f.write(
            f"# One RT layer vs one Transformer layer\n\nCommand: `{command}`\n\n"
            f"jax {jax.__version__}, backend {jax.default_backend()} "
            f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores, "
            f"leaf_size {args.leaf_size}, position {args.position}, heads {args.heads}, "
            f"mlp {args.mlp}{dtype_note}. Times are medians (ms) of interleaved runs; temp = XLA temporary "
            f"bytes of the jitted forward+backward; compile = seconds to compile it.\n\n{md}\n"
        )
    print(f"wrote {args.out} and {md_path}")


if __name__ == "__main__":
    main()
