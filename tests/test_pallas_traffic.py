"""The traffic model of experiments/bench_traffic.py: consistent with the schedule and the claims."""

import math

from experiments.bench_traffic import flash_traffic, naive_traffic, rt_layer_traffic
from pallas_kernels.rt_tiles import tpu
from pallas_kernels.rt_tiles.config import TPU_V5E, TpuTileConfig
from rt_jax.ops.schedule import rows_moved

H, KD = 16, 64


def test_merge_cost_counts_each_operand_once_per_call():
    b, h, g, t, s = 2, 4, 2, 300, 500
    cfg = TpuTileConfig(block_q=128, block_k=128, max_resident_keys=1024)
    cost = tpu.merge_cost(b, h, g, t, s, KD, 2, cfg)
    q = b * h * t * KD * 2
    state = 2 * b * h * t * (KD + 2) * 4
    kv = 2 * b * g * s * KD * 2
    assert cost.bytes_accessed == q + state + kv + 4 * t + 4 * s
    assert cost.flops == 4 * b * h * t * s * KD
    # Splitting the key block re-reads the queries and the state once per extra call.
    split = tpu.merge_cost(b, h, g, t, s, KD, 2, TpuTileConfig(128, 128, 256))
    assert split.bytes_accessed - cost.bytes_accessed == q + state + 4 * t


def test_block_granularity_moves_the_schedules_key_rows():
    """Key bytes of the block-granular model == rows_moved's key rows (minus the leaf-local part)."""
    n, leaf = 1024, 32
    big = TpuTileConfig(max_resident_keys=1 << 20)
    with_kv, _ = rt_layer_traffic(n, H, KD, leaf, True, big)
    key_rows = rows_moved(n, leaf)["key_rows"] - n  # the leaf-local keys are not kernel calls
    query_rows = rows_moved(n, leaf)["query_state_rows"]
    merge_q = H * KD * 2 + 2 * H * (KD + 2) * 4
    grads_q = H * (2 * KD * 2 + 2 * 4 + KD * 4)
    merge_kv = 2 * H * KD * 2
    grads_kv = 2 * H * KD * (2 + 4)
    pos = 3 * 4 * (query_rows + key_rows)  # two merges and one grads read both position vectors
    expected = query_rows * (2 * merge_q + grads_q) + key_rows * (2 * merge_kv + grads_kv) + pos
    assert with_kv == expected


def test_tiled_block_traffic_is_n_log_n_and_beats_naive_by_100x_at_4096():
    ns = [256, 1024, 4096]
    per = []
    for n in ns:
        tiled, _ = rt_layer_traffic(n, H, KD, 32, True, TPU_V5E)
        per.append(tiled / (n * math.log2(n // 32)))
    assert max(per) / min(per) < 1.01
    tiled, _ = rt_layer_traffic(4096, H, KD, 32, True, TPU_V5E)
    assert naive_traffic(4096, H, KD) / tiled > 100
    # The leaf-granular calls of today's scan re-read key leaves: Theta(N^2 / leaf).
    leaf_1k, _ = rt_layer_traffic(1024, H, KD, 32, False, TPU_V5E)
    leaf_4k, _ = rt_layer_traffic(4096, H, KD, 32, False, TPU_V5E)
    assert 15 < leaf_4k / leaf_1k < 17
    assert flash_traffic(4096, H, KD, 256) < naive_traffic(4096, H, KD)


def test_in_place_traffic_is_n_log_n_and_the_readme_paragraph_is_rendered_from_results():
    import json

    from experiments.bench_traffic import (
        README_BEGIN,
        README_END,
        inplace_layer_traffic,
        padding_waste,
        padding_waste_inplace,
        render_readme,
    )

    per = []
    for n in (1024, 4096, 16384):
        per.append(inplace_layer_traffic(n, H, KD, 32, TPU_V5E)["bytes"] / (n * math.log2(n // 32)))
    assert max(per) / min(per) < 1.1
    # exact leaf blocks: no row padding; keys still fill 128-wide chunks (leaf 32: 1.33x at 512)
    assert padding_waste(512, 32, TPU_V5E) > 2.3
    assert abs(padding_waste_inplace(512, 32, TPU_V5E) - 160 / 120) < 1e-9
    assert padding_waste_inplace(512, 128, TPU_V5E) == 1.0
    with open("results/bench_traffic.json") as f:
        results = json.load(f)
    with open("README.md") as f:
        readme = f.read()
    block = readme[readme.index(README_BEGIN) + len(README_BEGIN) : readme.index(README_END)]
    assert block.strip() == render_readme(results, results["summary"]["command"]).strip(), (
        "README's traffic paragraph is stale: run python -m experiments.bench_traffic --render-only"
    )
