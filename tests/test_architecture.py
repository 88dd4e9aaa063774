"""The import rules of the layout, checked on the source (an AST walk, nothing imported).

- No import cycle inside mailerd/. Every import counts: top of file, under
  `if TYPE_CHECKING:` and inside functions; relative imports are resolved.
- mailerd/schema/ is the ground floor: it imports nothing of mailerd outside itself.
- mailerctl is a thin client: what it loads of mailerd (directly or through what
  that imports) is mailerd.schema.*, mailerd.message.* and mailerd.wire only.
- The demo runs on the runtime dependencies: nothing it loads imports a package
  of pyproject.toml's `test` extra.

The checker itself is tested on small generated packages, so a rule that can no
longer fail is noticed.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Iterable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent

CLIENT_MAY_LOAD = ("mailerd.schema", "mailerd.message", "mailerd.wire")


class Import(NamedTuple):
    source: str  # importing module
    target: str  # imported module (inside the scanned packages)
    where: str  # "path:line"


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, root: Path, known: dict[str, Path]) -> list[Import]:
    """Every import in the file that names a module in `known`, wherever it stands."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.level, node.module)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        for target in targets:
            module = _known_module(target, known)
            if module is not None and module != name:
                found.append(Import(name, module, where))
    return list(dict.fromkeys(found))  # `from x import a, b` is one import of x


