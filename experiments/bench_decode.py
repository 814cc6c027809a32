"""Decoding benchmark: KV-cache size, prefill time and per-token decode latency, RT vs Transformer.

    JAX_PLATFORMS=cpu python -m experiments.bench_decode --out results/bench_decode.json
    JAX_PLATFORMS=cpu python -m experiments.bench_decode --groups cpu-lrt   # LRT part only

Random weights, float32, greedy decoding, side by side in one process (interleaved repetitions,
medians). Two groups of models at matched non-embedding parameters, each with both block types:

* ``cpu-full``: the compare points of the training preset ``cpu-full`` (its vocabulary).
* ``paper-12v6``: the paper's 300M 12-layer x 1408 vs 6-layer x 2048 pair (MLP 4 D) with widths
  divided by ``--paper-scale`` (default 8: 12L x 176 / 11 heads vs 6L x 256 / 16 heads, head
  dim 16, MLP 704 / 1024), byte vocabulary (257, padded to 264) so the blocks dominate.
* ``cpu-lrt`` (issue 7): the Transformer and the two LRT models of the ``cpu-lrt`` preset, same
  shape (4L x 128). LRT prefill is the exact recurrence (token by token); a decode step carries
  one extra d-vector per row. The LRT/Transformer per-token latency ratio is reported beside the
  paper's ~9% overhead. ``--groups cpu-lrt`` alone writes ``results/bench_decode_lrt.{json,md}``
  unless ``--out`` is given, so the other groups' results are kept. LRT and the Transformer decode
  through the same ``rt_jax.ops.decode.decode_layer`` (issue 14), so the ratio measures the
  memory pathway alone. ``--lrt-train-steps N`` first trains each cpu-lrt model N steps with the
  preset's recipe (weights loaded from the run directories under ``--runs-dir``; resumable)
  instead of timing random weights; the group also times ``lrt-shared-4L-parallel-prefill``, the
  same trained LRT with the APPROXIMATE parallel prefill (``memory.prefill=parallel``) beside
  the exact token-by-token one.

For each model and batch size (default 1 and 16): ``prefill_ms`` is the time of one jitted prefill
of ``--prompt-len`` tokens per row (RT layers run ``--rt-impl``, default the tiled forward; the
persistent K/V come from each layer's outputs); ``decode_ms_per_token`` is the median over
``--reps`` repetitions of (time of a jitted loop of ``--decode-tokens`` greedy decode steps) /
steps, each step moving the whole batch by one token (cache of prompt + decode tokens, updated in
place); ``tokens_per_s = batch * 1000 / decode_ms_per_token``. Writes ``--out`` (JSON) and the same
name with ``.md``, and prints the table and the targets of issue 5: RT step <= 1.2x the
Transformer step of the same shape; 6-layer RT per-token latency and KV cache below the 12-layer
Transformer's (cache ratio 2*6*W6 / (2*12*W12)).

The platform comes from the environment (``JAX_PLATFORMS``; the committed CPU results were run
with ``JAX_PLATFORMS=cpu``). ``--dtype bfloat16`` sets every model's compute dtype (and the KV
cache's); ``--impl pallas`` (alias of ``--rt-impl``) prefills RT layers with the Pallas tile
kernels, ``--interpret`` runs them in interpret mode (the only way on CPU); ``--batches`` is the
batch sweep. On an accelerator, for example:

    python -m experiments.bench_decode --dtype bfloat16 --impl pallas --batches 1 8 64 \
        --out results/bench_decode_gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rt_jax.config import ModelConfig
from rt_jax.decoding import greedy_decode, kv_bytes_per_token, prefill
from rt_jax.models.lm import init_params, layer_function

RECORD_KEYS = (
    "model",
    "layers",
    "width",
    "batch",
    "kv_bytes_per_token",
    "prefill_ms",
    "decode_ms_per_token",
    "tokens_per_s",
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One benchmarked model: its group (a parameter-matched comparison), config and weights
    (None: random, from ``init_params``)."""

    group: str
    name: str
    config: ModelConfig
    params: Any = None


