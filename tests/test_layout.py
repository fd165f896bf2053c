"""The package's shape: one-way imports (function-level ones included), no module over 700 lines, and
the algorithm module pure (it imports no file handling, process group, or command line)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mtcore"
MAX_LINES = 700
ALGORITHM = "mtcore.mutual_taught"


def module_name(path: Path) -> str:
    rel = path.relative_to(path.parent.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The mtcore modules `path` imports anywhere in it (top level, inside functions, under
    TYPE_CHECKING alike). `from mtcore import x` names the module mtcore.x when there is one, else the
    package; `from mtcore.a import b` names mtcore.a (or mtcore.a.b when b is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mtcore")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "mtcore":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    me = module_name(path)
    return {m for m in found if m in modules and m != me}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(package.glob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / "mtcore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mtcore.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from mtcore import a\n    return a\n")
    graph = import_graph(pkg)
    assert graph["mtcore.a"] == {"mtcore.b"} and graph["mtcore.b"] == {"mtcore.a"}
    assert find_cycle(graph) == ["mtcore.a", "mtcore.b", "mtcore.a"]


def test_mtcore_imports_one_way():
    graph = import_graph()
    assert len(graph) > 15, sorted(graph)  # the package was found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", ["files", "errors"])
def test_the_bottom_modules_import_nothing_of_mtcore_but_errors(name):
    assert import_graph()[f"mtcore.{name}"] <= {"mtcore.errors"}


def test_no_module_is_over_700_lines():
    sizes = {f.name: len(f.read_text().splitlines()) for f in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_the_algorithm_is_short_and_pure():
    """mutual_taught.py reads top to bottom in one sitting and touches no file, process group or
    command line: it imports no mtcore module, nor os, shutil, pathlib, json, torch or click."""
    path = PACKAGE / "mutual_taught.py"
    assert len(path.read_text().splitlines()) < 300
    assert import_graph()[ALGORITHM] == set()
    tree = ast.parse(path.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"os", "shutil", "pathlib", "json", "torch", "click", "io", "tempfile"}, imported


def test_the_loop_points_to_the_algorithm_page():
    doc = ast.get_docstring(ast.parse((PACKAGE / "loop.py").read_text()))
    assert "docs/algorithm.md" in doc and "mutual_taught.py" in doc
    assert (PACKAGE.parent / "docs" / "algorithm.md").is_file()


def test_help_imports_neither_torch_nor_transformers():
    """`mtcore --help` and every command's --help load click and mtcore's option tables only (torch
    alone takes 1.5 s to import on this CPU): a fresh interpreter shows every help, then has imported
    neither torch, transformers, triton nor numpy. (The time itself is measured in the note, not here.)"""
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom mtcore.cli import main\n"
            "for args in [[]] + [[c] for c in main.commands]:\n"
            "    r = CliRunner().invoke(main, args + ['--help'])\n"
            "    assert r.exit_code == 0 and 'Usage:' in r.output, (args, r.output)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'triton', 'numpy', 'safetensors') if m in sys.modules)\n"
            "assert not heavy, heavy\nprint(len(main.commands))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 10
