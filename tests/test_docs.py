"""The docs site builds strictly and covers every hook and command (datasette-style meta-tests)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from tokenprune import hookspecs
from tokenprune.cli import get_app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _all_docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md"))


def test_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed; install the dev extra: pip install -e '.[dev]'")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "ScoringReducer" in api and "Selection.from_mask" in api.replace("</code><code>", "")
    # the YAML reference is generated from the pydantic models and the reducers' Params
    reference = (tmp_path / "site" / "reference" / "pipeline" / "index.html").read_text(encoding="utf-8")
    from tokenprune.pipeline import Pipeline, Stage

    for field in [*Pipeline.model_fields, *Stage.model_fields, "threshold", "temperature", "iterations"]:
        assert f"<code>{field}</code>" in reference, field


def test_every_hookspec_is_documented():
    text = _all_docs_text()
    for name in dir(hookspecs):
        if name.startswith("tokenprune_"):
            assert name in text, f"hook {name} is not in docs/"


def test_every_cli_command_is_documented():
    cli_doc = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    commands = typer.main.get_command(get_app()).commands  # type: ignore[attr-defined]
    for name in commands:
        assert re.search(rf"`tokenprune {name}\b", cli_doc), f"`tokenprune {name}` is not in docs/reference/cli.md"


def test_every_adapter_check_is_in_the_adapter_tutorial():
    """The tutorial's table lists each check of check_adapter by name and function, in the tuples' order."""
    from tokenprune.testing import adapters

    text = (DOCS / "extending" / "adapters.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    names = [row.split("|")[1].strip() for row in rows]
    checks = [*adapters.INVARIANTS, *adapters.ADAPTER_CHECKS]
    assert [c.name for c in checks] == [n for n in names if n in {c.name for c in checks}]
    for check in checks:
        function = getattr(check.run, "func", check.run).__name__
        assert f"| {check.name} | `{function}` |" in text, check.name


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for script in re.findall(r"bash (scripts/\S+\.sh)", readme):
        assert (ROOT / script).is_file(), script
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test.sh" in ci and "bash scripts/test.sh" in readme


def test_every_builtin_reducer_has_a_docs_page():
    from tokenprune.plugins import get_plugin_manager

    registry = get_plugin_manager().reducers
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    builtins = [n for n in registry if (o := registry.origin(n)) is not None and o.distribution == "tokenprune"]
    assert len(builtins) >= 6
    for name in builtins:
        page = DOCS / "reducers" / f"{name}.md"
        assert page.is_file(), f"no docs page for the built-in reducer {name!r}"
        assert f"reducers/{name}.md" in nav, f"docs/reducers/{name}.md is not in the mkdocs nav"


def test_where_things_live_lists_the_top_level_exactly():
    """docs/concepts.md's layout table names every module and folder of tokenprune/, and only those."""
    section = (DOCS / "concepts.md").read_text(encoding="utf-8").split("## Where things live", 1)[1]
    documented = set(re.findall(r"^\| `([a-z_]+(?:\.py|/))` \|", section, flags=re.M))
    package = ROOT / "tokenprune"
    actual = {p.name + "/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    actual |= {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    assert documented == actual
