"""The house rules of docs/architecture.md, checked: small modules, functions that fit a screen, no block
written twice, and the packages in the order of the pipelines they hold."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

QTOOL = Path(__file__).resolve().parent.parent / "qtool"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
DUPLICATE_RUN = 6


def _modules() -> list[Path]:
    return sorted(p for p in QTOOL.rglob("*.py") if "configs" not in p.parts)


def test_no_module_over_450_lines():
    long = {str(p.relative_to(QTOOL)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_80_lines():
    long = {}
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(QTOOL)}:{node.lineno} {node.name}"] = n
    assert not long, long


def _code_lines(p: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of lines that carry code: blank lines, comments, imports and lone
    brackets do not count (they repeat by nature)."""
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith(("#", "import ", "from ")) or text in (")", "]", "}", '"""', "else:", "try:"):
            continue
        out.append((i, text))
    return out


def test_no_block_of_six_lines_written_twice():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for p in _modules():
        lines = _code_lines(p)
        for k in range(len(lines) - DUPLICATE_RUN + 1):
            window = tuple(text for _, text in lines[k:k + DUPLICATE_RUN])
            seen[window].append(f"{p.relative_to(QTOOL)}:{lines[k][0]}")
    twice = {places[0]: places[1:] for places in seen.values() if len(places) > 1}
    assert not twice, twice


def test_the_pipelines_are_packages():
    assert {p.name for p in QTOOL.iterdir() if p.is_dir() and (p / "__init__.py").exists()} >= {
        "core", "estimate", "quantize", "verify", "cli"}
    assert {p.stem for p in (QTOOL / "quantize").glob("*.py")} >= {"source", "plan", "stream", "sink", "finalize"}
