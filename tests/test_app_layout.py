"""The app's house: data/, training/ and reporting/ with no import cycles, training never importing
the reporting CLI, and ``fishr-collect`` importing no torch (it runs on a login node in a second)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fishr_lightning

PACKAGE_ROOT = Path(fishr_lightning.__file__).resolve().parent
APP = PACKAGE_ROOT / "app"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_import_graph() -> dict[str, set[str]]:
    """``module -> app modules it imports`` (any import statement, also inside functions), from the source."""
    modules = {module_name(path): path for path in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [node, successor] if successor in path else [node, successor]
            if successor not in state and (cycle := visit(successor, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for successor in graph[stack.pop()]:
            if successor not in seen:
                seen.add(successor)
                stack.append(successor)
    return seen


def test_the_app_is_split_into_data_training_and_reporting():
    assert {path.name for path in APP.iterdir() if path.is_dir() and (path / "__init__.py").exists()} >= {
        "data",
        "training",
        "reporting",
    }
    assert not [path.name for path in APP.glob("*.py") if path.name not in ("__init__.py", "seeding.py")]


def test_the_app_has_no_import_cycles():
    assert find_cycle(app_import_graph()) is None, find_cycle(app_import_graph())


def test_training_never_imports_the_reporting_cli_and_data_never_imports_training():
    graph = app_import_graph()
    from_run = reachable(graph, "fishr_lightning.app.training.run")
    assert "fishr_lightning.app.reporting.collect" not in from_run
    assert "fishr_lightning.app.reporting.plots" not in from_run
    for module in graph:
        if module.startswith("fishr_lightning.app.data"):
            assert not any(target.startswith("fishr_lightning.app.training") for target in graph[module]), module
        if module.startswith("fishr_lightning.app.reporting"):
            assert not any(target.startswith("fishr_lightning.app.training") for target in graph[module]), module


def test_fishr_collect_imports_no_torch():
    code = (
        "import sys; import fishr_lightning.app.reporting.collect as c; "
        "c.environment_labels('PACS', 4); "
        "print(sorted(m for m in ('torch', 'lightning', 'torchvision', 'matplotlib') if m in sys.modules))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert completed.stdout.strip() == "[]", completed.stdout + completed.stderr


def test_no_private_lightning_attribute_is_read_in_the_package():
    """Issue 18: ``trainer._results``, ``WeightAveraging._average_model`` and the like break on the next
    Lightning minor release. Attributes starting with ``_`` are read only from the package's own objects."""
    lightning_objects = ("trainer", "strategy", "pl_module", "lightning_module", "loop", "precision_plugin")
    found = []
    for path in PACKAGE_ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if any(name in ast.unparse(node.value) for name in lightning_objects):
                    found.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning"):
                found += [
                    f"{path.relative_to(PACKAGE_ROOT)}: WeightAveraging"
                    for a in node.names
                    if a.name == "WeightAveraging"
                ]
    assert not found, found
