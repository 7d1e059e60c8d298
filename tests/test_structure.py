"""The package's shape holds as it grows: the ann layer sits below index/ and search/, which never import each
other; no private name crosses a module; files, functions and the app factory stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "clip_hpc"
MAX_FILE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from X import names` and `import X` in the file, lazy imports included."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def wing(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def test_index_and_search_meet_only_in_the_ann_layer() -> None:
    crossings = []
    for path in modules():
        for module, _ in imported(path):
            target = module.split(".")[1] if module.startswith("clip_hpc.") else None
            source = wing(path)
            if (source, target) in {("index", "search"), ("search", "index"), ("ann", "index"), ("ann", "search")}:
                crossings.append(f"{path.relative_to(ROOT)} imports {module}")
    assert crossings == []


def test_no_private_name_crosses_a_module() -> None:
    private = [
        f"{path.relative_to(ROOT)}: {module}.{name}"
        for path in [*modules(), *sorted((ROOT / "scripts").glob("*.py"))]
        for module, names in imported(path)
        if module.startswith("clip_hpc")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_files_and_functions_stay_readable() -> None:
    too_long = []
    for path in [*modules(), *sorted((ROOT / "scripts").glob("*.py"))]:
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_create_app_composes_routers_in_under_60_lines() -> None:
    tree = ast.parse((PACKAGE / "server" / "app.py").read_text())
    (create_app,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "create_app"]
    assert create_app.end_lineno is not None and create_app.end_lineno - create_app.lineno + 1 < 60
    assert "include_router" in ast.unparse(create_app)
