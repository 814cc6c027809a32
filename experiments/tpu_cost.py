"""The TPU compiler's own cost estimate of a program, compiled ahead of time from this CPU.

Compile one layer forward+backward (``--layer``: the tiled Recurrent Transformer layer against the
Transformer layer) or a whole train step of a preset (``--train-step``) for a TPU topology with
libtpu (``v5e:1x1``, ``chips_per_host_bounds=[1, 1, 1]``), then read ``compiled.as_text()``:

* every instruction whose backend_config carries ``"estimated_cycles"`` (fusions, copies, lone
  reduces...) costs that many cycles, once per execution;
* a while loop runs its body as many times as its own counter says: the condition and the body's
  scalar outputs are evaluated by a small scalar interpreter of the HLO (constants, tuples,
  integer arithmetic, compares, selects, scalar fusions), iteration by iteration when the body
  holds loops or conditionals of its own (so inner bounds that depend on the outer counter, as in
  the Fenwick merges, are counted exactly), else once with the counted trip count;
* a conditional runs the branch its predicate picks when the predicate is known, else the most
  expensive branch (and says so in ``notes``);
* a Pallas kernel (``tpu_custom_call``) has no estimated_cycles: it counts as the roofline time of
  the ``pl.CostEstimate`` it declares (max of FLOPs / peak and bytes / HBM bandwidth), or as
  uncosted (listed) when it declares none;
* async copies and slices (``copy-start``, ``slice-start``...) are uncosted by the compiler: their
  bytes are summed and reported beside the estimate.

Cycles become time at the chip clock (v5e: 197 TFLOP/s = 4 MXUs x 128^2 x 2 x f, so f = 1.503 GHz).
The breakdown splits the cycles by loop (innermost fixed-trip loops nested in another loop: RT's
per-position steps; loops whose trip count varies between instances: the Fenwick merges; other loop
bodies; top level), by instruction class (matmul fusions = those holding a convolution/dot; copies;
dynamic slice/update fusions; converts; other vector fusions) and by the compiler's cost-model type
(``COST_MODEL_TYPE_CLASSIC`` vs ``COST_MODEL_TYPE_INVALID``...). See docs/tpu_cost.md for what the
estimate cannot see.

Commands that wrote results/tpu_cost.{json,md} (see the .md for each row's exact command):

    JAX_PLATFORMS=cpu python -m experiments.tpu_cost --layer --batch 16 --seq-len 512 \
        --d-model 1024 --n-heads 16 --ff 4096 --leaf 32 128 --label before
    JAX_PLATFORMS=cpu python -m experiments.tpu_cost --train-step --preset paper-150m \
        --models transformer-12L,recurrent-12L --set data.batch_size=16 --set microbatches=2 \
        --label before
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- chip constants
CHIPS: dict[str, dict[str, float]] = {
    # peak bf16 FLOP/s, MXUs, MXU side, HBM bytes/s (published spec sheets)
    "v5e": {"peak": 197e12, "mxus": 4, "mxu": 128, "hbm_bw": 819e9},
    "v6e": {"peak": 918e12, "mxus": 2, "mxu": 256, "hbm_bw": 1640e9},
    "v5p": {"peak": 459e12, "mxus": 4, "mxu": 128, "hbm_bw": 2765e9},
}


def chip_of(topology: str) -> str:
    """The chip name ("v5e") of a topology string ("v5e:1x1")."""
    chip = topology.split(":")[0].lower()
    if chip not in CHIPS:
        raise ValueError(f"--topology {topology!r}: chip must be one of {sorted(CHIPS)}")
    return chip


def clock_hz(chip: str) -> float:
    """Core clock implied by the bf16 peak: peak = MXUs x side^2 x 2 FLOPs x f."""
    c = CHIPS[chip]
    return c["peak"] / (c["mxus"] * c["mxu"] ** 2 * 2)


# ----------------------------------------------------------------------------- HLO text parsing
_SCALAR_RE = re.compile(r"^(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[\]")
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class Instr:
    """One HLO instruction of the compiled module (only what the estimate needs)."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False

    def attr(self, key: str) -> str | None:
        """The value of ``key=%name`` / ``key=WORD`` in the attributes, else None."""
        m = re.search(r"\b" + re.escape(key) + r"=%?([A-Za-z0-9_.\-]+)", self.attrs)
        return m.group(1) if m else None

    def called(self) -> list[str]:
        """Every computation this instruction calls (calls, to_apply, body, branches...)."""
        out = []
        for key in ("calls", "to_apply", "condition", "body", "true_computation"):
            v = self.attr(key)
            if v:
                out.append(v)
        v = self.attr("false_computation")
        if v:
            out.append(v)
        m = re.search(r"branch_computations=\{([^}]*)\}", self.attrs)
        if m:
            out += [s.strip().lstrip("%") for s in m.group(1).split(",") if s.strip()]
        return out

    @property
    def cycles(self) -> int | None:
        """The compiler's estimated_cycles of this instruction, None if it carries none."""
        m = re.search(r'"estimated_cycles":"?(\d+)', self.attrs)
        return int(m.group(1)) if m else None

    @property
    def cost_model_type(self) -> str:
        """The compiler's cost-model type for this instruction ("" if none)."""
        m = re.search(r'"cost_model_type":"([A-Z_]+)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def op_name(self) -> str:
        """metadata op_name (the jax named-scope path), "" if absent."""
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def stack_frame_id(self) -> int | None:
        """metadata stack_frame_id, None if absent."""
        m = re.search(r"stack_frame_id=(\d+)", self.attrs)
        return int(m.group(1)) if m else None


@dataclasses.dataclass
class Module:
    """A parsed compiled HLO module: computations by name, the entry, and source locations."""

    computations: dict[str, list[Instr]]
    entry: str
    frames: dict[int, str]  # stack_frame_id -> "file.py:function:line"

    def instr_map(self, comp: str) -> dict[str, Instr]:
        """Instructions of one computation by name."""
        return {i.name: i for i in self.computations[comp]}


def _split_top(s: str) -> list[str]:
    """Split on commas at bracket depth 0."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _match_paren(s: str, start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in HLO line: {s[:200]}")


_COMMENT = re.compile(r"/\*.*?\*/")
_INSTR_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([A-Za-z0-9_.\-]+)\s*=\s*")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([A-Za-z0-9_.\-]+)\s*\(.*\{\s*$")


def parse_instr(line: str) -> Instr | None:
    """One instruction line -> Instr (None for lines that are not instructions)."""
    m = _INSTR_HEAD.match(line)
    if not m:
        return None
    line = _COMMENT.sub("", line)
    rest = line[m.end() :]
    if rest.startswith("("):
        end = _match_paren(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        sp = rest.find(" ")
        if sp < 0:
            return None
        shape, rest = rest[:sp], rest[sp + 1 :].lstrip()
    om = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if not om:
        return None
    opcode = om.group(1)
    close = _match_paren(rest, om.end() - 1)
    operands = _split_top(rest[om.end() : close])
    if opcode != "constant":  # "f32[2] %x" or "%x" -> "x"
        operands = [o.split()[-1].lstrip("%") if o else o for o in operands]
    attrs = rest[close + 1 :]
    return Instr(m.group(2), shape, opcode, operands, attrs, root=bool(m.group(1)))


def parse_hlo(text: str) -> Module:
    """Parse ``compiled.as_text()`` (or a hand-written HLO module) into a Module."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = None, None
    files: dict[int, str] = {}
    funcs: dict[int, str] = {}
    locs: dict[int, tuple[int, int, int]] = {}
    frame_loc: dict[int, int] = {}
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if cur is None:
            if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = stripped
                continue
            if section and stripped and stripped[0].isdigit():
                idx, _, val = stripped.partition(" ")
                if section == "FileNames":
                    files[int(idx)] = val.strip('"')
                elif section == "FunctionNames":
                    funcs[int(idx)] = val.strip('"')
                elif section == "FileLocations":
                    f = re.search(r"file_name_id=(\d+)", val)
                    fn = re.search(r"function_name_id=(\d+)", val)
                    ln = re.search(r"\bline=(\d+)", val)
                    if f and fn and ln:
                        locs[int(idx)] = (int(f.group(1)), int(fn.group(1)), int(ln.group(1)))
                elif section == "StackFrames":
                    fl = re.search(r"file_location_id=(\d+)", val)
                    if fl:
                        frame_loc[int(idx)] = int(fl.group(1))
                continue
            m = _COMP_HEAD.match(line)
            if m and not line.startswith("HloModule"):
                section = None
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        if stripped == "}":
            cur = None
            continue
        instr = parse_instr(line)
        if instr is not None:
            comps[cur].append(instr)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    frames = {}
    for fid, lid in frame_loc.items():
        if lid in locs:
            f, fn, ln = locs[lid]
            frames[fid] = f"{os.path.basename(files.get(f, '?'))}:{funcs.get(fn, '?')}:{ln}"
    return Module(comps, entry, frames)


def shape_bytes(shape: str) -> int:
    """Bytes of every array in a shape string (a tuple's elements summed)."""
    total = 0.0
    for dtype, dims in _ARRAY_RE.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


# ----------------------------------------------------------------------------- scalar interpreter
_BITS = {"s8": 8, "s16": 16, "s32": 32, "s64": 64, "u8": 8, "u16": 16, "u32": 32, "u64": 64}
_INT_TYPES = set(_BITS) | {"pred"}
MAX_ARRAY = 1 << 16  # small integer arrays (leaf indices, schedules) are evaluated too


def _array_type(shape: str) -> tuple[str, tuple[int, ...]] | None:
    """(dtype, dims) of a non-tuple array shape string, None for tuples."""
    if shape.startswith("("):
        return None
    m = re.match(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", shape)
    if m is None:
        return None
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


def _wrap_np(a: Any, dtype: str) -> Any:
    """numpy value -> the HLO type's semantics (integer wrap-around, bool, float)."""
    a = np.asarray(a)
    if dtype == "pred":
        return a.astype(bool)
    if dtype in _BITS:
        bits = _BITS[dtype]
        a = np.asarray(a, dtype=object) if a.dtype == object else a.astype(np.int64)
        a = np.mod(a, 1 << bits) if bits < 64 else np.mod(a.astype(object), 1 << 64)
        if dtype.startswith("s"):
            a = np.where(a >= (1 << (bits - 1)), a - (1 << bits), a)
        return a.astype(np.int64) if bits < 64 or dtype.startswith("s") else a
    return a.astype(np.float64)


def _out(a: Any, shape: str) -> Any:
    """numpy result -> a Python scalar for rank-0 shapes, a small array otherwise (or None)."""
    at = _array_type(shape)
    if at is None or a is None:
        return None
    dtype, dims = at
    a = _wrap_np(a, dtype)
    if dims:
        return np.broadcast_to(a, dims).copy() if a.size in (1, math.prod(dims)) else None
    if a.size != 1:
        return None
    v = a.reshape(()).item()
    return bool(v) if dtype == "pred" else v


def _literal(text: str, shape: str) -> Any:
    at = _array_type(shape)
    if at is None:
        return None
    nums = re.findall(r"true|false|[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|inf|nan)", text)
    if not nums:
        return None
    vals = [n == "true" if n in ("true", "false") else float(n) for n in nums]
    dtype, dims = at
    if dtype in _INT_TYPES:
        vals = [int(v) for v in vals]
    if math.prod(dims) != len(vals):
        return None
    return _out(np.array(vals).reshape(dims), shape)


def _int_div(a: Any, b: Any) -> Any:
    q = np.abs(a) // np.abs(b)
    return np.where((a >= 0) == (b >= 0), q, -q)


class Evaluator:
    """Demand-driven evaluation of the small integer/bool/float values of one computation.

    Values: Python scalars for rank-0 arrays, numpy arrays for small integer arrays (iota,
    constants, dynamic slices of them), tuples for tuples, None where unknown (every large
    or data-dependent array).
    """

    def __init__(self, module: Module, comp: str, args: tuple):
        self.module = module
        self.instrs = module.instr_map(comp)
        self.comp = comp
        self.args = args
        self.memo: dict[str, Any] = {}

    def root(self) -> Any:
        """Value of the computation's ROOT (None where unknown)."""
        root = next(i for i in self.module.computations[self.comp] if i.root)
        return self.value(root.name)

    def value(self, name: str) -> Any:
        """Value of the named instruction: scalar, small array, nested tuple, or None."""
        if name in self.memo:
            return self.memo[name]
        instr = self.instrs.get(name)
        v = None if instr is None else self._eval(instr)
        self.memo[name] = v
        return v

    def _eval(self, ins: Instr) -> Any:
        op, shape = ins.opcode, ins.shape
        if op == "parameter":
            idx = int(ins.operands[0])
            return self.args[idx] if idx < len(self.args) else None
        if op == "get-tuple-element":
            t = self.value(ins.operands[0])
            idx = int(ins.attr("index"))
            return t[idx] if isinstance(t, tuple) and idx < len(t) else None
        if op == "tuple":
            return tuple(self.value(o) for o in ins.operands)
        if op == "copy-start":  # (destination, source, context): the value moves unchanged
            v = self.value(ins.operands[0])
            return (v, v, None)
        if op == "copy-done":
            t = self.value(ins.operands[0])
            return t[0] if isinstance(t, tuple) else None
        at = _array_type(shape)
        if at is None:
            return None
        dtype, dims = at
        if dims and (dtype not in _INT_TYPES or math.prod(dims) > MAX_ARRAY):
            return None
        if op == "constant":
            return _literal(ins.operands[0] if ins.operands else "", shape)
        if op == "iota":
            d = int(ins.attr("iota_dimension") or 0)
            idx = np.arange(dims[d]).reshape([-1 if i == d else 1 for i in range(len(dims))])
            return _out(np.broadcast_to(idx, dims), shape)
        if op in ("fusion", "call"):
            callee = ins.attr("calls") or ins.attr("to_apply")
            if callee is None or callee not in self.module.computations:
                return None
            args = tuple(self.value(o) for o in ins.operands)
            return _out(_np(Evaluator(self.module, callee, args).root()), shape)
        vals = [self.value(o) for o in ins.operands]
        if op == "select" and vals and vals[0] is not None and np.ndim(vals[0]) == 0:
            return _out(_np(vals[1] if vals[0] else vals[2]), shape)
        if any(v is None for v in vals):
            return None
        try:
            with np.errstate(all="ignore"):
                return _out(self._op(op, [np.asarray(v) for v in vals], ins, dims), shape)
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            return None

    def _op(self, op: str, v: list, ins: Instr, dims: tuple) -> Any:  # noqa: C901
        if op in ("copy", "convert", "bitcast-convert"):
            return v[0]
        if op in ("bitcast", "reshape"):
            return v[0].reshape(dims)
        if op == "broadcast":
            bd = [int(x) for x in re.findall(r"\d+", _attr_braces(ins.attrs, "dimensions"))]
            shape = [1] * len(dims)
            for i, d in enumerate(bd):
                shape[d] = v[0].shape[i]
            return np.broadcast_to(v[0].reshape(shape), dims)
        if op == "transpose":
            perm = [int(x) for x in re.findall(r"\d+", _attr_braces(ins.attrs, "dimensions"))]
            return np.transpose(v[0], perm)
        if op == "dynamic-slice":
            sizes = [
                int(x) for x in re.findall(r"\d+", _attr_braces(ins.attrs, "dynamic_slice_sizes"))
            ]
            a = v[0]
            starts = [int(np.clip(int(s), 0, a.shape[i] - sizes[i])) for i, s in enumerate(v[1:])]
            return a[tuple(slice(s, s + n) for s, n in zip(starts, sizes, strict=True))]
        if op == "slice":
            spec = re.findall(r"\[(\d+):(\d+)(?::(\d+))?\]", _attr_braces(ins.attrs, "slice"))
            return v[0][tuple(slice(int(a), int(b), int(c or 1)) for a, b, c in spec)]
        if op == "concatenate":
            d = int(re.findall(r"\d+", _attr_braces(ins.attrs, "dimensions"))[0])
            return np.concatenate(v, axis=d)
        if op == "reduce":
            return None
        a = v[0].astype(object) if v[0].dtype.kind in "iu" else v[0]
        b = (v[1].astype(object) if v[1].dtype.kind in "iu" else v[1]) if len(v) > 1 else None
        if op == "add":
            return a + b
        if op == "subtract":
            return a - b
        if op == "multiply":
            return a * b
        if op in ("divide", "remainder"):
            if np.any(b == 0):
                return None
            if v[0].dtype.kind in "iu":
                q = _int_div(a, b)
                return q if op == "divide" else a - b * q
            return a / b if op == "divide" else np.fmod(a, b)
        if op == "maximum":
            return np.maximum(a, b)
        if op == "minimum":
            return np.minimum(a, b)
        if op == "negate":
            return -a
        if op == "abs":
            return np.abs(a)
        if op == "sign":
            return np.sign(a)
        if op in ("and", "or", "xor"):
            if v[0].dtype == bool:
                return {"and": np.logical_and, "or": np.logical_or, "xor": np.logical_xor}[op](
                    v[0], v[1]
                )
            return {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[op](
                v[0].astype(np.int64), v[1].astype(np.int64)
            )
        if op == "not":
            return np.logical_not(v[0]) if v[0].dtype == bool else ~v[0].astype(np.int64)
        if op == "shift-left":
            return a * (2**b)
        if op in ("shift-right-arithmetic", "shift-right-logical"):
            at = _array_type(ins.shape)
            bits = _BITS.get(at[0], 32) if at else 32
            if op == "shift-right-logical":
                return np.mod(a, 1 << bits) // (2**b)
            return a // (2**b)
        if op == "clamp":
            return np.minimum(np.maximum(v[1], v[0]), v[2])
        if op == "select":
            return np.where(v[0], v[1], v[2])
        if op == "compare":
            d = ins.attr("direction")
            fn = {
                "EQ": np.equal,
                "NE": np.not_equal,
                "LT": np.less,
                "LE": np.less_equal,
                "GT": np.greater,
                "GE": np.greater_equal,
            }.get(d)
            return None if fn is None else fn(a, b)
        if op == "popcnt":
            return np.vectorize(lambda x: bin(int(x) % (1 << 64)).count("1"))(a)
        return None


def _freeze(v: Any) -> Any:
    """A hashable copy of an evaluator value (arrays -> (shape, items))."""
    if isinstance(v, tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, np.ndarray):
        return ("array", v.shape, tuple(v.reshape(-1).tolist()))
    return v


def _np(v: Any) -> Any:
    return None if v is None or isinstance(v, tuple) else np.asarray(v)


def _attr_braces(attrs: str, key: str) -> str:
    m = re.search(r"\b" + re.escape(key) + r"=\{([^}]*)\}", attrs)
    return m.group(1) if m else ""


def evaluate(module: Module, comp: str, args: tuple) -> Any:
    """The ROOT value of ``comp`` for the given (partially known) arguments."""
    return Evaluator(module, comp, args).root()


# ----------------------------------------------------------------------------- cost walk
_ASYNC_START = ("-start",)
_TRIVIAL = {
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
_MATMUL_OPS = {"convolution", "dot", "ragged-dot"}
_COPY_OPS = {"copy", "transpose", "bitcast", "reshape", "parameter", "tuple", "get-tuple-element"}
_SLICE_OPS = {"dynamic-slice", "dynamic-update-slice", "slice", "concatenate", "pad"}
MAX_TRIPS = 10_000_000


@dataclasses.dataclass
class Acc:
    """Cost accumulated over a (sub)program; every count is per execution of the whole program."""

    cycles: Counter = dataclasses.field(default_factory=Counter)  # (loop, cls, cmt) -> cycles
    iters: Counter = dataclasses.field(default_factory=Counter)  # loop -> body executions
    instances: Counter = dataclasses.field(default_factory=Counter)  # loop -> times entered
    trips: dict = dataclasses.field(default_factory=dict)  # loop -> set of trip counts
    async_bytes: Counter = dataclasses.field(default_factory=Counter)  # (loop, opcode) -> bytes
    pallas: Counter = dataclasses.field(default_factory=Counter)  # (loop, name, costed) -> cycles
    pallas_calls: Counter = dataclasses.field(default_factory=Counter)  # (loop, name, costed) -> n
    uncosted: Counter = dataclasses.field(default_factory=Counter)  # opcode -> executions
    notes: set = dataclasses.field(default_factory=set)

    def add(self, other: Acc, times: int = 1) -> None:
        """self += times x other."""
        if times == 0:
            return
        for field in ("cycles", "iters", "instances", "async_bytes", "pallas", "pallas_calls"):
            mine, theirs = getattr(self, field), getattr(other, field)
            for k, v in theirs.items():
                mine[k] += v * times
        for k, v in other.uncosted.items():
            self.uncosted[k] += v * times
        for k, v in other.trips.items():
            self.trips.setdefault(k, set()).update(v)
        self.notes |= other.notes


@dataclasses.dataclass(frozen=True)
class LoopInfo:
    """Static facts about one while loop of the module."""

    name: str
    comp: str  # the computation holding the while instruction
    body: str
    cond: str
    op_name: str
    source: str
    known_trip_count: int | None


class CostModel:
    """Walks a parsed module and accumulates the compiler's estimated cycles (see the module doc)."""

    def __init__(self, module: Module, chip: str = "v5e"):
        self.m = module
        self.chip = chip
        self.clock = clock_hz(chip)
        self.loops: dict[str, LoopInfo] = {}
        self.parent: dict[str, str | None] = {}
        self._static: dict[str, bool] = {}
        self._class: dict[str, str] = {}
        self._memo: dict[tuple, Acc] = {}
        for comp, instrs in module.computations.items():
            for ins in instrs:
                if ins.opcode == "while":
                    ktc = re.search(r'"known_trip_count":\{"n":"?(\d+)', ins.attrs)
                    self.loops[ins.name] = LoopInfo(
                        ins.name,
                        comp,
                        ins.attr("body"),
                        ins.attr("condition"),
                        ins.op_name,
                        module.frames.get(ins.stack_frame_id or -1, ""),
                        int(ktc.group(1)) if ktc else None,
                    )

    # -- static properties of computations
    def is_static(self, comp: str) -> bool:
        """True when the computation's cost cannot depend on its arguments (no loops/branches)."""
        if comp not in self._static:
            self._static[comp] = True  # recursion guard
            ok = True
            for ins in self.m.computations.get(comp, []):
                if ins.opcode in ("while", "conditional"):
                    ok = False
                    break
                if ins.opcode not in ("fusion",) and any(
                    not self.is_static(c) for c in ins.called() if c in self.m.computations
                ):
                    ok = False
                    break
            self._static[comp] = ok
        return self._static[comp]

    def _ops_in(self, comp: str, seen: set | None = None) -> set[str]:
        seen = set() if seen is None else seen
        if comp in seen or comp not in self.m.computations:
            return set()
        seen.add(comp)
        ops = set()
        for ins in self.m.computations[comp]:
            ops.add(ins.opcode)
            for c in ins.called():
                ops |= self._ops_in(c, seen)
        return ops

    def instr_class(self, ins: Instr) -> str:
        """matmul / copy / slice-update / convert / vector for a costed instruction."""
        if ins.opcode in _MATMUL_OPS:
            return "matmul"
        if ins.opcode in ("copy", "transpose"):
            return "copy"
        if ins.opcode != "fusion":
            return "vector"
        callee = ins.attr("calls") or ""
        if callee not in self._class:
            ops = self._ops_in(callee)
            if ops & _MATMUL_OPS:
                cls = "matmul"
            elif ops <= _COPY_OPS:
                cls = "copy"
            elif ops & {"dynamic-slice", "dynamic-update-slice"} and ops <= (
                _COPY_OPS
                | _SLICE_OPS
                | {"constant", "convert", "select", "broadcast", "compare"}
                | {"add", "subtract", "multiply", "clamp"}
            ):
                cls = "slice-update"
            elif ops <= _COPY_OPS | {"convert", "broadcast"} and "convert" in ops:
                cls = "convert"
            else:
                cls = "vector"
            self._class[callee] = cls
        return self._class[callee]

    # -- the walk
    def walk(self, comp: str, args: tuple, loop: str | None) -> Acc:
        """Cost of one execution of ``comp`` with (partially known) ``args`` inside ``loop``."""
        key = (comp, None if self.is_static(comp) else _freeze(args), loop)
        if key in self._memo:
            return self._memo[key]
        acc = Acc()
        ev = Evaluator(self.m, comp, args)
        for ins in self.m.computations[comp]:
            op = ins.opcode
            if op == "while":
                self._while(ins, ev, loop, acc)
                continue
            if op == "conditional":
                self._conditional(ins, ev, loop, acc)
                continue
            if op == "call" or (op == "async-start" and ins.attr("calls")):
                callee = ins.attr("to_apply") or ins.attr("calls")
                cargs = tuple(ev.value(o) for o in ins.operands)
                acc.add(self.walk(callee, cargs, loop))
            if op == "custom-call" and "tpu_custom_call" in ins.attrs:
                self._pallas(ins, loop, acc)
                continue
            c = ins.cycles
            if c is not None:
                acc.cycles[(loop, self.instr_class(ins), ins.cost_model_type or "NONE")] += c
            elif op.endswith("-start"):
                acc.async_bytes[(loop, op)] += shape_bytes(_async_payload(ins))
            elif op not in _TRIVIAL and not op.endswith("-done") and op != "call":
                acc.uncosted[op] += 1
        self._memo[key] = acc
        return acc

    def _pallas(self, ins: Instr, loop: str | None, acc: Acc) -> None:
        name = _kernel_name(ins)
        m = re.search(r'"cost_estimate"\s*:\s*\{([^}]*)\}', ins.attrs)
        if m is None:
            acc.pallas_calls[(loop, name, False)] += 1
            acc.notes.add(f"Pallas kernel {name} declares no CostEstimate: uncosted")
            return
        est = dict(re.findall(r'"(\w+)"\s*:\s*"?([0-9.eE+\-]+)', m.group(1)))
        flops = float(est.get("flops", 0))
        bytes_ = float(est.get("bytes_accessed", 0))
        chip = CHIPS[self.chip]
        seconds = max(flops / chip["peak"], bytes_ / chip["hbm_bw"])
        acc.pallas[(loop, name, True)] += seconds * self.clock
        acc.pallas_calls[(loop, name, True)] += 1

    def _conditional(self, ins: Instr, ev: Evaluator, loop: str | None, acc: Acc) -> None:
        branches = ins.called()
        pred = ev.value(ins.operands[0])
        bargs = [(ev.value(o),) for o in ins.operands[1:]]
        if pred is not None:
            if isinstance(pred, bool):  # true_computation, false_computation
                idx = 0 if pred else 1
            else:
                idx = pred if 0 <= pred < len(branches) else len(branches) - 1
            acc.add(self.walk(branches[idx], bargs[idx], loop))
            return
        costs = [self.walk(b, a, loop) for b, a in zip(branches, bargs, strict=False)]
        totals = [_total(c) for c in costs]
        best = max(range(len(costs)), key=lambda i: totals[i])
        acc.add(costs[best])
        acc.notes.add(
            f"conditional {ins.name}: predicate unknown, counted its most expensive branch "
            f"({', '.join(f'{b}={t:.0f}' for b, t in zip(branches, totals, strict=False))} cycles)"
        )

    def _while(self, ins: Instr, ev: Evaluator, loop: str | None, acc: Acc) -> None:
        info = self.loops[ins.name]
        self.parent.setdefault(ins.name, loop)
        state = ev.value(ins.operands[0])
        static = self.is_static(info.body)
        cond_static = self.is_static(info.cond)
        trips, sub = 0, Acc()
        unknown = False
        while True:
            c = evaluate(self.m, info.cond, (state,))
            if c is None:
                unknown = True
                break
            if not c:
                break
            if not static:
                sub.add(self.walk(info.body, (state,), ins.name))
            if not cond_static:
                sub.add(self.walk(info.cond, (state,), ins.name))
            state = evaluate(self.m, info.body, (state,))
            trips += 1
            if trips > MAX_TRIPS:
                raise ValueError(f"while {ins.name}: more than {MAX_TRIPS} iterations")
        if unknown:
            if trips:
                acc.notes.add(f"while {ins.name}: condition unknown after {trips} iterations")
            elif info.known_trip_count is not None:
                trips = info.known_trip_count
                acc.notes.add(f"while {ins.name}: trip count from known_trip_count={trips}")
                if not static:
                    sub.add(self.walk(info.body, (None,), ins.name), trips)
            else:
                trips = 1
                acc.notes.add(f"while {ins.name}: trip count unknown, counted once")
                if not static:
                    sub.add(self.walk(info.body, (None,), ins.name), trips)
        if static:
            sub.add(self.walk(info.body, (None,), ins.name), trips)
        if cond_static:
            sub.add(self.walk(info.cond, (None,), ins.name), trips + 1)
        sub.iters[ins.name] += trips
        sub.instances[ins.name] += 1
        sub.trips.setdefault(ins.name, set()).add(trips)
        acc.add(sub)


def _async_payload(ins: Instr) -> str:
    """The shape of the data an async start moves: its output's second tuple element if any."""
    if ins.shape.startswith("("):
        parts = _split_top(ins.shape[1:-1])
        if len(parts) >= 2:
            return parts[1]
    return ins.shape


def _kernel_name(ins: Instr) -> str:
    m = re.search(r'kernel_name\\?"?\s*[:=]\s*\\?"([A-Za-z0-9_.\-]+)', ins.attrs)
    if m:
        return m.group(1)
    parts = ins.op_name.split("/")
    if len(parts) > 1 and parts[-1] == "pallas_call":  # pallas_call(name=...) scopes the call
        return parts[-2]
    return parts[-1] or ins.name


def _total(acc: Acc) -> float:
    return float(sum(acc.cycles.values()) + sum(acc.pallas.values()))


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Estimate:
    """The estimate of one compiled program, reduced to plain numbers (JSON-ready)."""

    chip: str
    clock_hz: float
    total_cycles: float
    xla_cycles: float
    pallas_cycles: float
    by_region: dict[str, float]
    by_class: dict[str, float]
    by_region_class: dict[str, dict[str, float]]
    by_cost_model: dict[str, float]
    loops: list[dict[str, Any]]
    async_bytes: dict[str, int]
    pallas: list[dict[str, Any]]
    uncosted_ops: dict[str, int]
    notes: list[str]

    @property
    def ms(self) -> float:
        """Estimated time in milliseconds at the chip clock."""
        return 1e3 * self.total_cycles / self.clock_hz

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with estimated_ms)."""
        return {**dataclasses.asdict(self), "estimated_ms": self.ms}


def estimate_module(module: Module, chip: str = "v5e") -> Estimate:
    """Run the cost walk over a parsed module and summarise it."""
    model = CostModel(module, chip)
    acc = model.walk(module.entry, tuple(), None)
    children: dict[str | None, list[str]] = {}
    for lp, parent in model.parent.items():
        children.setdefault(parent, []).append(lp)

    def depth(lp: str | None) -> int:
        d = 0
        while lp is not None:
            lp, d = model.parent.get(lp), d + 1
        return d

    def region(lp: str | None) -> str:
        if lp is None:
            return "top level"
        if len(acc.trips.get(lp, {0})) > 1:
            return "variable-trip loops (RT: Fenwick merges)"
        if not children.get(lp) and model.parent.get(lp) is not None:
            return "innermost fixed-trip loops in a loop (RT: per-position steps)"
        return "other loop bodies"

    excl: Counter = Counter()
    by_region: Counter = Counter()
    by_class: Counter = Counter()
    by_cmt: Counter = Counter()
    by_region_class: dict[str, Counter] = {}
    for (lp, cls, cmt), c in acc.cycles.items():
        excl[lp] += c
        by_region[region(lp)] += c
        by_region_class.setdefault(region(lp), Counter())[cls] += c
        by_class[cls] += c
        by_cmt[cmt] += c
    pallas_total = 0.0
    pallas_rows: Counter = Counter()
    pallas_n: Counter = Counter()
    for (lp, name, costed), c in acc.pallas.items():
        excl[lp] += c
        by_region[region(lp)] += c
        by_region_class.setdefault(region(lp), Counter())["pallas"] += c
        by_class["pallas"] += c
        by_cmt["PALLAS_COST_ESTIMATE"] += c
        pallas_total += c
        pallas_rows[(name, costed)] += c
    for (_lp, name, costed), n in acc.pallas_calls.items():
        pallas_n[(name, costed)] += n
    incl: dict[str, float] = {}

    def inclusive(lp: str) -> float:
        if lp not in incl:
            incl[lp] = excl[lp] + sum(inclusive(c) for c in children.get(lp, []))
        return incl[lp]

    total = float(sum(acc.cycles.values()) + pallas_total)
    loops = []
    for lp in model.parent:
        info = model.loops[lp]
        trips = sorted(acc.trips.get(lp, set()))
        async_b = sum(b for (lq, _), b in acc.async_bytes.items() if lq == lp)
        loops.append(
            {
                "loop": lp,
                "parent": model.parent[lp],
                "depth": depth(lp),
                "region": region(lp),
                "source": info.source,
                "op_name": info.op_name,
                "trip_min": trips[0] if trips else 0,
                "trip_max": trips[-1] if trips else 0,
                "instances": int(acc.instances[lp]),
                "iterations": int(acc.iters[lp]),
                "inclusive_cycles": inclusive(lp),
                "exclusive_cycles": float(excl[lp]),
                "async_bytes": int(async_b),
            }
        )
    loops.sort(key=lambda r: -r["inclusive_cycles"])
    async_by_op: Counter = Counter()
    for (_lp, op), b in acc.async_bytes.items():
        async_by_op[op] += b
    return Estimate(
        chip=chip,
        clock_hz=model.clock,
        total_cycles=total,
        xla_cycles=float(sum(acc.cycles.values())),
        pallas_cycles=pallas_total,
        by_region=dict(by_region),
        by_class=dict(by_class),
        by_region_class={k: dict(v) for k, v in by_region_class.items()},
        by_cost_model=dict(by_cmt),
        loops=loops,
        async_bytes={k: int(v) for k, v in async_by_op.items()},
        pallas=[
            {
                "kernel": n,
                "has_cost_estimate": c,
                "calls": int(pallas_n[(n, c)]),
                "cycles": float(pallas_rows[(n, c)]),
            }
            for (n, c) in pallas_n
        ],
        uncosted_ops=dict(acc.uncosted),
        notes=sorted(acc.notes),
    )


def estimate_text(text: str, chip: str = "v5e") -> Estimate:
    """Parse compiled HLO text and estimate it."""
    return estimate_module(parse_hlo(text), chip)


# ----------------------------------------------------------------------------- compiling for TPU
def tpu_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology, compiled for from this host (no TPU needed).

    Single-chip topologies ("v5e:1x1") need ``chips_per_host_bounds=[1, 1, 1]``.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    chip_of(topology)
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    kwargs: dict[str, Any] = {}
    if math.prod(dims) == 1:
        kwargs["chips_per_host_bounds"] = [1, 1, 1]
    return list(topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One layer's shape and implementation for ``estimate_layer``."""

    batch: int = 16
    seq_len: int = 512
    d_model: int = 1024
    n_heads: int = 16
    n_kv_heads: int | None = None
    ff: int = 4096
    dtype: str = "bfloat16"
    position: str = "alibi"
    leaf: int = 32
    impl: str = "tiled"
    attention: str = "xla"  # Transformer blocks: xla | flash (Pallas TPU flash attention)

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "d_model", "n_heads", "ff", "leaf"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LayerShape.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LayerShape.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )

    def model_config(self, block_type: str):
        """The one-layer ModelConfig of this shape (``block_type``: transformer | recurrent)."""
        from rt_jax.config import ModelConfig

        return ModelConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            mlp_hidden=self.ff,
            n_layers=1,
            block_type=block_type,
            impl=self.impl,
            position=self.position,
            compute_dtype=self.dtype,
            leaf_size=self.leaf,
            attention=self.attention,
        )


def layer_program(shape: LayerShape, block_type: str, device: Any):
    """(jitted fwd+bwd fn, abstract args) of one layer: (params, x, dz) -> (dparams, dx).

    Parameters and the residual stream are float32 (as in the model); matmuls run in
    ``shape.dtype``. The cotangent dz is an input, so nothing constant-folds.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from rt_jax.models.lm import layer_function
    from rt_jax.ops.block import param_shapes

    cfg = shape.model_config(block_type)
    spec, fn = cfg.attention_spec(), layer_function(cfg)
    sh = SingleDeviceSharding(device)
    params = {
        k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh)
        for k, s in param_shapes(shape.d_model, shape.ff, spec).items()
    }
    x = jax.ShapeDtypeStruct((shape.batch, shape.seq_len, shape.d_model), jnp.float32, sharding=sh)

    def fwd_bwd(p, x_BxNxD, dz_BxNxD):
        _, vjp = jax.vjp(lambda p, x: fn(p, x, spec), p, x_BxNxD)
        return vjp(dz_BxNxD)

    return jax.jit(fwd_bwd), (params, x, x)


def layer_roofline_s(shape: LayerShape, block_type: str, chip: str) -> float:
    """Analytic model FLOPs (rt_jax.train.flops, 3x forward) of one layer fwd+bwd / peak."""
    from rt_jax.train import flops

    cfg = shape.model_config(block_type)
    per_tok = sum(flops.layer_forward_flops_per_token(cfg, shape.seq_len).values())
    return flops.TRAIN_FACTOR * per_tok * shape.batch * shape.seq_len / CHIPS[chip]["peak"]


def _compile(jitted, args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _summarise(compiled, chip: str, compile_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    est = estimate_text(compiled.as_text(), chip)
    mem = compiled.memory_analysis()
    return {
        **est.to_json(),
        "compile_s": round(compile_s, 1),
        "estimate_s": round(time.perf_counter() - t0, 2),
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
    }


def layer_model_name(block_type: str, shape: LayerShape) -> str:
    """Row name: "transformer" (XLA attention), "transformer-flash" or "rt-<impl>-leaf<L>"."""
    if block_type == "transformer":
        return "transformer" + ("-flash" if shape.attention == "flash" else "")
    return f"rt-{shape.impl}-leaf{shape.leaf}"


def estimate_layer(
    shape: LayerShape, block_type: str, topology: str = "v5e:1x1", hlo_out: Path | None = None
) -> dict[str, Any]:
    """Compile one layer fwd+bwd for ``topology`` and return its estimate row (JSON-ready)."""
    import jax
    from jax.sharding import Mesh

    chip = chip_of(topology)
    dev = tpu_devices(topology)[0]
    # The target's platform comes from the mesh in context (Pallas kernels check it there).
    with jax.sharding.use_abstract_mesh(Mesh(np.array([dev]), ("data",)).abstract_mesh):
        jitted, args = layer_program(shape, block_type, dev)
        compiled, compile_s = _compile(jitted, args)
    if hlo_out is not None:
        hlo_out.write_text(compiled.as_text())
    row = _summarise(compiled, chip, compile_s)
    shape_d = dataclasses.asdict(shape)
    if block_type == "transformer":
        shape_d.pop("leaf")
        shape_d.pop("impl")
    return {
        "kind": "layer",
        "model": layer_model_name(block_type, shape),
        "block_type": block_type,
        "topology": topology,
        "shape": shape_d,
        "roofline_ms": 1e3 * layer_roofline_s(shape, block_type, chip),
        **row,
    }


def estimate_train_step(
    preset: str,
    point: str | None,
    topology: str = "v5e:1x1",
    overrides: Iterable[str] = (),
    hlo_out: Path | None = None,
) -> dict[str, Any]:
    """Compile one preset's train step (one compare point) for ``topology``; its estimate row."""
    from experiments.aot_compile import _cell_config
    from rt_jax.train import flops
    from rt_jax.train.sharding import make_mesh
    from rt_jax.train.step import build_train_step

    chip = chip_of(topology)
    devices = tpu_devices(topology)
    cfg = _cell_config(preset, list(overrides), point, [])
    mesh = make_mesh(cfg.mesh, devices)
    ts = build_train_step(cfg, mesh)
    compiled, compile_s = _compile(ts.step, (ts.abstract_state, ts.batch_spec))
    if hlo_out is not None:
        hlo_out.write_text(compiled.as_text())
    row = _summarise(compiled, chip, compile_s)
    model = cfg.model
    n_dev = int(mesh.devices.size)
    step_flops = flops.train_flops_per_step(model, cfg.data.seq_len, cfg.data.batch_size)
    return {
        "kind": "train-step",
        "model": point or f"{model.block_type}-{model.n_layers}L",
        "block_type": model.block_type,
        "topology": topology,
        "shape": {
            "preset": preset,
            "overrides": list(overrides),
            "batch": cfg.data.batch_size,
            "seq_len": cfg.data.seq_len,
            "microbatches": cfg.microbatches,
            "devices": n_dev,
            "impl": model.impl,
            "leaf": model.leaf_size,
            "dtype": model.compute_dtype,
        },
        "roofline_ms": 1e3 * step_flops / n_dev / CHIPS[chip]["peak"],
        **row,
    }


# ----------------------------------------------------------------------------- results files
def shape_key(row: dict[str, Any]) -> str:
    """The shape part of a row's key, without the fields that name the model (leaf, impl)."""
    s = {k: v for k, v in row["shape"].items() if k not in ("leaf", "impl", "attention")}
    if "overrides" in s:  # train steps: --set model.impl=... names the model too
        s["overrides"] = [o for o in s["overrides"] if not o.startswith(_MODEL_OVERRIDES)]
    return json.dumps({"topology": row["topology"], **s}, sort_keys=True)


_MODEL_OVERRIDES = ("model.impl=", "model.leaf_size=", "model.attention=")


def row_key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    """Rows are keyed (label, kind, model, shape): a new run replaces only its own rows."""
    return (row["label"], row["kind"], row["model"], shape_key(row))


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """old with every row of new replacing the row of the same key (or appended)."""
    out = {row_key(r): r for r in old}
    for r in new:
        out[row_key(r)] = r
    return list(out.values())


GIB = 1024**3
REGIONS = (
    ("innermost fixed-trip loops in a loop (RT: per-position steps)", "per-position"),
    ("variable-trip loops (RT: Fenwick merges)", "merges"),
    ("other loop bodies", "other loops"),
    ("top level", "top"),
)
CLASSES = ("matmul", "vector", "copy", "slice-update", "convert", "pallas")


def _pct(part: float, whole: float) -> str:
    return "-" if not whole else f"{100 * part / whole:.0f}%"


def _shape_text(row: dict[str, Any]) -> str:
    s = row["shape"]
    if row["kind"] == "layer":
        kv = f"/{s['n_kv_heads']}kv" if s.get("n_kv_heads") else ""
        return (
            f"B={s['batch']} N={s['seq_len']} D={s['d_model']} H={s['n_heads']}{kv}"
            f"x{s['d_model'] // s['n_heads']} F={s['ff']} {s['dtype']} {s['position']}"
        )
    ov = " ".join(s["overrides"])
    return f"{s['preset']} B={s['batch']}x{s['seq_len']}/{s['microbatches']} {ov}".strip()


def yardstick(row: dict[str, Any]) -> str:
    """The model name of a row's Transformer yardstick: ``transformer`` for a layer row; for a
    train-step row the Transformer compare point with the same layer count (``recurrent-12L`` ->
    ``transformer-12L``)."""
    if row["kind"] != "train-step":
        return "transformer"
    return "transformer-" + row["model"].rsplit("-", 1)[-1]


def ratios(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], str]:
    """Each row's estimate over its XLA-attention Transformer's (``yardstick``), by ``row_key``.

    The Transformer of the same label, kind and shape is the yardstick; a label without one is
    compared with the latest Transformer row of that kind and shape ("(vs L)")."""
    base = {(r["label"], r["kind"], r["model"], shape_key(r)): r["estimated_ms"] for r in rows}
    any_label = {
        (r["kind"], r["model"], shape_key(r)): (r["label"], r["estimated_ms"])
        for r in sorted(rows, key=lambda r: (r.get("date", ""), r["label"]))  # latest wins
    }
    out = {}
    for r in rows:
        yard = yardstick(r)
        ref = base.get((r["label"], r["kind"], yard, shape_key(r)))
        ratio = "-" if ref is None else f"{r['estimated_ms'] / ref:.2f}x"
        if ref is None and (r["kind"], yard, shape_key(r)) in any_label:
            other, ref = any_label[(r["kind"], yard, shape_key(r))]
            ratio = f"{r['estimated_ms'] / ref:.2f}x (vs {other})"
        out[row_key(r)] = ratio
    return out


