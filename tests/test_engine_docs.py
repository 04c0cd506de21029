"""docs/engine.md stays true to tokenprune/engine/: its module table names every module."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_engine_module_table_lists_every_engine_module():
    """docs/engine.md's module table names every module of tokenprune/engine/, and only those."""
    text = (ROOT / "docs" / "engine.md").read_text(encoding="utf-8")
    section = text.split("## The modules", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+\.py)` \|", section, flags=re.M))
    actual = {p.name for p in (ROOT / "tokenprune" / "engine").glob("*.py") if p.name != "__init__.py"}
    assert documented == actual
