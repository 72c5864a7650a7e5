"""The house: product layers import only downwards, tools sit on top, no cycles.

Layers, lowest first: the ground (contract, intervals, settings, compat, the
CUDA driver and NVML),
``allocator`` (how memory is mapped), ``memory`` (what memory this is),
``staging`` (moving bytes the transport cannot export), the vLLM seam and
per-release differences (``releases``),
``connector`` (how vLLM drives it), the plugin and package root, and
``tools`` (cli, doctor, demo, benchmarks, harness), which nothing imports.
Every import counts, function-level and ``TYPE_CHECKING`` ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import elastic_nixl

SRC = Path(elastic_nixl.__file__).parent
PKG = "elastic_nixl"

LAYERS: list[tuple[str, ...]] = [
    ("capabilities", "runs", "config", "compat", "cuda_driver"),
    ("allocator",),
    ("memory",),
    ("staging",),
    ("releases", "vllm_seam"),  # what differs per vLLM release; the seam
    ("connector",),
    ("plugin", ""),  # "": the package root
    ("tools",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PKG, *parts])


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer_of(module: str) -> int:
    rest = module[len(PKG) + 1 :] if module != PKG else ""
    top = rest.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports_of(module: str) -> set[str]:
    """Our modules that ``module`` imports (``from pkg import sub`` -> sub)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != module and t.startswith(PKG):
                out.add(t)
    # A parent package is initialised before its modules anyway: not an edge.
    return {t for t in out if not module.startswith(t + ".")}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        layer_of(m)


def test_imports_go_down_only() -> None:
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def test_product_never_imports_tools() -> None:
    bad = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if not m.startswith(f"{PKG}.tools")
        for t in targets
        if t.startswith(f"{PKG}.tools")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components; any with two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_check_sees_a_planted_upward_import() -> None:
    """The scan is not vacuous: an allocator module importing the connector
    would be caught."""
    planted = dict(GRAPH)
    planted[f"{PKG}.allocator.core"] = GRAPH[f"{PKG}.allocator.core"] | {
        f"{PKG}.connector.worker"
    }
    assert any(layer_of(t) > layer_of(m) for m, ts in planted.items() for t in ts)
    assert f"{PKG}.allocator.registry" in GRAPH[f"{PKG}.allocator.core"]


def test_product_modules_stay_small() -> None:
    big = {
        m: n
        for m, p in MODULES.items()
        if not m.startswith(f"{PKG}.tools")
        and (n := len(p.read_text().splitlines())) > 900
    }
    assert not big, f"product modules over 900 lines: {big}"
