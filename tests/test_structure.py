"""Layering rules of the code base (issue 17): the algorithm package stands alone, no import cycles
among its modules, the CLI stays thin, target names are not compared outside profile/backend modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_quest_imports_nothing_from_quest_export() -> None:
    offenders = {p.name: sorted(m for m in _imports(p) if m.split(".")[0] == "quest_export")
                 for p in (ROOT / "quest").glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycle_among_quest_modules() -> None:
    graph = {f"quest.{p.stem}": {m for m in _imports(p) if m.startswith("quest.")} for p in (ROOT / "quest").glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_cli_is_parse_call_print() -> None:
    assert len((ROOT / "quest_export" / "cli.py").read_text().splitlines()) < 400


def test_target_names_are_compared_only_in_their_own_modules() -> None:
    allowed = {"quest/profiles.py", "quest_export/engine/backends.py"}
    pattern = re.compile(r"""(==|!=)\s*["'](tensorrt|onnxruntime|openvino)["']|["'](tensorrt|onnxruntime|openvino)["']\s*(==|!=)"""
                         r"""|(not\s+in|\bin)\s*\(["'](tensorrt|onnxruntime|openvino)["']""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in list((ROOT / "quest").rglob("*.py")) + list((ROOT / "quest_export").rglob("*.py"))
            if str(p.relative_to(ROOT)) not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_no_private_attribute_access_across_modules() -> None:
    private = re.compile(r"\b(?!self\b|cls\b)[a-z_][a-z0-9_]*\._input\b")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in list((ROOT / "quest").rglob("*.py")) + list((ROOT / "quest_export").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert hits == []
