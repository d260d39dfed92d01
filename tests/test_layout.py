"""Code-health rules that keep the package changeable: no import cycles between our modules
(imports inside functions count), and each layout name spelled in one module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("userrep", "serving", "components", "pipelines")


def first_party_imports() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_our_modules():
    graph = first_party_imports()
    assert "userrep.batch.build" in graph and "userrep.store" in graph["userrep.batch.build"]
    assert cycles(graph) == []
    assert cycles({**graph, "userrep.store": graph["userrep.store"] | {"userrep.batch.build"}})  # the checker sees one


LAYOUT_NAMES = (
    "manifest.json",
    "SERVING.json",
    "build.json",
    "features.parquet",
    "model.pt",
    "embeddings.parquet",
    "gate.json",
    "drift_report.html",
    "FAILED.json",
    "similar_users.faiss",
    "similar_users.ids.npy",
)


def test_each_batch_layout_name_is_spelled_in_one_module():
    spelled = {
        name: sorted(
            str(p.relative_to(REPO))
            for package in PACKAGES + ("bench",)
            for p in (REPO / package).rglob("*.py")
            if re.search(rf"[\"']{re.escape(name)}[\"']", p.read_text())
        )
        for name in LAYOUT_NAMES
    }
    assert spelled == {name: ["userrep/batch/layout.py"] for name in LAYOUT_NAMES}


def test_no_module_is_over_400_lines():
    """A module that no longer reads in one sitting is split (code health: one owner per part)."""
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines())
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
    }
    assert len(sizes) > 50 and max(sizes.values()) > 300  # the walk found the packages
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_the_light_steps_modules_load_without_the_heavy_libraries():
    """Every pipeline step is a fresh process: the modules the promote step and the online store
    need must not pull torch (~2.5 s to import), scipy.stats (~1 s), Evidently or Feast (~7 s each)
    in at import (with torch and scipy.stats gone from them, a 300-user pipeline took 65 s instead
    of 81 s)."""
    import subprocess
    import sys

    heavy = ("torch", "scipy.stats", "evidently", "feast")
    code = (
        "import sys, userrep.store, userrep.onlinestore, userrep.batch.registry, userrep.metrics, userrep.eventlog; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "", f"imported at module load: {loaded.stdout.strip()}"