README_BEGIN = "<!-- tpu_cost:begin (generated by python -m experiments.tpu_cost --render-only) -->"
README_END = "<!-- tpu_cost:end -->"


def readme_section(rows: list[dict[str, Any]]) -> str:
    """The README's TPU-estimate table, generated from the rows (between README_BEGIN/END)."""
    rat = ratios(rows)
    lines = [
        README_BEGIN,
        "| label | model | shape | topology | est. ms | ratio vs Transformer | per-position "
        "| CLASSIC (validated) share | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kind"], shape_key(r), r["label"], r["model"])):
        tot = r["total_cycles"]
        classic = r["by_cost_model"].get("COST_MODEL_TYPE_CLASSIC", 0.0)
        lines.append(
            f"| {r['label']} | {r['model']} | {_shape_text(r)} | {r['topology']} "
            f"| {r['estimated_ms']:.2f} | {rat[row_key(r)]} "
            f"| {_pct(r['by_region'].get(REGIONS[0][0], 0.0), tot)} | {_pct(classic, tot)} "
            f"| `{r['commit']}` |"
        )
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(rows: list[dict[str, Any]], readme: Path) -> None:
    """Replace the README's generated TPU-estimate section (markers must exist)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN!r} ... {README_END!r} markers to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + readme_section(rows) + tail)


def markdown(rows: list[dict[str, Any]]) -> str:
    """results/tpu_cost.md: the estimates, RT/Transformer ratios per label, and breakdowns."""
    lines = [
        "# TPU compiler cost estimates (ahead-of-time compiles from a CPU host)",
        "",
        "Estimated time = sum of the compiler's per-instruction `estimated_cycles` (while loops "
        "times their trip counts, derived from each loop's own counter) at the chip clock "
        "(v5e: 197 TFLOP/s / (4 MXU x 128^2 x 2) = 1.50 GHz). These are the compiler's "
        "estimates, not measurements: see docs/tpu_cost.md for what they cannot see. "
        "Roofline = analytic model FLOPs (rt_jax.train.flops, causal half, 3x forward) / bf16 peak. "
        "ratio = estimate / the Transformer's estimate in the same label, kind and shape "
        '("vs L": label L\'s Transformer row, where this label has none). '
        "Shares: per-position = innermost fixed-trip loops nested in a loop, merges = loops whose "
        "trip count varies between instances (the Fenwick merges), CLASSIC = share of cycles whose "
        "cost model the compiler marks COST_MODEL_TYPE_CLASSIC (matmuls); the rest is "
        "INVALID-typed (vector work, accuracy unknown). Async = bytes of async copies/slices the "
        "cost model leaves uncosted.",
        "",
        "| label | kind | model | shape | topology | est. ms | roofline ms | est/roofline "
        "| ratio vs Transformer | all loops | per-position | merges | other loops | top | matmul "
        "| vector | copy | slice-update | convert | Pallas | CLASSIC | async GiB | compile s |",
        "|" + "---|" * 24,
    ]
    rat = ratios(rows)
    order = sorted(rows, key=lambda r: (r["label"], r["kind"], shape_key(r), r["model"]))
    for r in order:
        tot = r["total_cycles"]
        ratio = rat[row_key(r)]
        reg = r["by_region"]
        cls = r["by_class"]
        classic = r["by_cost_model"].get("COST_MODEL_TYPE_CLASSIC", 0.0)
        lines.append(
            f"| {r['label']} | {r['kind']} | {r['model']} | {_shape_text(r)} | {r['topology']} "
            f"| {r['estimated_ms']:.2f} | {r['roofline_ms']:.2f} "
            f"| {r['estimated_ms'] / r['roofline_ms']:.2f} | {ratio} "
            f"| {_pct(tot - reg.get('top level', 0.0), tot)} | "
            + " | ".join(_pct(reg.get(k, 0.0), tot) for k, _ in REGIONS)
            + " | "
            + " | ".join(_pct(cls.get(k, 0.0), tot) for k in CLASSES)
            + f" | {_pct(classic, tot)} | {sum(r['async_bytes'].values()) / GIB:.2f} "
            f"| {r['compile_s']:.0f} |"
        )
    lines += ["", "## Loops (top 8 by inclusive cycles, per row)", ""]
    for r in order:
        lines += [
            f"**{r['label']} / {r['kind']} / {r['model']}** ({_shape_text(r)}): "
            f"command `{r['command']}`, commit `{r['commit']}`, host: {r['machine']}.",
            "",
        ]
        if r["loops"]:
            lines += [
                "| loop | depth | source | region | trips | iterations | inclusive | exclusive |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for lp in r["loops"][:8]:
                trips = (
                    str(lp["trip_min"])
                    if lp["trip_min"] == lp["trip_max"]
                    else f"{lp['trip_min']}-{lp['trip_max']}"
                )
                lines.append(
                    f"| {lp['loop']} | {lp['depth']} | {lp['source'] or lp['op_name']} "
                    f"| {dict(REGIONS)[lp['region']]} | {trips} | {lp['iterations']} "
                    f"| {_pct(lp['inclusive_cycles'], r['total_cycles'])} "
                    f"| {_pct(lp['exclusive_cycles'], r['total_cycles'])} |"
                )
            lines.append("")
        extra = []
        split = r.get("by_region_class", {})
        if len(split) > 1:
            extra.append(
                "Classes within each region (share of the row's total): "
                + "; ".join(
                    f"{short}: "
                    + ", ".join(
                        f"{c} {_pct(v, r['total_cycles'])}"
                        for c, v in sorted(split[k].items(), key=lambda kv: -kv[1])
                        if v >= 0.005 * r["total_cycles"]
                    )
                    for k, short in REGIONS
                    if k in split
                )
                + "."
            )
        if r["pallas"]:
            extra.append(
                "Pallas: "
                + ", ".join(
                    f"{p['kernel']} x{p['calls']} "
                    + (
                        f"({p['cycles']:.0f} cycles from CostEstimate)"
                        if p["has_cost_estimate"]
                        else "(no CostEstimate: uncosted)"
                    )
                    for p in r["pallas"]
                )
            )
        if r["notes"]:
            extra.append("Notes: " + "; ".join(r["notes"]))
        if extra:
            lines += [" ".join(extra), ""]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], out_dir: Path, name: str = "tpu_cost") -> None:
    """Merge rows into out_dir/name.json (keyed, see row_key) and re-render name.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = merge_rows(old, rows)
    for p, text in (
        (path, json.dumps({"rows": merged}, indent=1) + "\n"),
        (out_dir / f"{name}.md", markdown(merged)),
    ):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)


