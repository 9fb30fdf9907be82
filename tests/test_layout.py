"""The code's layout, checked: the engine package is the only writer of a run's or a step's
status, the project's modules import each other without a cycle, and imports hidden inside
functions stay few (each one has a reason other than hiding a cycle)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agentsite", "agents", "tools", "approvals", "audittrail")
# Function-level imports of the project's own modules, outside migrations, management commands
# and AppConfig.ready. Each is there for a reason that is not a cycle: agentsite/celery.py's
# signal handlers run in a process whose Django may not be set up yet (11), the provider
# registry reads its table only when a route is resolved (2), tools/apps.py is imported before
# the models are (1). Lower this when one goes; never raise it to hide a cycle.
MAX_FUNCTION_LEVEL_IMPORTS = 14


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if "migrations" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


MODULES = dict(modules())


def _resolve(name: str, *, current: str, level: int, is_package: bool) -> str:
    if not level:
        return name
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _targets(node: ast.Import | ast.ImportFrom, current: str, path: Path) -> list[str]:
    """The project modules an import statement loads (a package's ``__init__`` included)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve(
            node.module or "",
            current=current,
            level=node.level,
            is_package=path.name == "__init__.py",
        )
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = []
    for name in names:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            # A module's own packages are loading already when it runs (not a dependency).
            if prefix in MODULES and prefix != current and not current.startswith(prefix + "."):
                found.append(prefix)
    return found


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported (not under ``if TYPE_CHECKING``)."""
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If | ast.Try):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for child in ast.walk(node):
                if isinstance(child, ast.Import | ast.ImportFrom):
                    yield child


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        graph[name] = {
            target for node in _module_level_imports(tree) for target in _targets(node, name, path)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def function_level_imports() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if "management" in name.split("."):
            continue

        def visit(node: ast.AST, where: list[str], name: str = name, path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    visit(child, [*where, child.name])
                elif isinstance(child, ast.Import | ast.ImportFrom) and where:
                    if where[0] != "ready" and where[-1] != "ready" and _targets(child, name, path):
                        found.append(f"{path.relative_to(ROOT)}:{child.lineno} in {where[-1]}")
                else:
                    visit(child, where)

        visit(ast.parse(path.read_text()), [])
    return found


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Call | ast.Attribute):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def status_writers() -> list[str]:
    """Statements that write a Run's or a Step's status: ``Run.objects….update(status=…)``,
    ``Step.objects.create(status=…)`` and the like."""
    writes = ("update", "create", "bulk_create", "get_or_create", "update_or_create")
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in writes
                and _root(node) in ("Run", "Step")
                and any(keyword.arg == "status" for keyword in node.keywords)
            ):
                found.append(f"{name}:{node.lineno}")
    return found


def test_only_the_engine_writes_run_and_step_status():
    writers = status_writers()
    assert writers, "the check finds nothing: it no longer recognises the writes"
    assert [w for w in writers if not w.startswith("agents.engine.")] == []


def test_the_projects_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert graph["agents.engine.model_step"], "the graph is empty: imports are not being read"
    assert cycles(graph) == []


def test_imports_hidden_in_functions_stay_few():
    found = function_level_imports()
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, "\n".join(found)


def test_the_cycle_check_finds_a_cycle():
    """The checks above can fail: a made-up cycle is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
