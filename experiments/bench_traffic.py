"""HBM traffic model of one RT layer (forward + backward) built from the tile kernels' BlockSpecs.

    python -m experiments.bench_traffic --seq-lens 256 512 1024 2048 4096 8192 16384 \
        --d-model 1024 --heads 16 --hlo-seq-lens 256 1024

Counts bytes read + written by every kernel call of the Fenwick schedule for one sequence
(batch 1, bf16 inputs, float32 state/grads). Three granularities:

* ``tiled`` (in place): the TPU path's calls (``rt_tiles.fenwick_tpu``, from each call's
  ``block_plan`` and the kernels' BlockSpecs): per block the key leaves once, per query leaf q
  and its state (or g, lse, delta, dq) once, per key leaf dK, dV once; forward, the backward
  recompute (the same n - 1 merges) and the mirrored grads calls. Theta(N log N).
* ``tiled_window``: one tile call per Fenwick block on a cut window (the Triton path), with
  ``tpu.merge_cost``/``grads_cost``, not counting the window's copies.
* ``tiled_leaf``: one leaf x leaf call per tile: Theta(N^2 / leaf).

The XLA copies left around the calls are not modelled: ``--hlo-seq-lens`` compiles the Pallas
layer (forward + backward) for TPU v5e with libtpu and counts every copy inside its leaf loops
from the compiled HLO (``leaf_loop_copies``), each as often as it runs. The README paragraph
between the ``bench_traffic`` markers is rendered from the JSON (``--render-only``).

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
import re
import sys

import numpy as np

from experiments.provenance import git_commit
from pallas_kernels.rt_tiles import fenwick_tpu, tpu
from pallas_kernels.rt_tiles.config import TPU_V5E, TpuTileConfig
from rt_jax.ops.fenwick_calls import block_shape, block_shapes
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
        # The call fenwick_block_merge/_grads make for block m (the same shape: checked).
        t_keys, t_queries = block_shape(blk.step, n_leaves)
        if (t_queries, t_keys) != (blk.query_stop - blk.query_start, blk.key_stop - blk.key_start):
            raise RuntimeError(f"fenwick_calls block {blk.step} differs from the schedule's {blk}")
        tq, sk = t_queries * leaf, t_keys * leaf
        if per_block:
            calls = [(tq, sk)]
        else:
            calls = [(leaf, leaf)] * (t_queries * t_keys)
        for t, s in calls:
            m = tpu.merge_cost(1, heads, heads, t, s, head_dim, BF16, config)
            g = tpu.grads_cost(1, heads, heads, t, s, head_dim, BF16, config)
            total_bytes += 2 * m.bytes_accessed + g.bytes_accessed  # fwd, bwd recompute, grads
            total_flops += 2 * m.flops + g.flops
    return total_bytes, total_flops


def _plans(n_leaves: int, leaf: int, config: TpuTileConfig):
    """(kc, tq) of every in-place kernel call of one layer step (forward, recompute, mirror).

    The calls ``fenwick_tpu.fenwick_merge``/``fenwick_grads`` make, from their ``block_plan``:
    forward m = 1..n (m = n empty), backward recompute m = 1..n-1, mirror m = n-1..0 (m = 0
    empty); blocks longer than the resident budget as several calls (chunks).
    """
    cap = fenwick_tpu.resident_leaves(n_leaves, leaf, config)
    n_chunks = fenwick_tpu.chunks(n_leaves, leaf, config)

    def calls(m):
        t = m & -m
        out = []
        for c in range(n_chunks if t > cap else 1):
            _, _, kc, tq, _, _ = (int(a) for a in fenwick_tpu.block_plan(m, n_leaves, cap, c))
            out.append((kc, tq))
        return out

    merges = [p for m in range(1, n_leaves + 1) for p in calls(m)]
    merges += [p for m in range(1, n_leaves) for p in calls(m)]
    grads = [p for m in range(n_leaves) for p in calls(m)]
    return merges, grads


def inplace_layer_traffic(
    n: int, heads: int, head_dim: int, leaf: int, config: TpuTileConfig, kv_heads: int = 0
) -> dict:
    """HBM bytes and MXU work of the in-place kernel calls of one layer, batch 1.

    Bytes per call from the kernels' BlockSpecs (each block index is fetched once per run of
    steps that share it): merge reads kc key/value leaves, and per query leaf q and the state
    (read + written); grads reads kc key/value leaves, per query leaf q, g, lse, delta and dq
    (read + written), and per key leaf dK, dV (read + written). An empty call (tq = 0) copies
    one state/gradient leaf onto itself. ``done`` counts the 128-key chunks the kernels compute
    (``bk`` wide, masked past the block), ``useful`` the block's own query x key pairs.
    """
    g = kv_heads or heads
    n_leaves = -(-n // leaf)
    bk = min(tpu.TPU_LANES, fenwick_tpu.resident_leaves(n_leaves, leaf, config) * leaf)
    q_leaf = heads * leaf * head_dim * BF16
    kv_leaf = 2 * g * leaf * head_dim * BF16
    state_leaf = heads * leaf * (head_dim + 2) * F32
    merges, grads = _plans(n_leaves, leaf, config)
    total = done = useful = 0
    for kc, tq in merges:
        total += kc * kv_leaf + (tq * (q_leaf + 2 * state_leaf) if tq else 2 * state_leaf)
        done += 4 * heads * tq * leaf * -(-kc * leaf // bk) * bk * head_dim
        useful += 4 * heads * tq * leaf * kc * leaf * head_dim
    dq_leaf = heads * leaf * head_dim * F32
    dkv_leaf = 2 * g * leaf * head_dim * F32
    for kc, tq in grads:
        if tq:
            total += kc * (kv_leaf + 2 * dkv_leaf)
            total += tq * (2 * q_leaf + 2 * heads * leaf * F32 + 2 * dq_leaf)
        else:
            total += kv_leaf + 2 * (dq_leaf + dkv_leaf)
        done += 10 * heads * tq * leaf * -(-kc * leaf // bk) * bk * head_dim
        useful += 10 * heads * tq * leaf * kc * leaf * head_dim
    return {"bytes": total, "flops_done": done, "flops_useful": useful}


def padding_waste_inplace(n: int, leaf: int, config: TpuTileConfig) -> float:
    """MXU work / needed work of the in-place kernels' forward calls (exact leaf blocks: rows
    are never padded; keys are computed in ``bk``-wide chunks)."""
    t = inplace_layer_traffic(n, 1, 1, leaf, config)
    return t["flops_done"] / t["flops_useful"]


def padding_waste(n: int, leaf: int, config: TpuTileConfig) -> float:
    """MXU work the TPU kernels do / the work the tiles need, over one forward's block calls.

    Each call pads its query rows to its ``block_q`` and its keys to its ``block_k`` (both at
    least the 128-lane width), see ``tpu.TileGeometry``.
    """
    n_leaves = -(-n // leaf)
    useful = padded = 0
    for m in range(1, n_leaves):
        t_keys, t_queries = block_shape(m, n_leaves)
        t, s = t_queries * leaf, t_keys * leaf
        geo = tpu.TileGeometry.of(t, s, config)
        useful += t * s
        padded += -(-t // geo.block_q) * geo.block_q * -(-s // geo.block_k) * geo.block_k
    return padded / useful


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


# ----------------------------------------------------------------------------- compiled HLO copies
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "f64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b(pred|s8|u8|bf16|f16|s32|u32|f32|s64|f64)\[([0-9,]*)\]")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from a compiled HLO module's text."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _out_bytes(line: str) -> int:
    """Bytes of the first array shape after '=' (the instruction's result)."""
    m = _ARRAY.search(line.split("=", 1)[1])
    if not m:
        return 0
    size = math.prod(int(d) for d in m.group(2).split(",") if d)
    return size * _DTYPE_BYTES[m.group(1)]


def _called(line: str) -> list[str]:
    names = []
    for key in ("body=", "calls=", "to_apply="):
        if key in line:
            names += re.findall(r"%([\w.\-]+)", line.split(key, 1)[1].split(",")[0])
    if "branch_computations={" in line:
        names += re.findall(r"%([\w.\-]+)", line.split("branch_computations={", 1)[1].split("}")[0])
    return names


def _is_copy(line: str, comps: dict[str, list[str]]) -> bool:
    """A copy, an async copy start, or a fusion whose root is a copy (a relayout)."""
    rhs = line.split("=", 1)[1] if "=" in line else ""
    if re.search(r"\s(copy|copy-start)\(", rhs):
        return True
    if " fusion(" in rhs and "calls=" in rhs:
        for name in _called(line):
            root = [ln for ln in comps.get(name, []) if ln.lstrip().startswith("ROOT")]
            if root and re.search(r"\scopy\(", root[0]):
                return True
    return False


def _contains_kernel(name: str, comps: dict[str, list[str]], seen: set[str] | None = None) -> bool:
    seen = set() if seen is None else seen
    if name in seen:
        return False
    seen.add(name)
    for line in comps.get(name, []):
        if "tpu_custom_call" in line:
            return True
        if any(_contains_kernel(c, comps, seen) for c in _called(line) if " fusion(" not in line):
            return True
    return False


def leaf_loop_copies(hlo_text: str, branch_counts: list[int], n_leaves: int) -> dict:
    """Copies the compiled program makes inside its leaf loops (while loops that call kernels).

    Per leaf-loop iteration: the body's own copies, and for each ``lax.switch`` over Fenwick
    blocks (a conditional with ``len(branch_counts)`` branches) each branch's copies weighted by
    how many of the n - 1 blocks take it. Inner (per-position) loops are not entered: their
    copies are listed by size only. Returns total bytes per layer step and the largest copy.
    """
    comps = _computations(hlo_text)
    loops = []
    for lines in comps.values():
        for line in lines:
            if " while(" in line:
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                if _contains_kernel(body, comps):
                    loops.append(body)
    copies: list[tuple[int, int]] = []  # (bytes, times executed per layer step)
    for body in loops:
        for line in comps[body]:
            if _is_copy(line, comps):
                copies.append((_out_bytes(line), n_leaves))
            rhs = line.split("=", 1)[1] if "=" in line else ""
            if " conditional(" in rhs:
                branches = _called(line)
                counts = branch_counts
                if len(branches) != len(branch_counts):
                    counts = [n_leaves] * len(branches)
                for name, count in zip(branches, counts, strict=True):
                    copies += [
                        (_out_bytes(ln), count) for ln in comps.get(name, []) if _is_copy(ln, comps)
                    ]
    return {"leaf_loops": len(loops), "copies": copies}


def compiled_layer_hlo(
    n: int, heads: int, head_dim: int, leaf: int, topology: str = "v5e:2x2"
) -> str:
    """Compiled HLO (libtpu, AOT from CPU) of the Pallas RT layer's forward + backward.

    Batch = one sequence per chip of ``topology``, data-parallel under the topology's mesh; a
    two-layer MLP of width 2 * D.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from rt_jax.ops.block import AttentionSpec, param_shapes
    from rt_jax.ops.pallas_tiles import pallas_tile_ops
    from rt_jax.ops.tiled import recurrent_layer_tiled

    d = heads * head_dim
    spec = AttentionSpec(
        n_heads=heads, n_kv_heads=heads, head_dim=head_dim, compute_dtype="bfloat16"
    )
    topo = topologies.get_topology_desc(topology, platform="tpu")
    devices = np.asarray(topo.devices).reshape(-1, 1, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    rep = NamedSharding(mesh, P())
    params = {
        k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=rep)
        for k, s in param_shapes(d, 2 * d, spec).items()
    }
    x = jax.ShapeDtypeStruct(
        (devices.size, n, d), jnp.float32, sharding=NamedSharding(mesh, P("data"))
    )

    def loss(p, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            ops = pallas_tile_ops(interpret=False)
            return jnp.sum(recurrent_layer_tiled(p, x, spec, leaf_size=leaf, tile_ops=ops))

    return jax.jit(jax.value_and_grad(loss)).lower(params, x).compile().as_text()


def hlo_copy_row(n: int, heads: int, head_dim: int, leaf: int) -> dict:
    """Copies inside the leaf loops of the compiled layer at sequence length n (one chip's share).

    ``leaf_slice_bytes`` is one leaf of one sequence's widest float32 activation (the MLP hidden,
    2 D wide): the per-leaf slices the scans take of their inputs; a copy above it would be
    whole-buffer traffic.
    """
    n_leaves = -(-n // leaf)
    shapes, branch = block_shapes(n_leaves)
    counts = [sum(1 for m in range(1, n_leaves) if branch[m] == i) for i in range(1 + len(shapes))]
    counts[0] += 1  # m = n (forward) or m = 0 (backward mirror): the empty branch
    found = leaf_loop_copies(compiled_layer_hlo(n, heads, head_dim, leaf), counts, n_leaves)
    tile_bytes = heads * leaf * head_dim * F32  # one leaf of one sequence's float32 state
    slice_bytes = leaf * 2 * heads * head_dim * F32
    big = [(b, c) for b, c in found["copies"] if b > slice_bytes]
    kernel_bytes = inplace_layer_traffic(n, heads, head_dim, leaf, TPU_V5E)["bytes"]
    copy_bytes = sum(b * c for b, c in found["copies"])
    return {
        "seq_len": n,
        "heads": heads,
        "head_dim": head_dim,
        "leaf_loops": found["leaf_loops"],
        "tile_bytes": tile_bytes,
        "leaf_slice_bytes": slice_bytes,
        "copy_bytes": copy_bytes,
        "copies_executed": sum(c for _, c in found["copies"]),
        "copies_over_slice_executed": sum(c for _, c in big),
        "copy_bytes_over_slice": sum(b * c for b, c in big),
        "largest_copy_bytes": max((b for b, _ in found["copies"]), default=0),
        "kernel_call_bytes": kernel_bytes,
        "copies_over_kernel_bytes": copy_bytes / kernel_bytes,
    }


README_BEGIN = "<!-- bench_traffic:begin (python -m experiments.bench_traffic --render-only) -->"
README_END = "<!-- bench_traffic:end -->"


def render_readme(results: dict, command: str) -> str:
    """The README's traffic paragraph, from results/bench_traffic.json."""
    rows = {r["seq_len"]: r for r in results["rows"]}
    summary = results["summary"]
    hlo = summary["hlo_copies"]
    pad = summary["tpu_padding_by_n_and_leaf"]
    top = max(rows)
    lines = [
        f"**Memory traffic of the Pallas path** (`{command}`, `results/bench_traffic.md`): the "
        'in-place kernel calls `impl="pallas"` makes on TPU (one per Fenwick block, exactly '
        "the schedule's tiles, counted from the kernels' BlockSpecs) move "
        f"{rows[4096]['naive_over_tiled']:.0f}x fewer bytes than the token-by-token loop at "
        f"N=4096 ({rows[top]['naive_over_tiled']:.0f}x at {top}), growing as "
        f"N^{summary['exponent_tiled']:.2f}.",
    ]
    if hlo:
        parts = [
            f"{r['copies_over_kernel_bytes']:.2f}x the kernel bytes at N={r['seq_len']} "
            f"(largest {r['largest_copy_bytes'] / 1e3:.0f} KB)"
            for r in hlo
        ]
        lines.append(
            "The copies XLA still makes inside the layer's leaf loops, counted in the compiled "
            f"v5e HLO ({hlo[0]['heads']} heads of {hlo[0]['head_dim']}), are "
            + " and ".join(parts)
            + ": per-leaf slices of the scans' inputs, no whole-buffer copy."
        )
    lines.append(
        "TPU MXU work / needed work at leaf 32 (forward calls): "
        + ", ".join(
            f"N={k.split('/')[0]}: {v['window']:.2f}x -> {v['inplace']:.2f}x"
            for k, v in pad.items()
            if k.endswith("/32")
        )
        + " (window tiles padded to 128 rows -> exact leaf blocks, keys in 128-wide chunks). "
        "Estimates from the compiler and the BlockSpecs, not measured on a TPU."
    )
    return "\n".join(lines)


def update_readme(path: str, text: str) -> None:
    """Replace the block between README_BEGIN and README_END in ``path``."""
    with open(path) as f:
        readme = f.read()
    start, end = readme.index(README_BEGIN), readme.index(README_END)
    readme = readme[: start + len(README_BEGIN)] + "\n" + text + "\n" + readme[end:]
    with open(path, "w") as f:
        f.write(readme)


def main() -> None:
    """Print the traffic table, write JSON + Markdown and the README paragraph."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--leaf", type=int, default=32)
    parser.add_argument("--out", default="results/bench_traffic.json")
    parser.add_argument(
        "--hlo-seq-lens", type=int, nargs="*", default=[256, 1024],
        help="compile the Pallas layer for v5e at these N and count the copies in its leaf loops",
    )  # fmt: skip
    parser.add_argument("--hlo-heads", type=int, default=2)
    parser.add_argument("--hlo-head-dim", type=int, default=64)
    parser.add_argument("--readme", default="README.md")
    parser.add_argument(
        "--render-only", action="store_true",
        help="only re-render the README paragraph from the existing results JSON",
    )  # fmt: skip
    args = parser.parse_args()
    if args.render_only:
        with open(args.out) as f:
            results = json.load(f)
        update_readme(args.readme, render_readme(results, results["summary"]["command"]))
        return
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be divisible by --heads {args.heads}")
    head_dim = args.d_model // args.heads
    config = TPU_V5E
    rows = []
    for n in args.seq_lens:
        inplace = inplace_layer_traffic(n, args.heads, head_dim, args.leaf, config)
        block_bytes, flops = inplace["bytes"], inplace["flops_useful"]
        window_bytes, _ = rt_layer_traffic(n, args.heads, head_dim, args.leaf, True, config)
        leaf_bytes, _ = rt_layer_traffic(n, args.heads, head_dim, args.leaf, False, config)
        naive = naive_traffic(n, args.heads, head_dim)
        flash = flash_traffic(n, args.heads, head_dim, config.block_q)
        rows.append(
            {
                "seq_len": n,
                "d_model": args.d_model,
                "heads": args.heads,
                "tiled_bytes": block_bytes,
                "tiled_window_bytes": window_bytes,
                "naive_bytes": naive,
                "flash_bytes": flash,
                "tiled_flops": flops,
                "tiled_leaf_bytes": leaf_bytes,
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
    command = "python -m experiments.bench_traffic " + " ".join(sys.argv[1:])
    summary = {
        "batch": 1,
        "leaf": args.leaf,
        "command": command,
        "tpu_config": vars(config) if hasattr(config, "__dict__") else str(config),
        "exponent_tiled": fit_exponent(ns, [r["tiled_bytes"] for r in rows]),
        "exponent_tiled_leaf": fit_exponent(ns, [r["tiled_leaf_bytes"] for r in rows]),
        "exponent_naive": fit_exponent(ns, [r["naive_bytes"] for r in rows]),
        "exponent_flash": fit_exponent(ns, [r["flash_bytes"] for r in rows]),
        "bytes_per_nlogn_max_over_min": max(per) / min(per),
        "bytes_per_n_log_leaves_max_over_min": max(per_leaves) / min(per_leaves),
        "ridge_flops_per_byte": RIDGE,
    }
    head = (
        "| N | tiled (in place) MB | tiled (window calls) MB | tiled (leaf calls) MB | naive MB "
        "| flash MB | naive/tiled | naive/leaf | B/(N log2 N) | B/(N log2(N/leaf)) "
        "| FLOP/B in place | FLOP/B leaf |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['seq_len']} | {r['tiled_bytes'] / 1e6:.1f} "
            f"| {r['tiled_window_bytes'] / 1e6:.1f} | {r['tiled_leaf_bytes'] / 1e6:.1f} "
            f"| {r['naive_bytes'] / 1e6:.1f} | {r['flash_bytes'] / 1e6:.1f} "
            f"| {r['naive_over_tiled']:.0f} | {r['naive_over_tiled_leaf']:.1f} "
            f"| {r['bytes_per_nlogn']:.0f} | {r['bytes_per_n_log_leaves']:.0f} "
            f"| {r['intensity_tiled']:.0f} "
            f"| {r['intensity_tiled_leaf']:.0f} |"
        )
    notes = [
        "",
        "In place: the TPU path's calls (rt_tiles.fenwick_tpu, one per Fenwick block on the "
        "leaf-major buffers). Window calls: one tile call per block on a cut window (the Triton "
        "path; the copies of the window are not counted). Leaf calls: one call per leaf pair.",
        "",
        f"Fitted exponents (bytes ~ N^a): in place {summary['exponent_tiled']:.2f}, leaf "
        f"{summary['exponent_tiled_leaf']:.2f}, naive {summary['exponent_naive']:.2f}, flash "
        f"{summary['exponent_flash']:.2f}. bytes/(N log2 N) max/min over the range (in place): "
        f"{summary['bytes_per_nlogn_max_over_min']:.2f}; bytes/(N log2(N/leaf)) max/min "
        f"{summary['bytes_per_n_log_leaves_max_over_min']:.2f}.",
        f"Ridge points (FLOP/byte, bf16): H100 {RIDGE['h100_bf16']:.0f}, TPU v5e "
        f"{RIDGE['tpu_v5e_bf16']:.0f}. Batch 1, leaf {args.leaf}, TPU v5e blocks {config}.",
    ]
    padding = {
        f"{n}/{leaf}": {
            "window": padding_waste(n, leaf, config),
            "inplace": padding_waste_inplace(n, leaf, config),
        }
        for n in (512, 1024, 4096)
        for leaf in (32, 64, 128)
    }
    summary["tpu_padding_by_n_and_leaf"] = padding
    notes += [
        "",
        "## TPU padding: MXU work done / needed over one forward's block calls",
        "",
        "Window calls: queries padded to 128-row blocks, keys to 128 (v5e blocks). In place: "
        "exact leaf blocks (rows never padded; all local heads per grid step), keys computed in "
        "128-wide chunks, masked past the block: a block of fewer than 128 keys (leaf 32: "
        "T = 1, 2) still fills one chunk, whatever the heads per step (each head has its own "
        "keys).",
        "",
        "| N | leaf | window calls | in place |",
        "|---|---|---|---|",
    ]
    for k, v in padding.items():
        n, leaf = k.split("/")
        notes.append(f"| {n} | {leaf} | {v['window']:.2f}x | {v['inplace']:.2f}x |")
    hlo_rows = [
        hlo_copy_row(n, args.hlo_heads, args.hlo_head_dim, args.leaf) for n in args.hlo_seq_lens
    ]
    summary["hlo_copies"] = hlo_rows
    if hlo_rows:
        notes += [
            "",
            "## Copies left in the compiled program",
            "",
            f"Compiled with libtpu for v5e:2x2 (AOT from CPU; one sequence per chip, "
            f"{args.hlo_heads} heads of {args.hlo_head_dim}, leaf {args.leaf}, MLP 2 D): every "
            "copy inside the layer's leaf loops (forward scan, backward recompute and reverse "
            "scan), each counted as often as it runs, against the in-place kernel calls' own "
            "bytes at the same shape. Leaf slice = one leaf of one sequence's widest float32 "
            "activation (the MLP hidden).",
            "",
            "| N | leaf loops | copies run | of them > 1 leaf slice | copy MB | "
            "largest copy KB | leaf slice KB | kernel-call MB | copies / kernel bytes |",
            "|" + "---|" * 9,
        ]
        for r in hlo_rows:
            notes.append(
                f"| {r['seq_len']} | {r['leaf_loops']} | {r['copies_executed']} "
                f"| {r['copies_over_slice_executed']} | {r['copy_bytes'] / 1e6:.2f} "
                f"| {r['largest_copy_bytes'] / 1e3:.0f} | {r['leaf_slice_bytes'] / 1e3:.0f} "
                f"| {r['kernel_call_bytes'] / 1e6:.2f} | {r['copies_over_kernel_bytes']:.2f} |"
            )
    commit = git_commit()  # before anything is written: the results files would make it dirty
    summary["commit"] = commit
    table = "\n".join(lines + notes)
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {"rows": rows, "summary": summary}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("# RT layer HBM traffic model (forward + backward)\n\n")
        f.write(f"Command: `{command}`  \nCommit: `{commit}`\n\n")
        f.write(table + "\n")
    if args.readme:
        update_readme(args.readme, render_readme(results, command))


if __name__ == "__main__":
    main()
