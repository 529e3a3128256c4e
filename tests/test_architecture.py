"""The import architecture, checked from the source text.

Every module's imports are read with ``ast`` (none of the checked modules is imported, so this is
fast and safe), and the rules below are checked on the resulting graph: no circles, imports only
point down the floors, the core stays free of the harness and the programs on top of it, and a
plugin stays within its own family.

The checker is a handful of functions that take a repository root, so the same code runs on the
real tree and, in the last tests, on tiny fake trees built to prove that it can fail.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The floors, from the ground up: an import may only point to the same or a lower floor.
# README.md's architecture section and ../shared/DESIGN.md describe the same picture; keep the
# three in step. A key ending in ".*" covers that module and every module below it; any other key
# covers exactly one module. The most specific key wins. A module no key covers is a failure:
# place each new module on a floor here.
FLOORS: dict[str, int] = {
    "normzoo.errors": 1,
    "normzoo.distributed": 1,
    "normzoo.layouts": 2,
    "normzoo.interface": 3,
    "normzoo.stats": 3,
    "normzoo.base": 4,
    "normzoo.hookspecs": 4,
    "normzoo.registry": 5,
    "normzoo_plugins.*": 5,
    "normzoo.convert": 6,
    "normzoo.testing.*": 6,
    "normzoo.workloads.*": 6,
    "normzoo": 7,
    "normzoo.harness.*": 8,
    "normzoo.bench.*": 9,
    "normzoo.compare.*": 10,
    "normzoo.cli.*": 11,
    "normzoo.__main__": 11,
    "normzoo_command": 11,
}

# The core: what a norm and its registry are made of.
CORE: tuple[str, ...] = (
    "normzoo.errors",
    "normzoo.distributed",
    "normzoo.layouts",
    "normzoo.interface",
    "normzoo.stats",
    "normzoo.base",
    "normzoo.hookspecs",
    "normzoo.registry",
)

# The harness and the programs built on the library; neither the core nor a plugin imports them.
PROGRAMS: tuple[str, ...] = (
    "normzoo.harness",
    "normzoo.workloads",
    "normzoo.bench",
    "normzoo.compare",
    "normzoo.cli",
    "normzoo.__main__",
    "normzoo_command",
)

PLUGINS = "normzoo_plugins"

# The folder each scanned top-level package is read from (pyproject.toml's package-dir).
SOURCE_FOLDERS: dict[str, str] = {"normzoo": "normzoo", PLUGINS: "plugins"}

# The file each scanned top-level module is read from (pyproject.toml's py-modules).
SOURCE_FILES: dict[str, str] = {"normzoo_command": "normzoo_command.py"}

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    """One import statement of a scanned module naming a scanned module."""

    importer: str
    imported: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.file}:{self.line})"


# --- reading the graph ------------------------------------------------------------------------


def find_modules(root: Path) -> dict[str, Path]:
    """Every scanned module under ``root``, by dotted name: ``normzoo/harness/train.py`` is
    ``normzoo.harness.train``, ``normzoo/compare/__init__.py`` is ``normzoo.compare`` and
    ``plugins/pit/norm.py`` is ``normzoo_plugins.pit.norm``."""
    modules: dict[str, Path] = {}
    for package, folder in SOURCE_FOLDERS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    for module, file in SOURCE_FILES.items():
        if (root / file).exists():
            modules[module] = root / file
    return modules


def is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` tests ``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` (module level, functions, methods, classes, ``if`` and ``try``
    blocks), except the bodies of ``if TYPE_CHECKING:`` blocks, which never run."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and is_type_checking(child.test):
            for statement in child.orelse:
                yield statement
                yield from runtime_nodes(statement)
            continue
        yield child
        yield from runtime_nodes(child)


def from_import_base(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` statement imports from; relative imports are
    resolved against the importing module's package. None for a relative import that climbs
    above the top-level package."""
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    climb = node.level - 1
    if climb >= len(package):
        return None
    parts = package[: len(package) - climb]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def import_edges(root: Path) -> list[Edge]:
    """Every import, anywhere in a scanned module, of another (or the same) scanned module.

    ``import a.b`` points to ``a.b``; ``from a.b import c`` points to ``a.b.c`` if that is a
    scanned module and to ``a.b`` otherwise; an import of a package points to its ``__init__``.
    Only the named module counts: that Python also runs the parent packages' ``__init__`` on
    the way is left out, or every module would import its package root.
    """
    modules = find_modules(root)
    edges: list[Edge] = []
    for module, path in modules.items():
        file = path.relative_to(root).as_posix()
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in runtime_nodes(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = from_import_base(module, is_package, node)
                if base is None:
                    continue
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            for target in dict.fromkeys(targets):
                if target in modules:
                    edges.append(Edge(module, target, file, node.lineno))
    return sorted(edges, key=lambda edge: (edge.file, edge.line, edge.imported))


def within(module: str, prefix: str) -> bool:
    """Whether ``module`` is ``prefix`` or a module below it."""
    return module == prefix or module.startswith(prefix + ".")


def floor_of(module: str) -> int | None:
    """The module's floor from FLOORS (the most specific key wins), or None if it has none."""
    if module in FLOORS:
        return FLOORS[module]
    covering = [key for key in FLOORS if key.endswith(".*") and within(module, key[:-2])]
    if not covering:
        return None
    return FLOORS[max(covering, key=len)]


def plugin_family(module: str) -> str | None:
    """``plugins/foo.py`` is family ``foo``, everything in ``plugins/pit/`` is family ``pit``;
    the ``normzoo_plugins`` package itself and modules outside it belong to no family."""
    parts = module.split(".")
    if parts[0] != PLUGINS or len(parts) < 2:
        return None
    return parts[1]


# --- the rules --------------------------------------------------------------------------------


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules reached from ``start`` by following one or more imports."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def import_circles(root: Path) -> list[list[Edge]]:
    """Each circle, as a strongly connected component of the import graph: the modules that
    all reach each other (a module importing itself counts), with every import among them."""
    edges = import_edges(root)
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
    reach = {module: reachable(graph, module) for module in graph}
    components: list[frozenset[str]] = []
    for module in sorted(graph):
        if module not in reach[module] or any(module in done for done in components):
            continue
        components.append(
            frozenset(other for other in reach[module] if module in reach.get(other, ()))
        )
    return [
        [edge for edge in edges if edge.importer in component and edge.imported in component]
        for component in components
    ]


def modules_on_no_floor(root: Path) -> list[str]:
    """The scanned modules FLOORS does not place."""
    return sorted(module for module in find_modules(root) if floor_of(module) is None)


def upward_imports(root: Path) -> list[Edge]:
    """Imports that point to a higher floor (modules on no floor are reported separately)."""
    offenders = []
    for edge in import_edges(root):
        importer, imported = floor_of(edge.importer), floor_of(edge.imported)
        if importer is not None and imported is not None and imported > importer:
            offenders.append(edge)
    return offenders


def core_imports_of_programs_or_plugins(root: Path) -> list[Edge]:
    """Imports from the core of the harness, the programs on top of it, or any plugin."""
    return [
        edge
        for edge in import_edges(root)
        if any(within(edge.importer, core) for core in CORE)
        and any(within(edge.imported, outer) for outer in (*PROGRAMS, PLUGINS))
    ]


def plugin_imports_outside_its_family(root: Path) -> list[Edge]:
    """Imports from a plugin of another plugin family, or of the harness and the programs."""
    offenders = []
    for edge in import_edges(root):
        family = plugin_family(edge.importer)
        if family is None:
            continue
        other_family = plugin_family(edge.imported)
        if (other_family is not None and other_family != family) or any(
            within(edge.imported, outer) for outer in PROGRAMS
        ):
            offenders.append(edge)
    return offenders


def report(summary: str, lines: list[str] | list[Edge]) -> str:
    return "\n".join([summary, *(f"  {line}" for line in lines)])


# --- the real tree ----------------------------------------------------------------------------


def test_the_scan_sees_the_library_and_the_bundled_plugins() -> None:
    modules = find_modules(REPOSITORY)
    for expected in ("normzoo", "normzoo.registry", "normzoo.compare", "normzoo_plugins.pit.norm"):
        assert expected in modules
    assert any(edge.importer.startswith(PLUGINS) for edge in import_edges(REPOSITORY))


def test_every_module_is_placed_on_a_floor() -> None:
    unplaced = modules_on_no_floor(REPOSITORY)
    if unplaced:
        pytest.fail(
            report("modules on no floor (place them in FLOORS, atop this file):", unplaced),
            pytrace=False,
        )


def test_no_module_imports_in_a_circle() -> None:
    circles = import_circles(REPOSITORY)
    if circles:
        pytest.fail(
            "\n".join(
                report(f"import circle among {', '.join(sorted({e.importer for e in c}))}:", c)
                for c in circles
            ),
            pytrace=False,
        )


def test_imports_only_point_to_the_same_or_a_lower_floor() -> None:
    offenders = upward_imports(REPOSITORY)
    if offenders:
        pytest.fail(report("imports pointing up to a higher floor:", offenders), pytrace=False)


def test_the_core_never_imports_the_harness_the_programs_or_a_plugin() -> None:
    offenders = core_imports_of_programs_or_plugins(REPOSITORY)
    if offenders:
        pytest.fail(
            report(
                "core modules importing the harness, bench, compare, cli, workloads or a plugin:",
                offenders,
            ),
            pytrace=False,
        )


def test_a_plugin_never_imports_another_plugin_or_the_harness() -> None:
    offenders = plugin_imports_outside_its_family(REPOSITORY)
    if offenders:
        pytest.fail(
            report(
                "plugins importing another plugin, the harness, bench, compare, cli or workloads:",
                offenders,
            ),
            pytrace=False,
        )


# --- the checker can fail ---------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def fake_repository(tmp_path: Path) -> Path:
    """A tiny tree with one of each offence (a circle closed by an import inside a function, an
    upward import from the core, a plugin importing another plugin) and imports that look like
    offences but are not (one under ``if TYPE_CHECKING:``, a plugin's import of its own family,
    ``from normzoo import distributed``)."""
    return write_tree(
        tmp_path,
        {
            "normzoo/__init__.py": "from normzoo.distributed import sum_over_processes\n",
            "normzoo/errors.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from normzoo.cli import main
                from normzoo.harness import train
                """,
            "normzoo/distributed.py": "",
            "normzoo/cli.py": "import normzoo.harness.train\nimport torch.distributed\n",
            "normzoo/harness/__init__.py": "",
            "normzoo/harness/train.py": "import normzoo\nfrom . import data\n",
            "normzoo/harness/data.py": """\
                def load() -> None:
                    from normzoo.harness.train import train
                """,
            "plugins/__init__.py": "",
            "plugins/alpha.py": "from normzoo import distributed\n",
            "plugins/beta/__init__.py": "from .core import Beta\n",
            "plugins/beta/core.py": """\
                from normzoo.errors import NormzooError
                from ..alpha import Alpha
                """,
        },
    )


def edge_texts(edges: list[Edge]) -> list[str]:
    return [str(edge) for edge in edges]


def test_the_checker_resolves_imports_the_way_python_does(fake_repository: Path) -> None:
    assert edge_texts(import_edges(fake_repository)) == [
        "normzoo -> normzoo.distributed (normzoo/__init__.py:1)",
        "normzoo.cli -> normzoo.harness.train (normzoo/cli.py:1)",
        "normzoo.errors -> normzoo.harness.train (normzoo/errors.py:5)",
        "normzoo.harness.data -> normzoo.harness.train (normzoo/harness/data.py:2)",
        "normzoo.harness.train -> normzoo (normzoo/harness/train.py:1)",
        "normzoo.harness.train -> normzoo.harness.data (normzoo/harness/train.py:2)",
        "normzoo_plugins.alpha -> normzoo.distributed (plugins/alpha.py:1)",
        "normzoo_plugins.beta -> normzoo_plugins.beta.core (plugins/beta/__init__.py:1)",
        "normzoo_plugins.beta.core -> normzoo.errors (plugins/beta/core.py:1)",
        "normzoo_plugins.beta.core -> normzoo_plugins.alpha (plugins/beta/core.py:2)",
    ]


def test_the_checker_finds_a_circle_closed_by_an_import_inside_a_function(
    fake_repository: Path,
) -> None:
    assert [edge_texts(circle) for circle in import_circles(fake_repository)] == [
        [
            "normzoo.harness.data -> normzoo.harness.train (normzoo/harness/data.py:2)",
            "normzoo.harness.train -> normzoo.harness.data (normzoo/harness/train.py:2)",
        ],
    ]


def test_the_checker_finds_an_upward_import_from_the_core(fake_repository: Path) -> None:
    upward = ["normzoo.errors -> normzoo.harness.train (normzoo/errors.py:5)"]
    assert edge_texts(upward_imports(fake_repository)) == upward
    assert edge_texts(core_imports_of_programs_or_plugins(fake_repository)) == upward


def test_the_checker_finds_a_plugin_importing_another_plugin(fake_repository: Path) -> None:
    assert edge_texts(plugin_imports_outside_its_family(fake_repository)) == [
        "normzoo_plugins.beta.core -> normzoo_plugins.alpha (plugins/beta/core.py:2)",
    ]


def test_the_checker_finds_a_package_and_its_submodule_importing_each_other(
    tmp_path: Path,
) -> None:
    write_tree(
        tmp_path,
        {
            "normzoo/__init__.py": "from normzoo.convert import convert\n",
            "normzoo/errors.py": "",
            "normzoo/convert.py": "from normzoo import errors\nfrom normzoo import NormBase\n",
        },
    )
    back_up = "normzoo.convert -> normzoo (normzoo/convert.py:2)"
    assert [edge_texts(circle) for circle in import_circles(tmp_path)] == [
        ["normzoo -> normzoo.convert (normzoo/__init__.py:1)", back_up],
    ]
    assert edge_texts(upward_imports(tmp_path)) == [back_up]


def test_the_checker_finds_a_module_on_no_floor(tmp_path: Path) -> None:
    write_tree(tmp_path, {"normzoo/__init__.py": "", "normzoo/scratch.py": "", "plugins/x.py": ""})
    assert modules_on_no_floor(tmp_path) == ["normzoo.scratch"]


def test_every_package_in_the_source_folders_ships_in_the_wheel():
    """pyproject.toml lists the packages by name: a new package left out of the list works in
    an editable install and is missing from every real one."""
    import tomllib

    setup = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in SOURCE_FOLDERS.items():
        for marker in (REPOSITORY / folder).rglob("__init__.py"):
            parts = marker.parent.relative_to(REPOSITORY / folder).parts
            if "__pycache__" not in parts and not any(part.startswith(".") for part in parts):
                found.add(".".join((package, *parts)))
    assert set(setup["packages"]) == found