def _print_row(r: dict[str, Any]) -> None:
    reg = r["by_region"]
    tot = r["total_cycles"]
    shares = ", ".join(f"{short} {_pct(reg.get(k, 0.0), tot)}" for k, short in REGIONS)
    print(
        f"{r['label']:<8} {r['kind']:<10} {r['model']:<22} est {r['estimated_ms']:9.2f} ms  "
        f"roofline {r['roofline_ms']:7.2f} ms  ({shares})  compile {r['compile_s']:.0f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--layer", action="store_true", help="one layer forward+backward")
    what.add_argument("--train-step", action="store_true", help="a preset's whole train step")
    what.add_argument("--hlo", default=None, help="estimate a saved compiled-HLO text file")
    what.add_argument(
        "--render-only", action="store_true", help="re-render the .md from the existing .json"
    )
    ap.add_argument("--label", default="before", help="row label (before, after, ...)")
    ap.add_argument("--topology", default="v5e:1x1")
    ap.add_argument("--batch", type=int, default=16, help="per-chip batch (layer)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--n-heads", type=int, default=16)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--ff", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--position", default="alibi")
    ap.add_argument("--attention", default="xla", choices=("xla", "flash"), help="Transformer")
    ap.add_argument("--leaf", type=int, nargs="+", default=[32], help="RT leaf size(s)")
    ap.add_argument("--impl", nargs="+", default=["tiled"], help="RT impl(s): tiled, pallas")
    ap.add_argument(
        "--blocks", default="transformer,recurrent", help="layer block types to compile"
    )
    ap.add_argument("--preset", default="paper-150m")
    ap.add_argument("--models", default="", help="comma-separated compare points (train step)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out-dir", default="results")
    ap.add_argument("--name", default="tpu_cost", help="output file stem")
    ap.add_argument("--save-hlo", default=None, help="folder to save each compiled HLO text in")
    ap.add_argument(
        "--readme",
        default="README.md",
        help="README whose generated section to refresh ('' = none)",
    )
    args = ap.parse_args(argv)
    if args.render_only:
        path = Path(args.out_dir) / f"{args.name}.json"
        rows = json.loads(path.read_text())["rows"]
        write_results(rows, Path(args.out_dir), args.name)
        if args.readme:
            update_readme(rows, Path(args.readme))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    chip_of(args.topology)
    if args.hlo is not None:
        est = estimate_text(Path(args.hlo).read_text(), chip_of(args.topology))
        print(json.dumps(est.to_json(), indent=1))
        return
    from experiments.provenance import git_commit, machine

    command = "python -m experiments.tpu_cost " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "label": args.label,
        "command": command,
        "commit": git_commit(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    hlo_dir = Path(args.save_hlo) if args.save_hlo else None
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    rows = []

    def done(row: dict[str, Any]) -> None:
        row = {**meta, **row}
        rows.append(row)
        _print_row(row)
        write_results([row], Path(args.out_dir), args.name)

    if args.layer:
        blocks = [b for b in args.blocks.split(",") if b]
        for b in blocks:
            if b not in ("transformer", "recurrent"):
                ap.error(f"--blocks: {b!r} is not transformer or recurrent")
        for block in blocks:
            variants = (
                [(args.impl[0], args.leaf[0])]
                if block == "transformer"
                else [(i, lf) for i in args.impl for lf in args.leaf]
            )
            for impl, leaf in variants:
                shape = LayerShape(
                    batch=args.batch,
                    seq_len=args.seq_len,
                    d_model=args.d_model,
                    n_heads=args.n_heads,
                    n_kv_heads=args.n_kv_heads,
                    ff=args.ff,
                    dtype=args.dtype,
                    position=args.position,
                    leaf=leaf,
                    impl=impl,
                    attention=args.attention,
                )
                out = None
                if hlo_dir is not None:
                    out = hlo_dir / f"{args.label}_{layer_model_name(block, shape)}.hlo.txt"
                done(estimate_layer(shape, block, args.topology, out))
    else:
        points = [p for p in args.models.split(",") if p] or [None]
        failed = []
        for point in points:
            out = None if hlo_dir is None else hlo_dir / f"{args.label}_{point}.hlo.txt"
            try:
                done(estimate_train_step(args.preset, point, args.topology, args.overrides, out))
            except Exception as err:  # e.g. XLA:TPU out of HBM: report it, go on with the rest
                failed.append(point)
                print(f"{args.label} train-step {point}: FAILED {str(err)[:400]}", flush=True)
        if failed:
            sys.exit(
                f"train steps that did not compile: {failed} (see above; try --set microbatches=N)"
            )


if __name__ == "__main__":
    main()
