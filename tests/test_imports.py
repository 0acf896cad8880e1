"""The shape of the code: no import cycle in pd_core, pd_core free of orchestration, modules of bounded size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, at module level or inside functions."""
    modules = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package's own submodules importing their package's __init__ is how Python packages work
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["pd_core", "tasks", "flows"])
def test_no_import_cycle_even_through_function_level_imports(package):
    graph = import_graph(package)
    assert len(graph) > 3
    assert find_cycle(graph) is None


def test_pd_core_never_imports_prefect_or_mlflow():
    for path in (ROOT / "pd_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("prefect", "mlflow")], path


def test_no_module_is_over_500_lines():
    folders = ["pd_core", "tasks", "flows", "deployments", "tests", "benchmarks", "scripts"]
    long = {str(p.relative_to(ROOT)): n for folder in folders for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these along their seams: {long}"


# a comment line, at any indent, that opens with a rule and holds one of 4+ characters: "# ---- x ----",
# "    # -- x -----", "# ==== x"; not a comment about an option ("# --tiny: ...")
BANNER = re.compile(r"^[ \t]*#[ \t]*(?=--|==)(?=.*(?:----|====))", re.MULTILINE)


def banners(text: str) -> list[str]:
    """The section-banner lines of a module's text."""
    return [m.group(0) + text[m.end():].split("\n", 1)[0] for m in BANNER.finditer(text)]


def test_the_banner_finder_finds_banners_and_not_option_comments():
    text = ("# ---- data ----\n    # -- servers ------\n# ----------\n# ===== x\n"
            "# --tiny: the same code\n# --durations in one run\nx = 1  # ---- trailing\n")
    assert banners(text) == ["# ---- data ----", "    # -- servers ------", "# ----------", "# ===== x"]


def test_no_section_banners_in_the_library_benchmarks_and_scripts():
    """A module that needs ``# ----`` banners is several modules."""
    hits = {str(p.relative_to(ROOT)): found
            for folder in ("pd_core", "tasks", "flows", "deployments", "benchmarks", "scripts")
            for p in (ROOT / folder).rglob("*.py") if (found := banners(p.read_text()))}
    assert not hits, f"split these along their banners: {hits}"


# Test files whose sections share the file's helpers (some also a module-scoped pipeline, server or parsed file):
# they keep their banners until they are split along them. Any other test file (a new one included) has none.
TEST_FILES_WITH_BANNERS = frozenset({
    "tests/pipeline/test_smoke_run.py", "tests/test_compose.py", "tests/test_config.py", "tests/test_data.py",
    "tests/test_tracking.py",
})


def test_no_section_banners_in_other_test_files():
    hits = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py") if banners(p.read_text())}
    assert hits <= TEST_FILES_WITH_BANNERS, f"split these along their banners: {sorted(hits - TEST_FILES_WITH_BANNERS)}"
