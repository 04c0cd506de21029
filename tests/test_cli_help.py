"""Every command's ``--help`` reads boolean flags as flags: ``--quiet``, not ``--quiet <bool>``."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from tokenprune.cli import get_app

runner = CliRunner()
TYPE_OF_A_FLAG = re.compile(r"<bool>|\bBOOLEAN\b")


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and group of the app (plugins' commands included), as argument paths."""
    paths: list[tuple[str, ...]] = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(get_app()), ())
    return paths


PATHS = _command_paths()


def test_the_walk_finds_the_commands():
    names = {" ".join(p) for p in PATHS}
    assert {"", "plugins", "validate", "schema", "compare", "flops", "run", "synth", "train-atp"} <= names
    assert any(p[:1] == ("synth",) and len(p) == 2 for p in PATHS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "tokenprune")
def test_no_flag_shows_a_type_in_help(path):
    result = runner.invoke(get_app(), [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output
    assert not TYPE_OF_A_FLAG.search(result.output), result.output


@pytest.mark.parametrize(
    ("path", "flag", "valued"),
    [
        (("compare",), "--quiet", "--output"),
        (("plugins",), "--json", None),
        (("flops",), "--no-fvcore", "--dtype"),
        ((), "--version", None),
    ],
)
def test_flags_are_bare_and_valued_options_keep_their_type(path, flag, valued):
    output = runner.invoke(get_app(), [*path, "--help"], env={"COLUMNS": "200"}).output
    (line,) = [row for row in output.splitlines() if f"{flag} " in row]
    assert re.search(rf"{re.escape(flag)}\s+(-\w\s+)?[A-Z]", line), line  # the help text follows the flag
    if valued:
        (value_line,) = [row for row in output.splitlines() if f"{valued} " in row]
        assert re.search(r"<\w+>", value_line), value_line


def test_flags_still_work_after_the_help_was_shown():
    assert runner.invoke(get_app(), ["plugins", "--help"]).exit_code == 0
    result = runner.invoke(get_app(), ["plugins", "--json"])
    assert result.exit_code == 0 and result.stdout.lstrip().startswith("{")
