"""experiments.tpu_cost: the compiled-HLO cost walk on programs with known answers.

The compiled tests AOT-compile tiny programs for one TPU v5e chip with libtpu (no TPU needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import tpu_cost

# A hand-written module with a known answer (cycles in the backend configs):
#   entry: fusion 1000 (matmul), copy-start of f32[256,256] (256 KiB, uncosted)
#   outer while i = 0..4 (5 trips; the bound 5 rides in the state through an async copy): body fusion 10 (vector) + inner while j = 0..i (i+1 trips)
#   with body fusion 7; the inner condition compares j with the outer counter passed in its state.
#   conditional on a constant true predicate: true branch 50, false branch 5000 (not taken).
#   tpu_custom_call with CostEstimate flops=197e9 -> 1 ms at v5e peak = clock/1000 cycles.
HLO = """HloModule hand

%fused_mm (p0: bf16[128,128], p1: bf16[128,128]) -> f32[128,128] {
  %p0 = bf16[128,128]{1,0} parameter(0)
  %p1 = bf16[128,128]{1,0} parameter(1)
  ROOT %conv = f32[128,128]{1,0} convolution(%p0, %p1), dim_labels=bf_io->bf
}

%fused_vec (q0: f32[8]) -> f32[8] {
  %q0 = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(%q0)
}

