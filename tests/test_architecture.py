"""The package's layout by role holds: no import circle, and each role imports only what sits
below it (the engine nothing of the daemon or the clients; the daemon and the clients nothing
of each other; nothing of the runtime package imports the test helpers).

Imports are read from the sources (every ``import`` statement, also inside functions: a lazy
import is a dependency at run time too). Imports under ``if TYPE_CHECKING:`` are left out: they
name a type for annotations and run nowhere. Edges into the root package ``shmreplay`` (the
public facade, which imports every role) are left out too: importing any submodule runs it
first anyway."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import shmreplay

PACKAGE = Path(shmreplay.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports at run time."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for a in node.names:  # ``from . import server``: the name may be a module
                if f"{target}.{a.name}" in known:
                    found.add(f"{target}.{a.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != "shmreplay" and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_the_graph_is_read_from_the_sources(graph):
    # The check below bites only if the graph is real: known edges are in it.
    assert "shmreplay.engine.layout" in graph["shmreplay.engine.table"]
    assert "shmreplay.client.loader" in graph["shmreplay.client.table"]
    assert "shmreplay.daemon.commit_loop" in graph["shmreplay.daemon.lifecycle"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_itself_back(graph):
    assert _cycles(graph) == []


SHARED = {"shmreplay.errors", "shmreplay.config", "shmreplay.values"}


@pytest.mark.parametrize(
    "role, may_import",
    [
        ("shmreplay.engine", SHARED | {"shmreplay.engine"}),
        (
            "shmreplay.daemon",
            SHARED | {"shmreplay.engine", "shmreplay.control", "shmreplay.daemon"},
        ),
        (
            "shmreplay.client",
            SHARED | {"shmreplay.engine", "shmreplay.control", "shmreplay.client"},
        ),
    ],
)
def test_each_role_imports_only_what_lies_below_it(graph, role, may_import):
    wrong = {
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m == role or m.startswith(role + ".")
        for d in deps
        if not any(d == ok or d.startswith(ok + ".") for ok in may_import)
    }
    assert not wrong, sorted(wrong)


def test_the_runtime_package_never_imports_the_test_helpers(graph):
    users = {
        m
        for m, deps in graph.items()
        if not m.startswith("shmreplay.testing")
        and any(d.startswith("shmreplay.testing") for d in deps)
    }
    assert users == set()


def test_every_selector_kind_of_the_config_is_implemented():
    from shmreplay.config import SELECTOR_KINDS
    from shmreplay.engine.selectors import selector_class

    assert {selector_class(k).kind for k in SELECTOR_KINDS} == set(SELECTOR_KINDS)


def test_the_integrations_keep_their_public_paths():
    # In a fresh interpreter: shmreplay.torch and shmreplay.compat.reverb are the modules of
    # shmreplay.integrations, and importing shmreplay imports no framework.
    code = (
        "import sys, shmreplay\n"
        "assert 'torch' not in sys.modules and 'shmreplay.integrations.torch' not in sys.modules\n"
        "import shmreplay.torch, shmreplay.integrations.torch as t\n"
        "assert shmreplay.torch is t, shmreplay.torch\n"
        "from shmreplay.compat import reverb\n"
        "import shmreplay.integrations.reverb as r\n"
        "assert reverb is r and reverb.Client is r.Client\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
