"""The module graph: no module imports itself through others; the compiled module is optional."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fabric

PACKAGE = Path(fabric.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The fabric modules `path` imports anywhere in its code (but under `if TYPE_CHECKING:`)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_itself_through_others() -> None:
    graph = _graph()
    # The package's __init__ gathers the public API from the modules below it: it is the one
    # module allowed to be imported by what it imports (`from . import __version__`).
    graph = {m: {t for t in targets if t != "fabric"} for m, targets in graph.items()}
    cycles = [" -> ".join(c) for m in sorted(graph) if (c := _cycle_through(graph, m))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)



def test_fabric_and_its_cli_work_where_the_compiled_module_was_not_built() -> None:
    code = (
        "import sys; sys.modules['fabric.proxy._head'] = None\n"  # None: its import fails, as if never built
        "import fabric.cli\n"
        "from click.testing import CliRunner\n"
        "result = CliRunner().invoke(fabric.cli.main, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
