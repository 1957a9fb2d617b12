"""The shape of `flynn_host/` (docs/host.md#the-layout), checked on the source with `ast`: no
import circle among its modules, the product never imports the development tools
(`flynn_host.dev`), the container runtime and job networking do not import each other, and a
module longer than MAX_LINES says why in its docstring.

Import circles are about what runs when a module is imported: the imports at module level
(also inside `if`, `try`, `with` and class bodies), not those inside a function, which run
later, nor those under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "flynn_host"
DEV = "flynn_host.dev"
# a module longer than this says why in a paragraph of its docstring that starts with "Size:"
MAX_LINES = 450

Imports = ast.Import | ast.ImportFrom


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(body: list[ast.stmt]) -> Iterator[Imports]:
    """The imports that run when the module is imported."""
    for node in body:
        if isinstance(node, Imports):
            yield node
        elif isinstance(node, ast.If):
            if not _type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody):
                yield from module_level_imports(block)
            for handler in node.handlers:
                yield from module_level_imports(handler.body)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from module_level_imports(node.body)


def all_imports(tree: ast.Module) -> Iterator[Imports]:
    """Every import of a module, wherever it is (functions and TYPE_CHECKING blocks too)."""
    for node in ast.walk(tree):
        if isinstance(node, Imports):
            yield node


def imported_names(node: Imports, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement may refer to: a module, or a package and each
    name taken from it (which may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text()).body):
            names = imported_names(node, name, is_package)
            if isinstance(node, ast.Import):
                edges |= {n for n in names if n in modules}
                continue
            # `from package import a, b`: each submodule, and the package itself for a name
            # that is not one
            base, taken = names[0], names[1:]
            edges |= {n for n in taken if n in modules}
            if base in modules and not all(n in modules for n in taken):
                edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it (the first repeated at the end)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# --- the checker itself -----------------------------------------------------------------------


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]


def test_what_counts_as_a_module_level_import() -> None:
    source = (
        "import a\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "try:\n    import d\nexcept ImportError:\n    import e\n"
        "def f():\n    import g\n"
        "class K:\n    import h\n"
    )
    names = [a.name for n in module_level_imports(ast.parse(source).body) for a in n.names]
    assert names == ["a", "TYPE_CHECKING", "c", "d", "e", "h"]


def test_import_graph_resolves_submodules_and_relative_imports(tmp_path: Path) -> None:
    src = {
        "p/__init__.py": "",
        "p/a.py": "from p import b\nfrom . import c\nfrom .c import x\n",
        "p/b.py": "import p.c\n",
        "p/c.py": "from p import VERSION\n",
    }
    for rel, text in src.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    mods = {
        "p": tmp_path / "p/__init__.py",
        **{f"p.{m}": tmp_path / f"p/{m}.py" for m in "abc"},
    }
    assert import_graph(mods) == {"p": set(), "p.a": {"p.b", "p.c"}, "p.b": {"p.c"}, "p.c": {"p"}}


# --- flynn_host -------------------------------------------------------------------------------


def test_no_import_circle() -> None:
    graph = import_graph(package_modules())
    assert "flynn_host.daemon" in graph and graph["flynn_host.daemon"]  # it sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def product_files() -> list[Path]:
    """The program: flynn_host but its development tools, the plugins' packages (not their
    tests) and the `flynn` CLI."""
    files = [p for p in PACKAGE.rglob("*.py") if not module_name(p).startswith(DEV + ".")]
    files = [p for p in files if module_name(p) != DEV]
    files += [p for p in ROOT.glob("plugins/*/flynn_*/**/*.py")]
    files += list((ROOT / "cli" / "flynn_cli").rglob("*.py"))
    return sorted(files)


def test_the_product_does_not_import_the_development_tools() -> None:
    files = product_files()
    assert PACKAGE / "daemon.py" in files and PACKAGE / "dev" / "host.py" not in files
    found = []
    for path in files:
        name = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
        for node in all_imports(ast.parse(path.read_text())):
            names = imported_names(node, name, path.name == "__init__.py")
            if any(n == DEV or n.startswith(DEV + ".") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], f"the product imports {DEV} (a development tool): {found}"


@pytest.mark.parametrize(
    ("package", "other"),
    [
        ("flynn_host.runtime", "flynn_host.networking"),
        ("flynn_host.networking", "flynn_host.runtime"),
    ],
)
def test_runtime_and_networking_do_not_import_each_other(package: str, other: str) -> None:
    graph = import_graph(package_modules())
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if target == other or target.startswith(other + ".")
    )
    assert crossing == []


def test_long_modules_say_why() -> None:
    unexplained = []
    for name, path in package_modules().items():
        text = path.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not re.search(r"^Size: \S", doc, re.M):
            unexplained.append(f"{name} ({text.count(chr(10))} lines)")
    assert unexplained == [], (
        f"modules over {MAX_LINES} lines: split them by responsibility, or say why not in a "
        f"'Size:' paragraph of the docstring: {unexplained}"
    )
