"""The package's shape: its modules import each other without cycles, at the top of the
file (no function-local import hiding a cycle), and nothing in the core builds native code."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pianist_jax"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package modules an import statement loads (a package's ``__init__`` included)."""
    found = set()
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return found
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            name = ".".join(parts[:i])
            if name in modules:
                found.add(name)
    return found


def test_no_import_cycles():
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # top-level imports only: they run at import time
            deps |= imported_modules(node, modules)
        parent = name.rsplit(".", 1)[0]
        graph[name] = {d for d in deps if d != name and d != parent and d != "pianist_jax"}
    state: dict[str, int] = {}

    def visit(name, stack):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [name, dep]))
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_package_modules_are_imported_at_the_top():
    modules = module_names()
    local = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    for node in ast.walk(fn)
                    if imported_modules(node, modules)
                ]
    assert not local, f"function-local imports of package modules: {local}"


def test_the_core_builds_no_native_code():
    for path in PACKAGE.rglob("*"):
        if path.suffix in (".py", ".cc", ".h", ".c", ".cpp"):
            text = path.read_text()
            assert "immintrin" not in text and "/proc/cpuinfo" not in text, path
            assert path.suffix == ".py", f"native source in the core package: {path}"
