"""Imports only go down: every module's imports (function-level ones included), parsed with ast,
against the floors below; no cycles among the library's modules.

Floors, lowest first (a module may import its own floor and any floor below it):

    0  pallas_kernels          the kernels: import nothing from rt_jax
    1  rt_jax.ops              pure functions on arrays; kernels only through rt_jax.ops.pallas_tiles
    2  rt_jax.config           the model config (and its family sections); imports no model
    3  rt_jax.models           model families behind rt_jax.models.family, caches, FLOP formulas
    4  rt_jax.data, rt_jax.decoding, rt_jax.sampling, rt_jax.convert, rt_jax (the package)
    5  rt_jax.train            train state, step, loop, checkpoints, sharding, presets
    6  experiments             runnable modules

Tests and notebooks sit above everything. Imports under ``if TYPE_CHECKING:`` never run, so they
are left out of the cycle check (they still must not climb). Importing a submodule is not counted
as importing its parent package.
"""

from __future__ import annotations

import ast
import gc
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "rt_jax", "experiments")

FLOORS: tuple[tuple[str, int], ...] = (
    ("pallas_kernels", 0),
    ("rt_jax.ops", 1),
    ("rt_jax.config", 2),
    ("rt_jax.models", 3),
    ("rt_jax.data", 4),
    ("rt_jax.decoding", 4),
    ("rt_jax.sampling", 4),
    ("rt_jax.convert", 4),
    ("rt_jax.train", 5),
    ("experiments", 6),
)
"""Module-name prefix -> floor; the longest matching prefix wins. ``rt_jax`` itself is floor 4."""
PACKAGE_FLOOR = {"rt_jax": 4, "experiments": 6, "pallas_kernels": 0}

KERNEL_ADAPTER = "rt_jax.ops.pallas_tiles"
"""The one module of rt_jax that may import pallas_kernels."""


def module_name(path: pathlib.Path) -> str:
    """Dotted module name of a source file under ROOT (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    """The floor of a module of this repository (KeyError if none applies)."""
    best, floor = -1, None
    for prefix, level in FLOORS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
            best, floor = len(prefix), level
    if floor is None:
        floor = PACKAGE_FLOOR[module]
    return floor


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _parse(source: str) -> ast.Module:
    """``ast.parse`` with the cyclic garbage collector paused.

    On CPython 3.11 a finaliser that runs during ``ast.parse`` and parses code itself (an asyncio
    task with an unretrieved error, logged with a traceback whose caret anchors use ``ast``)
    corrupts the parser's shared recursion counter: "SystemError: AST constructor recursion depth
    mismatch". CI hit it on 3.11.7 after Orbax tests; 3.12 is not affected.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def imports_of(
    source: str, module: str, is_package: bool, known: set[str]
) -> list[tuple[str, int, bool]]:
    """(imported repository module, line, runs at import or call time) for every import statement
    anywhere in ``source``, including those inside functions; type-only ones have runs=False."""
    tree = _parse(source)
    out: list[tuple[str, int, bool]] = []
    base = module.split(".") if is_package else module.split(".")[:-1]

    def resolve(name: str) -> str | None:
        # The longest prefix of ``name`` that is a module of this repository.
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                return candidate
        return None

    def visit(node: ast.AST, runs: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_runs = runs
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, False)
                for stmt in child.orelse:
                    visit_stmt(stmt, runs)
                continue
            visit_stmt(child, child_runs)

    def visit_stmt(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name)
                if target:
                    out.append((target, node.lineno, runs))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                target = resolve(f"{prefix}.{alias.name}") if prefix else None
                target = target or resolve(prefix)
                if target:
                    out.append((target, node.lineno, runs))
        visit(node, runs)

    visit(tree, True)
    return list(dict.fromkeys(out))