def cpu_full_entries(rt_impl: str) -> list[Entry]:
    """The compare points of the ``cpu-full`` training preset."""
    from rt_jax.train.config import get_preset, with_point

    preset = get_preset("cpu-full")
    out = []
    for point in preset.compare:
        model = with_point(preset, point, 0).model
        impl = rt_impl if point.block_type == "recurrent" else model.impl
        model = dataclasses.replace(model, impl=impl, compute_dtype="float32", remat=False)
        out.append(Entry("cpu-full", point.name, model))
    return out


def lrt_entries() -> list[Entry]:
    """The Transformer and LRT points of the ``cpu-lrt`` training preset (same shape)."""
    from rt_jax.train.config import get_preset, with_point

    preset = get_preset("cpu-lrt")
    out = []
    for point in preset.compare:
        model = with_point(preset, point, 0).model
        if model.block_type != "transformer":
            continue
        model = dataclasses.replace(model, compute_dtype="float32", remat=False)
        out.append(Entry("cpu-lrt", point.name, model))
    shared = next(e for e in out if e.config.memory.kind == "shared")
    memory = dataclasses.replace(shared.config.memory, prefill="parallel")
    approx = dataclasses.replace(shared.config, memory=memory)
    out.append(Entry("cpu-lrt", f"{shared.name}-parallel-prefill", approx))
    return out


def train_lrt_entries(entries: list[Entry], steps: int, runs_dir: str) -> list[Entry]:
    """The cpu-lrt entries with weights trained ``steps`` steps by the cpu-lrt preset's recipe
    (one run per distinct model, seed 0, in ``runs_dir``/<point>; resumed if present)."""
    from rt_jax.train.checkpoint import load_model
    from rt_jax.train.config import get_preset, with_point
    from rt_jax.train.loop import train

    preset = get_preset("cpu-lrt")
    points = {p.name: p for p in preset.compare}
    trained: dict[str, Any] = {}
    out = []
    for e in entries:
        point_name = e.name.removesuffix("-parallel-prefill")
        if point_name not in trained:
            cfg = dataclasses.replace(
                with_point(preset, points[point_name], 0),
                steps=steps,
                eval_points=1,
                eval_batches=4,
                checkpoint_every=steps,
            )
            run = pathlib.Path(runs_dir) / point_name
            result = train(cfg, run, progress=False)
            print(json.dumps({"trained": point_name, "steps": steps, "val_ce": result["val_ce"]}))
            model, _ = load_model(run)
            trained[point_name] = (model.params(), result["val_ce"])
        out.append(dataclasses.replace(e, params=trained[point_name][0]))
    return out


def lrt_overheads(
    entries: list[Entry], records: list[dict], samples: dict[tuple[str, int], dict]
) -> list[dict]:
    """Per-token decode latency of each LRT model over the same-shape Transformer, per batch."""
    cfg = {e.name: e.config for e in entries}
    base = {(c.n_layers, c.d_model): n for n, c in cfg.items() if c.family == "standard"}
    wall = {(r["model"], r["batch"]): r["decode_ms_per_token"] for r in records}
    out = []
    for name, c in cfg.items():
        t = base.get((c.n_layers, c.d_model))
        if c.family != "lrt" or t is None:
            continue
        for batch in sorted({r["batch"] for r in records}):
            cpu_lrt = statistics.median(samples[(name, batch)]["decode_cpu_ms_per_token"])
            cpu_t = statistics.median(samples[(t, batch)]["decode_cpu_ms_per_token"])
            out.append(
                {
                    "group": "cpu-lrt",
                    "batch": batch,
                    "target": f"{name} per-token latency / {t} (paper: ~1.09)",
                    "value": round(wall[(name, batch)] / max(wall[(t, batch)], 1e-9), 3),
                    "value_cpu": round(cpu_lrt / max(cpu_t, 1e-9), 3),
                    "met": None,
                }
            )
    return out


