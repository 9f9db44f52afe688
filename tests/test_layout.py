"""The shape of the code: imports run one way, no import cycle, small modules, thin flows,
and results stored by the code before the package layout still read back."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
STORED = Path(__file__).parent / "data" / "results-before-layout"
MAX_MODULE_LINES = 800


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_are_kept():
    """The layers, `setlist` never importing `flows`, and what block types may import
    (pyproject.toml, [tool.importlinter])."""
    run = _lint_imports()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The same check, told that ``core`` sits above ``cli``, fails: it bites."""
    config = tmp_path / "upside-down.toml"
    config.write_text(
        "[tool.importlinter]\nroot_packages = ['setlist']\n\n"
        "[[tool.importlinter.contracts]]\nname = 'upside down'\ntype = 'layers'\n"
        "containers = ['setlist']\nlayers = ['core', 'cli']\n"
    )
    run = _lint_imports("--config", str(config))
    assert run.returncode == 1
    assert "upside down BROKEN" in run.stdout
    assert "setlist.cli" in run.stdout and "setlist.core" in run.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), function-level
    and TYPE_CHECKING imports included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m) & modules:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_among_setlist_modules():
    graph = grimp.build_graph("setlist", "flows", "blocks", exclude_type_checking_imports=False)
    modules = {m for m in graph.modules if m.split(".")[0] in ("setlist", "flows", "blocks")}
    assert _cycles(graph, modules) == []


def test_the_cycle_check_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph, {"a.x", "a.y", "a.z"}) == [["a.x", "a.y"]]


def test_every_setlist_module_is_small():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in (ROOT / "setlist").rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_every_package_says_what_it_owns():
    for init in (ROOT / "setlist").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} has no package docstring"


def test_flows_define_no_classes():
    """A flow module holds flows, task wrappers and artifacts; its result and parameter
    models live in the domain package (pickled results name their defining module)."""
    defined = {
        f"{p.name}:{node.name}"
        for p in (ROOT / "flows").glob("*.py")
        for node in ast.parse(p.read_text()).body
        if isinstance(node, ast.ClassDef)
    }
    assert defined == set()


@pytest.mark.parametrize(
    "key",
    sorted(p.name for p in STORED.iterdir() if not p.name.endswith(".json")),
)
def test_a_result_stored_before_the_move_reads_back(tmp_path, key):
    """Prefect pickles flow results (persist_result=True, the default serializer): the
    records here were written by the flows before the package layout, naming classes as
    ``flows.<module>.<Class>``. They must still load, as the class now in use."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    shutil.copy(STORED / key, tmp_path / key)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    record = store.read(key)

    module, _, name = key.rpartition(".")
    current = getattr(__import__(module, fromlist=[name]), name)
    assert type(record.result) is current
    expected = json.loads((STORED / f"{key}.json").read_text())
    assert json.loads(record.result.model_dump_json()) == expected
