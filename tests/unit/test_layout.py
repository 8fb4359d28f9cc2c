"""The package's layout rules: no import cycle, modules of a readable size, no Airflow under src/pipeline, and
every environment variable of the project read in one place (``pipeline.config``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
           for p in SRC.rglob("*.py")}
MAX_LINES = 480


def _imports(path: Path) -> set[str]:
    """Every pipeline module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
    return {name for name in found if name in MODULES}


def test_no_import_cycle_between_the_packages_modules():
    graph = {name: _imports(path) - {name, "pipeline"} for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, stack + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_modules_stay_a_readable_size():
    too_long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"split these modules by concern: {too_long}"


def test_the_library_never_imports_airflow():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not any(m.split(".")[0] == "airflow" for m in imported), name


def test_project_environment_variables_are_read_only_by_the_settings():
    for name, path in MODULES.items():
        if name == "pipeline.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("RECSYS_"):
                parent_reads = path.read_text()
                assert f'environ.get("{node.value}"' not in parent_reads and \
                    f'environ["{node.value}"]' not in parent_reads and f'getenv("{node.value}"' not in parent_reads, \
                    f"{name} reads {node.value}: read it through pipeline.config.Settings"