def paper_entries(scale: int, rt_impl: str) -> list[Entry]:
    """The paper's 12L x 1408 vs 6L x 2048 pair, widths divided by ``scale``, head dim 16."""
    out = []
    for layers, width in ((12, 1408 // scale), (6, 2048 // scale)):
        if width % 16:
            raise ValueError(f"--paper-scale {scale} gives width {width}, not a multiple of 16")
        for block_type in ("transformer", "recurrent"):
            cfg = ModelConfig(
                vocab_size=257,
                embedding_size=264,
                d_model=width,
                n_heads=width // 16,
                n_layers=layers,
                mlp_hidden=4 * width,
                block_type=block_type,
                impl=rt_impl if block_type == "recurrent" else "tiled",
                position="alibi",
            )
            out.append(Entry("paper-12v6", f"{block_type}-{layers}L", cfg))
    return out


def _runtime(entry: Entry, args: argparse.Namespace) -> Entry:
    """The entry with the command line's compute dtype and Pallas interpret mode."""
    changes = {}
    if args.dtype != "float32":
        changes["compute_dtype"] = args.dtype
    if args.interpret and entry.config.impl == "pallas":
        changes["interpret"] = True
    if not changes:
        return entry
    return dataclasses.replace(entry, config=dataclasses.replace(entry.config, **changes))


def _timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """Wall-clock and process CPU milliseconds of one call (CPU time is robust to other load)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3, out


def bench_group(
    entries: list[Entry],
    batch: int,
    prompt_len: int,
    decode_tokens: int,
    reps: int,
    samples: dict[tuple[str, int], dict],
) -> list[dict]:
    """Records for every entry at one batch size; repetitions interleaved across entries.

    Every repetition's timings are stored in ``samples[(model, batch)]``.
    """
    cache_size = prompt_len + decode_tokens
    state = []
    for i, e in enumerate(entries):
        params = init_params(e.config, jax.random.key(i)) if e.params is None else e.params
        prompt = np.asarray(
            jax.random.randint(jax.random.key(100 + i), (batch, prompt_len), 0, 256)
        )
        # Compile (and warm up) prefill and the decode loop.
        logits, cache = prefill(params, prompt, e.config, cache_size)
        first = np.asarray(jnp.argmax(logits[:, : e.config.vocab_size], axis=-1))
        jax.block_until_ready(greedy_decode(params, cache, first, e.config, decode_tokens))
        state.append((params, prompt, first))
    prefill_ms = [[] for _ in entries]
    decode_ms = [[] for _ in entries]
    decode_cpu_ms = [[] for _ in entries]
    for _ in range(reps):
        for i, e in enumerate(entries):
            params, prompt, first = state[i]
            ms, _, (_, cache) = _timed(prefill, params, prompt, e.config, cache_size)
            prefill_ms[i].append(ms)
            ms, cpu_ms, _ = _timed(greedy_decode, params, cache, first, e.config, decode_tokens)
            decode_ms[i].append(ms / decode_tokens)
            decode_cpu_ms[i].append(cpu_ms / decode_tokens)
    records = []
    for i, e in enumerate(entries):
        per_token = statistics.median(decode_ms[i])
        records.append(
            {
                "model": e.name,
                "layers": e.config.n_layers,
                "width": e.config.d_model,
                "batch": batch,
                "kv_bytes_per_token": kv_bytes_per_token(e.config),
                "prefill_ms": round(statistics.median(prefill_ms[i]), 3),
                "decode_ms_per_token": round(per_token, 4),
                "tokens_per_s": round(batch * 1e3 / per_token, 1),
            }
        )
        samples[(e.name, batch)] = {
            "prefill_ms": [round(v, 3) for v in prefill_ms[i]],
            "decode_ms_per_token": [round(v, 4) for v in decode_ms[i]],
            "decode_cpu_ms_per_token": [round(v, 4) for v in decode_cpu_ms[i]],
        }
    return records


def check_targets(
    groups: dict[str, list[Entry]],
    records: dict[str, list[dict]],
    samples: dict[str, dict[tuple[str, int], dict]],
) -> list[dict]:
    """The issue's targets, measured: RT/Transformer step ratio per shape, shallow RT vs deep T.

    ``value`` uses the median wall-clock times of the records; ``value_cpu`` the same ratio of
    median process CPU times (less sensitive to other processes on a shared machine).
    """

    def ratios(g: str, a: str, b: str, batch: int) -> tuple[float, float]:
        wall = {(r["model"], r["batch"]): r["decode_ms_per_token"] for r in records[g]}
        cpu = {k: statistics.median(v["decode_cpu_ms_per_token"]) for k, v in samples[g].items()}
        return (
            wall[(a, batch)] / max(wall[(b, batch)], 1e-9),
            cpu[(a, batch)] / max(cpu[(b, batch)], 1e-9),
        )

    checks = []
    for group, entries in groups.items():
        cfg = {e.name: e.config for e in entries}
        shapes = sorted({(c.n_layers, c.d_model) for c in cfg.values()}, reverse=True)
        name_of = {(c.block_type, c.n_layers, c.d_model): n for n, c in cfg.items()}
        for batch in sorted({r["batch"] for r in records[group]}):
            for layers, width in shapes:
                t = name_of.get(("transformer", layers, width))
                rt = name_of.get(("recurrent", layers, width))
                if t is None or rt is None:
                    continue
                wall, cpu = ratios(group, rt, t, batch)
                checks.append(
                    {
                        "group": group,
                        "batch": batch,
                        "target": f"{rt} step <= 1.2 x {t} step",
                        "value": round(wall, 3),
                        "value_cpu": round(cpu, 3),
                        "met": wall <= 1.2,
                    }
                )
            if len(shapes) != 2:
                continue
            (deep_l, deep_w), (shallow_l, shallow_w) = shapes
            t_deep = name_of.get(("transformer", deep_l, deep_w))
            rt_shallow = name_of.get(("recurrent", shallow_l, shallow_w))
            if t_deep is None or rt_shallow is None:
                continue
            wall, cpu = ratios(group, rt_shallow, t_deep, batch)
            checks.append(
                {
                    "group": group,
                    "batch": batch,
                    "target": f"{rt_shallow} per-token latency < {t_deep}",
                    "value": round(wall, 3),
                    "value_cpu": round(cpu, 3),
                    "met": wall < 1.0,
                }
            )
            kv = kv_bytes_per_token(cfg[rt_shallow]) / kv_bytes_per_token(cfg[t_deep])
            expected = (shallow_l * shallow_w) / (deep_l * deep_w)
            checks.append(
                {
                    "group": group,
                    "batch": batch,
                    "target": (
                        f"{rt_shallow} KV cache < {t_deep} "
                        f"(ratio 2*{shallow_l}*{shallow_w} / (2*{deep_l}*{deep_w}))"
                    ),
                    "value": round(kv, 4),
                    "value_cpu": None,
                    "met": kv < 1.0 and abs(kv - expected) < 1e-12,
                }
            )
    return checks


def markdown(result: dict) -> str:
    """The results as Markdown tables."""
    lines = [
        f"# Decoding benchmark ({result.get('weights', 'random weights')}, "
        f"{result.get('dtype', 'float32')}, greedy)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}. Prompt {result['prompt_len']} tokens, "
        f"{result['decode_tokens']} decode steps per timing, median of {result['reps']} "
        f"interleaved repetitions. RT prefill impl: `{result['rt_impl']}`.",
        "",
    ]
    for group, recs in result["groups"].items():
        lines += [f"## {group}", ""]
        info = result["models"][group]
        lines += [
            "| model | layers | width | heads | MLP | non-emb params | batch | KV bytes/token "
            "| prefill ms | decode ms/token | (min-max) | CPU ms/token | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            m = info[r["model"]]
            reps = result["samples"][group][f"{r['model']}@batch{r['batch']}"]
            lo, hi = min(reps["decode_ms_per_token"]), max(reps["decode_ms_per_token"])
            cpu = statistics.median(reps["decode_cpu_ms_per_token"])
            lines.append(
                f"| {r['model']} | {r['layers']} | {r['width']} | {m['heads']} | {m['mlp']} "
                f"| {m['non_embedding_params']:,} | {r['batch']} | {r['kv_bytes_per_token']:,} "
                f"| {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.3f} | {lo:.3f}-{hi:.3f} | {cpu:.3f} "
                f"| {r['tokens_per_s']:.0f} |"
            )
        lines.append("")
    lines += [
        "## Targets (issue 5) and LRT decode overhead (issue 7)",
        "",
        "Measured = ratio of median wall-clock times (met/not met is judged on it); CPU = the same "
        "ratio of median process CPU times, less sensitive to other load on a shared machine. "
        "LRT rows have no threshold (reported beside the paper's ~9% overhead).",
        "",
        "| group | batch | target | measured | CPU | met |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["targets"]:
        cpu = "" if c["value_cpu"] is None else c["value_cpu"]
        lines.append(
            f"| {c['group']} | {c['batch']} | {c['target']} | {c['value']} | {cpu} "
            f"| {'reported' if c['met'] is None else 'yes' if c['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write JSON and Markdown."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench_decode", description=__doc__)
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default results/bench_decode.json; results/bench_decode_lrt.json "
        "when --groups is cpu-lrt alone)",
    )
    p.add_argument("--groups", nargs="+", default=["cpu-full", "paper-12v6", "cpu-lrt"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--paper-scale", type=int, default=8)
    p.add_argument("--rt-impl", "--impl", default="tiled", choices=["reference", "tiled", "pallas"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--interpret", action="store_true", help="Pallas kernels in interpret mode (CPU)"
    )
    p.add_argument(
        "--lrt-train-steps",
        type=int,
        default=0,
        help="train the cpu-lrt models this many steps first and time those weights (0: random)",
    )
    p.add_argument("--runs-dir", default="runs/bench_decode_lrt", help="for --lrt-train-steps")
    args = p.parse_args(argv)
    if args.prompt_len < 1 or args.decode_tokens < 1 or args.reps < 1:
        p.error("--prompt-len, --decode-tokens and --reps must be >= 1")

    load_before = os.getloadavg()[0]
    groups: dict[str, list[Entry]] = {}
    for g in args.groups:
        if g == "cpu-full":
            groups[g] = cpu_full_entries(args.rt_impl)
        elif g == "paper-12v6":
            groups[g] = paper_entries(args.paper_scale, args.rt_impl)
        elif g == "cpu-lrt":
            groups[g] = lrt_entries()
            if args.lrt_train_steps > 0:
                groups[g] = train_lrt_entries(groups[g], args.lrt_train_steps, args.runs_dir)
        else:
            p.error(f"unknown group {g!r}: choose from cpu-full, paper-12v6, cpu-lrt")
        groups[g] = [_runtime(e, args) for e in groups[g]]
    try:  # an impl that cannot run here fails now, naming the flag
        for entries in groups.values():
            for e in entries:
                layer_function(e.config)
    except ValueError as err:
        p.error(f"--impl {args.rt_impl}: {err}")
    if args.out is None:
        lrt_only = list(groups) == ["cpu-lrt"]
        args.out = "results/bench_decode_lrt.json" if lrt_only else "results/bench_decode.json"
    records: dict[str, list[dict]] = {g: [] for g in groups}
    samples: dict[str, dict[tuple[str, int], dict]] = {g: {} for g in groups}
    for g, entries in groups.items():
        for batch in args.batches:
            recs = bench_group(
                entries, batch, args.prompt_len, args.decode_tokens, args.reps, samples[g]
            )
            records[g] += recs
            for r in recs:
                print(json.dumps(r), flush=True)
    result = {
        "command": "python -m experiments.bench_decode "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()} {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after (1 min)",
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "reps": args.reps,
        "rt_impl": args.rt_impl,
        **(
            {"weights": f"cpu-lrt trained {args.lrt_train_steps} steps, others random"}
            if args.lrt_train_steps > 0
            else {}
        ),
        **({"dtype": args.dtype} if args.dtype != "float32" else {}),
        **({"interpret": True} if args.interpret else {}),
        "models": {
            g: {
                e.name: {
                    "block_type": e.config.block_type,
                    "memory": e.config.memory.kind,
                    "prefill": e.config.memory.prefill if e.config.memory.enabled else "exact",
                    "heads": e.config.n_heads,
                    "mlp": e.config.mlp_hidden,
                    "vocab": e.config.vocab_size,
                    "non_embedding_params": e.config.non_embedding_params(),
                }
                for e in entries
            }
            for g, entries in groups.items()
        },
        "groups": records,
        "records": [r for g in groups for r in records[g]],
        "samples": {
            g: {f"{name}@batch{b}": v for (name, b), v in samples[g].items()} for g in groups
        },
        "targets": check_targets(groups, records, samples)
        + (
            lrt_overheads(groups["cpu-lrt"], records["cpu-lrt"], samples["cpu-lrt"])
            if "cpu-lrt" in groups
            else []
        ),
    }
    md = markdown(result)
    print(md)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    return result


if __name__ == "__main__":
    main()
