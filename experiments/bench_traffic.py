"""HBM traffic model of one RT layer (forward + backward) built from the tile kernels' BlockSpecs.

    .venv/bin/python -m experiments.bench_traffic --seq-lens 256 512 1024 2048 4096 8192 16384 \
        --d-model 1024 --heads 16 --out results/bench_traffic.json

Counts bytes read + written by every kernel call of the Fenwick schedule (``fenwick_blocks``) for
one sequence (batch 1, bf16 inputs, float32 state/grads), with ``tpu.merge_cost``/``grads_cost``
(the same numbers the kernels pass to ``pl.CostEstimate``). Forward = one merge per tile; backward =
the recomputing merge + one grads per tile (the mirrored schedule). Two granularities:

* ``tiled_leaf``: what ``recurrent_layer_tiled`` does today, one leaf x leaf call per tile, so a
  Fenwick block of T leaves is T^2 calls that each re-read their key leaf: Theta(N^2 / leaf).
* ``tiled`` (block): one call per Fenwick block with the key block resident in VMEM (split above
  ``max_resident_keys``): Theta(N log N) up to the split term. ``fenwick_block_merge``/``_grads``
  (rt_jax/ops/pallas_tiles.py) make these calls from the scan's leaf-major arrays; the XLA copies
  that gather/scatter their windows are estimated separately (``layout_copy_traffic``).

Baselines: the token-by-token loop (every step re-reads all earlier K/V; backward re-reads them
and updates f32 dK/dV) and one causal FlashAttention-2 layer (K/V re-read per query block of
``block_q``; dK/dV pass re-reads Q/dO/lse/delta per key block, dQ pass K/V per query block).
No accelerator timings: bytes and FLOPs only.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

from pallas_kernels.rt_tiles import tpu
from pallas_kernels.rt_tiles.config import TPU_V5E, TpuTileConfig
from rt_jax.ops.schedule import fenwick_blocks

BF16, F32 = 2, 4
RIDGE = {"h100_bf16": 989e12 / 3.35e12, "tpu_v5e_bf16": 197e12 / 819e9}


def rt_layer_traffic(
    n: int, heads: int, head_dim: int, leaf: int, per_block: bool, config: TpuTileConfig
) -> tuple[int, int]:
    """(bytes, flops) of all tile-kernel calls of one RT layer forward + backward, batch 1."""
    n_leaves = -(-n // leaf)
    total_bytes = total_flops = 0
    for blk in fenwick_blocks(n_leaves):
        tq = (blk.query_stop - blk.query_start) * leaf
        sk = (blk.key_stop - blk.key_start) * leaf
        if per_block:
            calls = [(tq, sk)]
        else:
            n_tiles = (blk.query_stop - blk.query_start) * (blk.key_stop - blk.key_start)
            calls = [(leaf, leaf)] * n_tiles
        for t, s in calls:
            m = tpu.merge_cost(1, heads, heads, t, s, head_dim, BF16, config)
            g = tpu.grads_cost(1, heads, heads, t, s, head_dim, BF16, config)
            total_bytes += 2 * m.bytes_accessed + g.bytes_accessed  # fwd, bwd recompute, grads
            total_flops += 2 * m.flops + g.flops
    return total_bytes, total_flops


def layout_copy_traffic(n: int, heads: int, head_dim: int, leaf: int) -> int:
    """XLA copies around the block calls of ``fenwick_block_merge``/``_grads`` (estimate).

    Each operand window is gathered from the leaf-major arrays (read + write) and each result is
    scattered back (read new + read old + write), per merge (two) and grads (one) per block.
    """
    row, st = heads * head_dim, heads * (head_dim + 2)
    total = 0
    for blk in fenwick_blocks(-(-n // leaf)):
        t = (blk.query_stop - blk.query_start) * leaf
        s = (blk.key_stop - blk.key_start) * leaf
        merge = 2 * (t * row * BF16 + 2 * s * row * BF16 + t * st * F32) + 3 * t * st * F32
        grads = 2 * (2 * t * row * BF16 + 2 * s * row * BF16 + 2 * t * heads * F32)
        grads += 3 * (t * row + 2 * s * row) * F32
        total += 2 * merge + grads
    return total


def naive_traffic(n: int, heads: int, head_dim: int) -> int:
    """Token-by-token loop: step t reads t earlier K/V rows (fwd) and updates their f32 grads."""
    pairs = n * (n - 1) // 2
    row = heads * head_dim
    forward = pairs * 2 * row * BF16 + n * row * (BF16 + BF16)
    backward = pairs * (2 * row * BF16 + 2 * 2 * row * F32) + n * row * 4 * BF16
    return forward + backward


def flash_traffic(n: int, heads: int, head_dim: int, block_q: int) -> int:
    """One causal FlashAttention-2 layer, forward + backward, blocks of block_q rows."""
    row = heads * head_dim
    nb = -(-n // block_q)
    reread_rows = sum(min((i + 1) * block_q, n) for i in range(nb))  # causal prefix per block
    forward = n * row * 2 * BF16 + 2 * reread_rows * row * BF16 + n * heads * F32
    dkdv = 2 * n * row * (BF16 + BF16) + reread_rows * (2 * row * BF16 + 2 * heads * F32)
    dq = n * row * 3 * BF16 + 2 * reread_rows * row * BF16
    return forward + dkdv + dq


def fit_exponent(ns: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main() -> None:
    """Print the traffic table and write JSON + Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--leaf", type=int, default=32)
    parser.add_argument("--out", default="results/bench_traffic.json")
    args = parser.parse_args()
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    head_dim = args.d_model // args.heads
    config = TPU_V5E
    rows = []
    for n in args.seq_lens:
        block_bytes, flops = rt_layer_traffic(n, args.heads, head_dim, args.leaf, True, config)
        leaf_bytes, _ = rt_layer_traffic(n, args.heads, head_dim, args.leaf, False, config)
        copies = layout_copy_traffic(n, args.heads, head_dim, args.leaf)
        naive = naive_traffic(n, args.heads, head_dim)
        flash = flash_traffic(n, args.heads, head_dim, config.block_q)
        rows.append(
            {
                "seq_len": n,
                "d_model": args.d_model,
                "heads": args.heads,
                "tiled_bytes": block_bytes,
                "naive_bytes": naive,
                "flash_bytes": flash,
                "tiled_flops": flops,
                "tiled_leaf_bytes": leaf_bytes,
                "tiled_block_layout_copy_bytes": copies,
                "naive_over_tiled_with_copies": naive / (block_bytes + copies),
                "bytes_per_nlogn": block_bytes / (n * math.log2(n)),
                "bytes_per_n_log_leaves": block_bytes / (n * math.log2(max(2, n // args.leaf))),
                "leaf_bytes_per_nlogn": leaf_bytes / (n * math.log2(n)),
                "naive_over_tiled": naive / block_bytes,
                "naive_over_tiled_leaf": naive / leaf_bytes,
                "intensity_tiled": flops / block_bytes,
                "intensity_tiled_leaf": flops / leaf_bytes,
            }
        )
    ns = [r["seq_len"] for r in rows]
    per = [r["bytes_per_nlogn"] for r in rows]
    per_leaves = [r["bytes_per_n_log_leaves"] for r in rows]
    summary = {
        "batch": 1,
        "leaf": args.leaf,
        "tpu_config": vars(config) if hasattr(config, "__dict__") else str(config),
        "exponent_tiled": fit_exponent(ns, [r["tiled_bytes"] for r in rows]),
        "exponent_tiled_leaf": fit_exponent(ns, [r["tiled_leaf_bytes"] for r in rows]),
        "exponent_tiled_with_copies": fit_exponent(
            ns, [r["tiled_bytes"] + r["tiled_block_layout_copy_bytes"] for r in rows]
        ),
        "exponent_naive": fit_exponent(ns, [r["naive_bytes"] for r in rows]),
        "exponent_flash": fit_exponent(ns, [r["flash_bytes"] for r in rows]),
        "bytes_per_nlogn_max_over_min": max(per) / min(per),
        "bytes_per_n_log_leaves_max_over_min": max(per_leaves) / min(per_leaves),
        "ridge_flops_per_byte": RIDGE,
    }
    head = (
        "| N | tiled (block) MB | tiled (leaf) MB | naive MB | flash MB | naive/tiled | "
        "naive/leaf | B/(N log2 N) | B/(N log2(N/leaf)) | FLOP/B block | FLOP/B leaf |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['tiled_bytes'] / 1e6:.1f} | {r['tiled_leaf_bytes'] / 1e6:.1f} "
            f"| {r['naive_bytes'] / 1e6:.1f} | {r['flash_bytes'] / 1e6:.1f} "
            f"| {r['naive_over_tiled']:.0f} | {r['naive_over_tiled_leaf']:.1f} "
            f"| {r['bytes_per_nlogn']:.0f} | {r['bytes_per_n_log_leaves']:.0f} "
            f"| {r['intensity_tiled']:.0f} "
            f"| {r['intensity_tiled_leaf']:.0f} |"
        )
    notes = [
        "",
        f"Fitted exponents (bytes ~ N^a): block {summary['exponent_tiled']:.2f}, leaf "
        f"{summary['exponent_tiled_leaf']:.2f}, naive {summary['exponent_naive']:.2f}, flash "
        f"{summary['exponent_flash']:.2f}; block + layout copies "
        f"{summary['exponent_tiled_with_copies']:.2f} (naive/(block + copies) at each N: "
        + ", ".join(f"{r['naive_over_tiled_with_copies']:.0f}" for r in rows)
        + "). bytes/(N log2 N) max/min over the range (block): "
        f"{summary['bytes_per_nlogn_max_over_min']:.2f}; bytes/(N log2(N/leaf)) max/min "
        f"{summary['bytes_per_n_log_leaves_max_over_min']:.2f}.",
        f"Ridge points (FLOP/byte, bf16): H100 {RIDGE['h100_bf16']:.0f}, TPU v5e "
        f"{RIDGE['tpu_v5e_bf16']:.0f}. Batch 1, leaf {args.leaf}, TPU v5e blocks {config}.",
    ]
    table = "\n".join(lines + notes)
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "summary": summary}, f, indent=1, default=str)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("# RT layer HBM traffic model (forward + backward)\n\n")
        command = " ".join(__doc__.split("\n")[2:4]).replace("\\", " ")
        f.write("Command: `" + " ".join(command.split()) + "`\n\n")
        f.write(table + "\n")


if __name__ == "__main__":
    main()