def repository_imports() -> dict[str, list[tuple[str, int, bool]]]:
    """Every module of PACKAGES -> its imports of other repository modules."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[module_name(path)] = path
    known = set(files)
    graph = {}
    for module, path in files.items():
        found = imports_of(path.read_text(), module, path.name == "__init__.py", known)
        graph[module] = [(t, line, runs) for t, line, runs in found if t != module]
    return graph


def upward_imports(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    """Imports that climb a floor, and rt_jax modules other than the adapter importing kernels."""
    bad = []
    for module, targets in graph.items():
        for target, line, _ in targets:
            if floor_of(target) > floor_of(module):
                bad.append(
                    f"{module}:{line} imports {target} (floor {floor_of(module)} -> "
                    f"{floor_of(target)})"
                )
            elif (
                module.startswith("rt_jax")
                and target.startswith("pallas_kernels")
                and module != KERNEL_ADAPTER
            ):
                bad.append(f"{module}:{line} imports {target}: kernels go through {KERNEL_ADAPTER}")
    return bad


def import_cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (imports that run only)."""
    edges = {m: sorted({t for t, _, runs in ts if runs and t in graph}) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return cycles


@pytest.fixture(scope="module")
def graph():
    return repository_imports()


def test_every_module_has_a_floor(graph):
    for module in graph:
        floor_of(module)


def test_no_import_climbs_a_floor(graph):
    bad = upward_imports(graph)
    assert not bad, "imports that climb a floor:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, f"import cycles: {cycles}"


def test_config_imports_no_model_and_upper_floors_name_no_family(graph):
    """config.py imports no model; lm.py, decoding, train/ and experiments/ reach the families
    only through the registry (experiments.mesh_probe, a probe of the recursive family's loop
    trace, is the one exception)."""
    assert not [t for t, _, _ in graph["rt_jax.config"] if t.startswith("rt_jax.models")]
    families = {"rt_jax.models.standard", "rt_jax.models.lrt", "rt_jax.models.recursive"}
    allowed = {"rt_jax.models", "experiments.mesh_probe"} | families
    for module, targets in graph.items():
        named = {t for t, _, _ in targets if t in families}
        upper = module in ("rt_jax.models.lm", "rt_jax.decoding") or floor_of(module) >= 5
        if upper and module not in allowed:
            assert not named, f"{module} imports the family module(s) {sorted(named)} by name"


def test_the_checker_sees_function_level_and_relative_imports():
    """The parser finds lazy and relative imports, and the checks flag a climb and a cycle."""
    known = {"rt_jax.ops.a", "rt_jax.models.b", "rt_jax.train.c", "rt_jax.ops"}
    source = (
        "import os\n"
        "def f():\n"
        "    from rt_jax.train import c\n"
        "from . import a\n"
        "if TYPE_CHECKING:\n"
        "    from rt_jax.models.b import X\n"
    )
    found = imports_of(source, "rt_jax.ops.z", False, known)
    assert found == [
        ("rt_jax.train.c", 3, True),
        ("rt_jax.ops.a", 4, True),
        ("rt_jax.models.b", 6, False),
    ]
    toy = {
        "rt_jax.ops.z": found,
        "rt_jax.train.c": [("rt_jax.ops.z", 1, True)],
        "rt_jax.ops.a": [],
        "rt_jax.models.b": [],
    }
    assert len(upward_imports(toy)) == 2  # ops -> train, ops -> models (type-only still counts)
    assert import_cycles(toy) == [["rt_jax.ops.z", "rt_jax.train.c"]]


def test_parse_survives_finalisers_that_log_tracebacks():
    """What broke CI on 3.11.7: asyncio tasks with unretrieved errors, freed by the cyclic GC
    mid-parse, log tracebacks (which parse code) inside the parse of a large module."""
    import asyncio
    import io
    import logging

    async def fail():
        raise ValueError("never retrieved " + str(len(ROOT.parts) + 1))

    def orphan() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0))
        cycle: dict = {"task": task}
        cycle["self"] = cycle  # only the cyclic collector frees it
        loop.close()

    source = (ROOT / "experiments" / "param_matched.py").read_text()
    threshold = gc.get_threshold()
    asyncio_log = logging.getLogger("asyncio")
    sink = logging.StreamHandler(io.StringIO())  # formats each traceback, out of sight
    asyncio_log.addHandler(sink)
    propagate, asyncio_log.propagate = asyncio_log.propagate, False
    try:
        for _ in range(20):
            orphan()
        gc.set_threshold(1)
        assert isinstance(_parse(source), ast.Module)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
        asyncio_log.removeHandler(sink)
        asyncio_log.propagate = propagate
    assert "never retrieved" in sink.stream.getvalue()  # the finalisers did run