%inner_cond (s: (s32[], s32[], f32[8])) -> pred[] {
  %s = (s32[], s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%s), index=0
  %bound = s32[] get-tuple-element(%s), index=1
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

%inner_body (s: (s32[], s32[], f32[8])) -> (s32[], s32[], f32[8]) {
  %s = (s32[], s32[], f32[8]{0}) parameter(0)
  %j = s32[] get-tuple-element(%s), index=0
  %bound = s32[] get-tuple-element(%s), index=1
  %x = f32[8]{0} get-tuple-element(%s), index=2
  %one = s32[] constant(1)
  %j1 = s32[] add(%j, %one)
  %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_vec, backend_config={"estimated_cycles":"7","cost_model_type":"COST_MODEL_TYPE_INVALID"}
  ROOT %t = (s32[], s32[], f32[8]{0}) tuple(%j1, %bound, %y)
}

%outer_cond (s: (s32[], f32[8], s32[])) -> pred[] {
  %s = (s32[], f32[8]{0}, s32[]) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] get-tuple-element(%s), index=2
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (s: (s32[], f32[8], s32[])) -> (s32[], f32[8], s32[]) {
  %s = (s32[], f32[8]{0}, s32[]) parameter(0)
  %n = s32[] get-tuple-element(%s), index=2
  %ncs = (s32[], s32[], u32[]) copy-start(%n)
  %ncd = s32[] copy-done(%ncs)
  %i = s32[] get-tuple-element(%s), index=0
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  %zero = s32[] constant(0)
  %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_vec, backend_config={"estimated_cycles":"10","cost_model_type":"COST_MODEL_TYPE_INVALID"}
  %init = (s32[], s32[], f32[8]{0}) tuple(%zero, %i1, %y)
  %w_inner = (s32[], s32[], f32[8]{0}) while(%init), condition=%inner_cond, body=%inner_body
  %z = f32[8]{0} get-tuple-element(%w_inner), index=2
  ROOT %t = (s32[], f32[8]{0}, s32[]) tuple(%i1, %z, %ncd)
}

%br_true (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_vec, backend_config={"estimated_cycles":"50","cost_model_type":"COST_MODEL_TYPE_INVALID"}
}

%br_false (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_vec, backend_config={"estimated_cycles":"5000","cost_model_type":"COST_MODEL_TYPE_INVALID"}
}

ENTRY %main (a: bf16[128,128], b: bf16[128,128], v: f32[8], big: f32[256,256]) -> f32[8] {
  %a = bf16[128,128]{1,0} parameter(0)
  %b = bf16[128,128]{1,0} parameter(1)
  %v = f32[8]{0} parameter(2)
  %big = f32[256,256]{1,0} parameter(3)
  %mm = f32[128,128]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_mm, backend_config={"estimated_cycles":"1000","cost_model_type":"COST_MODEL_TYPE_CLASSIC"}
  %cs = (f32[256,256]{1,0}, f32[256,256]{1,0:S(1)}, u32[]) copy-start(%big)
  %cd = f32[256,256]{1,0:S(1)} copy-done(%cs)
  %zero = s32[] constant(0)
  %five = s32[] constant(5)
  %init = (s32[], f32[8]{0}, s32[]) tuple(%zero, %v, %five)
  %w = (s32[], f32[8]{0}, s32[]) while(%init), condition=%outer_cond, body=%outer_body
  %x = f32[8]{0} get-tuple-element(%w), index=1
  %p = pred[] constant(true)
  %c = f32[8]{0} conditional(%p, %x, %x), true_computation=%br_true, false_computation=%br_false
  ROOT %k = f32[8]{0} custom-call(%c), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "xyz", "cost_estimate": {"flops": 197000000000, "transcendentals": 0, "bytes_accessed": 1000}}}
}
"""


def test_hand_written_hlo_known_answer():
    est = tpu_cost.estimate_text(HLO, "v5e")
    clock = tpu_cost.clock_hz("v5e")
    assert clock == pytest.approx(197e12 / (4 * 128 * 128 * 2))
    inner_trips = sum(i + 1 for i in range(5))  # 15
    xla = 1000 + 5 * 10 + inner_trips * 7 + 50
    assert est.xla_cycles == xla
    assert est.pallas_cycles == pytest.approx(1e-3 * clock)
    assert est.total_cycles == pytest.approx(xla + 1e-3 * clock)
    loops = {lp["loop"]: lp for lp in est.loops}
    outer = next(lp for lp in loops.values() if lp["depth"] == 1)
    inner = next(lp for lp in loops.values() if lp["depth"] == 2)
    assert (outer["trip_min"], outer["trip_max"], outer["iterations"]) == (5, 5, 5)
    assert (inner["trip_min"], inner["trip_max"], inner["iterations"]) == (1, 5, inner_trips)
    assert inner["instances"] == 5
    assert inner["region"].startswith("variable-trip")
    assert outer["inclusive_cycles"] == 5 * 10 + inner_trips * 7
    assert est.by_class["matmul"] == 1000
    assert est.by_cost_model["COST_MODEL_TYPE_CLASSIC"] == 1000
    assert est.async_bytes == {"copy-start": 256 * 256 * 4 + 5 * 4}
    assert est.pallas[0]["has_cost_estimate"] and est.pallas[0]["calls"] == 1


def test_unknown_predicate_counts_the_most_expensive_branch():
    text = HLO.replace("%p = pred[] constant(true)", "%p = pred[] parameter(4)")
    est = tpu_cost.estimate_text(text, "v5e")
    assert est.xla_cycles == 1000 + 5 * 10 + 15 * 7 + 5000
    assert any("predicate unknown" in n for n in est.notes)


def test_scalar_interpreter_integer_semantics():
    m = tpu_cost.parse_hlo(
        """HloModule s
ENTRY %e (a: s32[], b: s32[]) -> (s32[], s32[], s32[], u32[]) {
  %a = s32[] parameter(0)
  %b = s32[] parameter(1)
  %d = s32[] divide(%a, %b)
  %r = s32[] remainder(%a, %b)
  %n = s32[] negate(%a)
  %low = s32[] and(%a, %n)
  %u = u32[] convert(%a)
  ROOT %t = (s32[], s32[], s32[], u32[]) tuple(%d, %r, %low, %u)
}
"""
    )
    assert tpu_cost.evaluate(m, m.entry, (-7, 2)) == (-3, -1, 1, 2**32 - 7)
    assert tpu_cost.evaluate(m, m.entry, (12, 5))[2] == 4  # lowbit(12)


# ----------------------------------------------------------------------------- compiled programs
@pytest.fixture(scope="module")
def v5e():
    """One TPU v5e chip from libtpu's topology description (a test dependency, as in test_aot_compile)."""
    import libtpu  # noqa: F401  (a test dependency; compiles for TPU need it)

    return tpu_cost.tpu_devices("v5e:1x1")[0]


