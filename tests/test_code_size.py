"""The project's size limits hold in tokenprune/ and plugins/: no function over 60 lines, no class over 300.

Docstrings (of the function or class and of everything nested in it) are not counted; comments and blank
lines are. ``python tests/test_code_size.py`` lists every offender.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("tokenprune", "plugins")
MAX_FUNCTION, MAX_CLASS = 60, 300

Scoped = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module


def _docstring_lines(node: ast.AST) -> set[int]:
    out: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None) if isinstance(inner, Scoped) else None
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                out |= set(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    return out


def counted_lines(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """Lines of ``node`` (decorators excluded) less its docstrings and those of what it nests."""
    lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return len(lines - _docstring_lines(node))


def offenders(root: Path = ROOT) -> list[str]:
    """``path:line kind name (N lines)`` for every function over 60 and class over 300 counted lines."""
    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                    n = counted_lines(node)
                    if n > limit:
                        kind = "class" if isinstance(node, ast.ClassDef) else "function"
                        out.append(f"{path.relative_to(root)}:{node.lineno} {kind} {node.name} ({n} lines > {limit})")
    return out


def test_no_function_over_60_and_no_class_over_300_lines():
    found = offenders()
    assert not found, "split these (docstrings do not count):\n" + "\n".join(found)


def test_the_counter_counts_code_not_docstrings():
    source = 'def f():\n    """Doc\n    more."""\n    x = 1\n\n    def g():\n        """Inner."""\n        return x\n'
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert counted_lines(node) == 5  # def f, x = 1, the blank line, def g, return x: both docstrings left out


if __name__ == "__main__":
    print("\n".join(offenders()) or "no function over 60 lines and no class over 300")
    sys.exit(1 if offenders() else 0)