def _absolute(name: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module a `from` import names (relative ones resolved against `name`)."""
    if level == 0:
        return module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _known_module(dotted: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is a scanned module (`a.b.name` -> `a.b`)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, list[Import]]:
    known = module_names(root, packages)
    return {name: imports_of(name, path, root, known) for name, path in known.items()}


def cycles(graph: dict[str, list[Import]], inside: str) -> list[tuple[set[str], list[Import]]]:
    """Each circle of the modules under `inside` (a strongly connected component),
    with one shortest cycle through it."""
    edges = {name: [i for i in found if _under(i.target, inside)]
             for name, found in graph.items() if _under(name, inside)}
    return [(component, _cycle_through(component, edges))
            for component in _components(edges) if len(component) > 1]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _components(edges: dict[str, list[Import]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[set[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            step = next(pending, None)
            if step is not None:
                nxt = step.target
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges.get(nxt, []))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                result.append(component)
    return result


def _cycle_through(component: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A shortest cycle from the component's first module back to itself (breadth first)."""
    start = min(component)
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for step in edges[node]:
                if step.target == start:
                    path = [step]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if step.target in component and step.target not in came_by:
                    came_by[step.target] = step
                    following.append(step.target)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def reachable(graph: dict[str, list[Import]], start: str) -> dict[str, list[Import]]:
    """Every module `start` loads, with the chain of imports that loads it."""
    chains: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for step in graph.get(node, []):
                if step.target not in chains:
                    chains[step.target] = chains[node] + [step]
                    following.append(step.target)
        frontier = following
    return chains


def packages_imported(path: Path) -> set[str]:
    """The top-level names of every absolute import in the file (`a.b` -> `a`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def packages_of_the_test_extra(pyproject: Path) -> set[str]:
    """Import names of the `test` extra's distributions (pytest-timeout -> pytest_timeout)."""
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["test"]
    return {re.split(r"[<>=!~\[;\s]", requirement)[0].replace("-", "_") for requirement in extra}


def describe(chain: list[Import]) -> str:
    return " -> ".join([chain[0].source] + [f"{i.target} ({i.where})" for i in chain])


def cycle_problems(root: Path, package: str) -> list[str]:
    graph = import_graph(root, [package])
    return [f"{describe(cycle)}\n    (the circle holds {len(circle)} modules: "
            f"{', '.join(sorted(circle))})"
            for circle, cycle in cycles(graph, package)]


def ground_floor_problems(root: Path, floor: str, package: str) -> list[str]:
    graph = import_graph(root, [package])
    return [f"{i.source} imports {i.target} ({i.where})"
            for name, found in graph.items() if _under(name, floor)
            for i in found if not _under(i.target, floor)]


def client_problems(root: Path, client: str, package: str, allowed: Iterable[str]) -> list[str]:
    graph = import_graph(root, [client, package])
    allowed = tuple(allowed)
    problems = []
    for name in sorted(m for m in graph if _under(m, client)):
        for module, chain in reachable(graph, name).items():
            # the package's own __init__ is loaded with any of its modules anyway
            if module == package or not _under(module, package):
                continue
            if not any(_under(module, a) for a in allowed):
                problems.append(describe(_from_client(chain, client)))
    return sorted(set(problems))


def _from_client(chain: list[Import], client: str) -> list[Import]:
    """The chain from the last client module on it (the import that leaves the client)."""
    last = max(i for i, step in enumerate(chain) if _under(step.source, client))
    return chain[last:]


# ---------------------------------------------------------------- the real tree


def test_no_import_cycle_inside_mailerd():
    problems = cycle_problems(ROOT, "mailerd")
    assert not problems, "import cycles (each shown once, as a path):\n" + "\n".join(problems)


def test_schema_imports_nothing_of_mailerd_outside_schema():
    problems = ground_floor_problems(ROOT, "mailerd.schema", "mailerd")
    assert not problems, "\n".join(problems)


def test_mailerctl_loads_only_schema_message_and_wire():
    problems = client_problems(ROOT, "mailerctl", "mailerd", CLIENT_MAY_LOAD)
    assert not problems, "mailerctl loads more of mailerd than it may:\n" + "\n".join(problems)


def test_the_demo_needs_no_test_only_package():
    graph = import_graph(ROOT, ["mailerd", "mailerctl"])
    known = module_names(ROOT, ["mailerd", "mailerctl"])
    test_only = packages_of_the_test_extra(ROOT / "pyproject.toml")
    assert "aiosmtpd" in test_only
    problems = [f"{describe(chain) if chain else module} imports {sorted(needed)}"
                for module, chain in reachable(graph, "mailerd.demo").items()
                if (needed := packages_imported(known[module]) & test_only)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checker itself


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_type_checking_and_function_imports_is_reported(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from pkg.high.b import B\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "def f():\n    from ..mid import c\n",
        "pkg/mid.py": "from .low import a\n",
        "pkg/fine.py": "import pkg.mid\n",
    })
    problems = cycle_problems(root, "pkg")
    assert problems == [
        "pkg.high.b -> pkg.mid (pkg/high/b.py:2) -> pkg.low.a (pkg/mid.py:1)"
        " -> pkg.high.b (pkg/low/a.py:3)\n"
        "    (the circle holds 3 modules: pkg.high.b, pkg.low.a, pkg.mid)"
    ]


def test_a_package_without_cycles_passes(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\nfrom .b import thing\nimport os\n",
        "pkg/b.py": "def g():\n    import pkg.c\n",
        "pkg/c.py": "",
    })
    assert cycle_problems(root, "pkg") == []


def test_a_ground_floor_import_of_a_higher_module_is_reported(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/schema/__init__.py": "",
        "pkg/schema/rows.py": "from pkg.schema import other\ndef f():\n    from pkg import top\n",
        "pkg/schema/other.py": "",
        "pkg/top.py": "",
    })
    assert ground_floor_problems(root, "pkg.schema", "pkg") == [
        "pkg.schema.rows imports pkg.top (pkg/schema/rows.py:3)"]


def test_a_client_loading_more_than_the_floor_is_reported_with_the_chain(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "VERSION = '1'\n",
        "pkg/schema.py": "",
        "pkg/enqueue.py": "from pkg import schema, journal\n",
        "pkg/journal.py": "",
        "cli/__init__.py": "from pkg import VERSION\n",
        "cli/main.py": "from pkg.schema import X\nfrom pkg.enqueue import check\n",
    })
    assert client_problems(root, "cli", "pkg", ["pkg.schema"]) == [
        "cli.main -> pkg.enqueue (cli/main.py:2)",
        "cli.main -> pkg.enqueue (cli/main.py:2) -> pkg.journal (pkg/enqueue.py:1)",
    ]
    assert client_problems(root, "cli", "pkg", ["pkg.schema", "pkg.enqueue", "pkg.journal"]) == []