def _estimate(fn, *shapes, device):
    import jax
    from jax.sharding import SingleDeviceSharding

    sh = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes]
    compiled = jax.jit(fn).lower(*args).compile()
    return tpu_cost.estimate_text(compiled.as_text(), "v5e")


def test_large_bf16_matmul_near_peak(v5e):
    import jax.numpy as jnp

    m = n = k = 4096
    est = _estimate(
        lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
        ((m, k), jnp.bfloat16),
        ((k, n), jnp.bfloat16),
        device=v5e,
    )
    ideal_ms = 1e3 * 2 * m * n * k / tpu_cost.CHIPS["v5e"]["peak"]
    assert 1 / 1.3 <= est.ms / ideal_ms <= 1.3, (est.ms, ideal_ms)
    assert est.by_class["matmul"] / est.total_cycles > 0.9


def _scan_program(k: int):
    import jax
    import jax.numpy as jnp

    def f(x, w):
        def body(c, _):
            return jnp.tanh(jnp.matmul(c, w, preferred_element_type=jnp.float32)).astype(
                c.dtype
            ), None

        return jax.lax.scan(body, x, None, length=k)[0]

    return f


def test_scan_of_k_bodies_is_k_times_one_body(v5e):
    import jax.numpy as jnp

    shapes = (((256, 512), jnp.bfloat16), ((512, 512), jnp.bfloat16))
    ests = {k: _estimate(_scan_program(k), *shapes, device=v5e) for k in (6, 12)}
    body = {}
    for k, est in ests.items():
        (loop,) = est.loops
        assert (loop["trip_min"], loop["trip_max"], loop["iterations"]) == (k, k, k)
        assert loop["exclusive_cycles"] % k == 0
        body[k] = loop["exclusive_cycles"] // k
        assert body[k] > 0
    assert body[6] == body[12]
    top = {k: e.total_cycles - e.loops[0]["inclusive_cycles"] for k, e in ests.items()}
    assert ests[12].total_cycles - ests[6].total_cycles == 6 * body[6] + (top[12] - top[6])
    assert top[12] == top[6]


def test_inner_bound_depends_on_outer_counter(v5e):
    import jax
    import jax.numpy as jnp

    n = 6

    def f(x, w):
        def outer(i, c):
            def inner(_, d):
                return jnp.tanh(jnp.matmul(d, w, preferred_element_type=jnp.float32)).astype(
                    d.dtype
                )

            return jax.lax.fori_loop(0, i + 1, inner, c)

        return jax.lax.fori_loop(0, n, outer, x)

    est = _estimate(f, ((128, 256), jnp.bfloat16), ((256, 256), jnp.bfloat16), device=v5e)
    inner = [lp for lp in est.loops if lp["depth"] == 2]
    assert len(inner) == 1
    lp = inner[0]
    assert (lp["trip_min"], lp["trip_max"]) == (1, n)
    assert lp["iterations"] == n * (n + 1) // 2
    assert lp["instances"] == n
    assert lp["exclusive_cycles"] % lp["iterations"] == 0


