"""The code's layout is kept: a test module for every subpackage of `pipeline/`, and every module of the library
imported by name by some test (so each is tested directly, not only through whatever happens to call it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level modules tested in a module named for what they serve rather than for the file.
HOMES = {"recipe": "test_bench.py", "run_config": "test_orchestration.py", "outputs": "test_names.py",
         "splits": "test_datasets.py", "plan": "test_plan.py", "demo": "test_flows.py"}
CONSTANTS = {"pipeline", "pipeline.__main__", "pipeline.config", "pipeline.errors"}  # no behaviour of their own


def _library_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name == "__init__.py" and not path.read_text().strip():
            continue  # an empty package marker
        names.append(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"))
    return names


def _imported_by_tests() -> set[str]:
    seen: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
                seen.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names)
        seen.update(re.findall(r"\bfrom (pipeline[\w.]*) import", text))  # code run in a child process
    return seen


def test_every_subpackage_and_top_level_module_has_a_test_module():
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    packages = [p.name for p in sorted((ROOT / "pipeline").iterdir()) if (p / "__init__.py").is_file()]
    assert [p for p in packages if f"test_{p}.py" not in tests] == []
    top = [p.stem for p in (ROOT / "pipeline").glob("*.py") if f"pipeline.{p.stem}" not in CONSTANTS
           and p.name != "__init__.py"]
    missing = [m for m in top if f"test_{m}.py" not in tests and HOMES.get(m) not in tests]
    assert missing == []
    for module, home in HOMES.items():  # a home really tests its module
        assert re.search(rf"\bpipeline\.{module}\b", (ROOT / "tests" / home).read_text()), (module, home)


def test_every_library_module_is_imported_by_a_test():
    seen = _imported_by_tests()
    assert [m for m in _library_modules() if m not in seen and m not in CONSTANTS] == []


NESTING = (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.AsyncFor, ast.AsyncWith, ast.Match)
MAX_FUNCTION_LINES, MAX_NESTING, MAX_MODULE_LINES = 60, 4, 400


def _depth(node: ast.AST, depth: int = 0) -> int:
    """The deepest block nesting inside `node` (an `elif` continues its `if`; nested functions count apart)."""
    deepest = depth
    elif_ = node.orelse[0] if isinstance(node, ast.If) and len(node.orelse) == 1 else None
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        step = 0 if child is elif_ or not isinstance(child, NESTING) else 1
        deepest = max(deepest, _depth(child, depth + step))
    return deepest


def test_functions_and_modules_stay_small():
    too_big = []
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines, depth = node.end_lineno - node.lineno + 1, _depth(node)
                if lines > MAX_FUNCTION_LINES or depth > MAX_NESTING:
                    too_big.append(f"{name}:{node.lineno} {node.name}: {lines} lines, nested {depth} deep")
    assert too_big == []