def test_pallas_kernel_counts_as_its_cost_estimate():
    """A compiled Pallas TPU kernel (tpu_custom_call) counts as its declared CostEstimate."""
    import jax
    import jax.numpy as jnp
    import libtpu  # noqa: F401  (a test dependency; compiles for TPU need it)
    from jax.experimental import pallas as pl
    from jax.experimental import topologies
    from jax.sharding import PartitionSpec as P

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def f(x):
        cost = pl.CostEstimate(flops=394_000_000, transcendentals=0, bytes_accessed=8192)
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return pl.pallas_call(kernel, out_shape=out, cost_estimate=cost)(x)

    tpu_cost.tpu_devices("v5e:1x1")  # sets ALLOW_MULTIPLE_LIBTPU_LOAD
    topo = topologies.get_topology_desc("v5e:1x1", platform="tpu", chips_per_host_bounds=[1, 1, 1])
    mesh = topologies.make_mesh(topo, (1,), ("data",))
    sharded = jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(sharded).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32)).compile()
    est = tpu_cost.estimate_text(compiled.as_text(), "v5e")
    (kernel_row,) = est.pallas
    assert kernel_row["has_cost_estimate"] and kernel_row["calls"] == 1
    # 394 MFLOP at 197 TFLOP/s = 2 us (the bytes are negligible) at the 1.503 GHz clock
    assert kernel_row["cycles"] == pytest.approx(2e-6 * tpu_cost.clock_hz("v5e"))
    assert est.by_class["pallas"] == pytest.approx(kernel_row["cycles"])


def test_results_rows_merge_by_key_and_render(tmp_path):
    def row(label, model, block, ms):
        return {
            "label": label,
            "kind": "layer",
            "model": model,
            "block_type": block,
            "topology": "v5e:1x1",
            "shape": {
                "batch": 2,
                "seq_len": 8,
                "d_model": 8,
                "n_heads": 2,
                "n_kv_heads": None,
                "ff": 16,
                "dtype": "bfloat16",
                "position": "alibi",
                **({"leaf": 4, "impl": "tiled"} if block == "recurrent" else {}),
            },
            "estimated_ms": ms,
            "roofline_ms": 1.0,
            "total_cycles": ms * 1.5e6,
            "by_region": {"top level": ms * 1.5e6},
            "by_class": {"vector": ms * 1.5e6},
            "by_cost_model": {},
            "async_bytes": {},
            "loops": [],
            "pallas": [],
            "notes": [],
            "compile_s": 1.0,
            "command": "cmd",
            "commit": "abc",
            "machine": "m",
        }

    tpu_cost.write_results(
        [
            row("before", "transformer", "transformer", 2.0),
            row("before", "rt-tiled-leaf4", "recurrent", 6.0),
        ],
        tmp_path,
    )
    tpu_cost.write_results(
        [
            row("after", "transformer", "transformer", 2.0),
            row("after", "rt-tiled-leaf4", "recurrent", 4.0),
            row("before", "rt-tiled-leaf4", "recurrent", 8.0),
        ],
        tmp_path,
    )
    tpu_cost.write_results([row("rt-only", "rt-tiled-leaf4", "recurrent", 5.0)], tmp_path)
    rows = json.loads((tmp_path / "tpu_cost.json").read_text())["rows"]
    assert len(rows) == 5
    md = (tmp_path / "tpu_cost.md").read_text()
    assert "| 4.00x |" in md and "| 2.00x |" in md and "| 3.00x |" not in md
    assert "| 2.50x (vs before) |" in md


def test_train_step_rows_compare_with_the_transformer_of_the_same_depth():
    def row(model, ms):
        return {
            "label": "t",
            "kind": "train-step",
            "model": model,
            "topology": "v5e:1x1",
            "shape": {"preset": "p", "batch": 16},
            "estimated_ms": ms,
        }

    rows = [
        row("transformer-12L", 2.0),
        row("transformer-6L", 4.0),
        row("recurrent-12L", 6.0),
        row("recurrent-6L", 6.0),
    ]
    rat = {k[2]: v for k, v in tpu_cost.ratios(rows).items()}
    assert rat == {
        "transformer-12L": "1.00x",
        "transformer-6L": "1.00x",
        "recurrent-12L": "3.00x",
        "recurrent-6L": "1.50x",
    }


def test_readme_table_is_generated_from_results():
    """The README's TPU-estimate table equals the one rendered from results/tpu_cost.json."""
    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "results" / "tpu_cost.json").read_text())["rows"]
    readme = (root / "README.md").read_text()
    assert tpu_cost.readme_section(rows) in readme, (
        "README's TPU table is stale: run python -m experiments.tpu_cost --render-only"
    )
