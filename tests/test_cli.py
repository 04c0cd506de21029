"""The `tokenprune` command line: plugins, validate, schema."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tokenprune.cli import app

runner = CliRunner()


def test_plugins_json_lists_the_builtins_with_capabilities():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    random = {p["name"]: p for p in report["plugins"]}["random"]
    assert random["distribution"] == "tokenprune"
    (reducer,) = random["reducers"]
    assert reducer["name"] == "random"
    assert reducer["capabilities"]["insertion_points"] == ["layer", "post_projector"]
    assert reducer["capabilities"]["deterministic_count"] is True
    assert reducer["params"]["properties"]["seed"]["default"] == 0
    assert report["failures"] == []


def test_plugins_table_is_readable():
    result = runner.invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "tokenprune 0.1.0" in result.stdout and "Keep a uniformly random subset" in result.stdout


def test_disabled_plugin_is_gone_from_the_listing():
    result = runner.invoke(app, ["plugins", "--json"], env={"TOKENPRUNE_DISABLE_PLUGINS": "random"})
    assert "random" not in {p["name"] for p in json.loads(result.stdout)["plugins"]}


def test_broken_plugin_is_listed_as_a_failure(fake_distribution):
    fake_distribution("broken-dist", "broken_cli_plugin", "import not_a_module_anywhere\n", entry_point="broken")
    report = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    (failure,) = report["failures"]
    assert failure["name"] == "broken" and failure["distribution"] == "broken-dist"
    assert "ModuleNotFoundError" in failure["error"]
    assert "random" in {p["name"] for p in report["plugins"]}


def test_validate_accepts_a_good_pipeline(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("stages:\n  - {at: post_projector, reducer: random, keep: 0.25}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0
    assert "valid pipeline (1 stage: random at post_projector keep 0.25)" in result.stdout


def test_validate_rejects_a_bad_pipeline_with_exit_2_and_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - {at: post_projector, reducer: randon, keep: 2.5}\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "keep 2.5 is a fraction and must lie in (0, 1]" in result.stderr
    assert "Traceback" not in result.output


def test_validate_missing_file_is_exit_2(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_schema_writes_the_json_schema(tmp_path):
    out = tmp_path / "schema.json"
    assert runner.invoke(app, ["schema", "--output", str(out)]).exit_code == 0
    schema = json.loads(out.read_text())
    assert "Stage_random" in schema["$defs"]
    core = json.loads(runner.invoke(app, ["schema", "--core-only"]).stdout)
    assert "Stage_random" not in core["$defs"] and "Stage" in core["$defs"]


@pytest.mark.parametrize("env", [{}, {"TOKENPRUNE_DISABLE_PLUGINS": "random"}])
def test_the_installed_script_runs(env, tmp_path):
    """The console script exists and honours the environment, as a user would run it."""
    script = os.path.join(os.path.dirname(sys.executable), "tokenprune")
    result = subprocess.run(
        [script, "plugins", "--json"], capture_output=True, text=True, env={**os.environ, **env}, check=True
    )
    names = {p["name"] for p in json.loads(result.stdout)["plugins"]}
    assert ("random" in names) == ("TOKENPRUNE_DISABLE_PLUGINS" not in env)


def test_plugins_add_commands_through_the_hook(monkeypatch):
    import typer

    import tokenprune as tp
    import tokenprune.cli as cli

    fresh = typer.Typer()
    fresh.command("plugins")(cli.plugins)

    class Plugin:
        @staticmethod
        @tp.hookimpl
        def tokenprune_add_commands(app):
            @app.command("hello")
            def hello() -> None:
                """Say hello."""
                typer.echo("hello from a plugin")

    monkeypatch.setattr(cli, "app", fresh)
    monkeypatch.setattr(cli, "_manager", lambda: tp.get_plugin_manager(entry_points=False, plugins=[Plugin()]))
    result = runner.invoke(cli.get_app(), ["hello"])
    assert result.exit_code == 0 and "hello from a plugin" in result.stdout

    class Clash:
        @staticmethod
        @tp.hookimpl
        def tokenprune_add_commands(app):
            app.command("plugins")(lambda: None)

    clashing = typer.Typer()
    clashing.command("plugins")(cli.plugins)
    monkeypatch.setattr(cli, "app", clashing)
    monkeypatch.setattr(cli, "_manager", lambda: tp.get_plugin_manager(entry_points=False, plugins=[Clash()]))
    with pytest.raises(tp.TokenpruneError, match="adds commands that already exist: plugins"):
        cli.get_app()
    assert [c.name for c in clashing.registered_commands] == ["plugins"]  # nothing half-added


def test_the_atp_plugin_adds_train_atp():
    from tokenprune.cli import get_app

    result = runner.invoke(get_app(), ["train-atp", "--help"])
    assert result.exit_code == 0 and "--target-tokens" in result.stdout


def test_plugins_json_has_adapter_notes_and_the_transformers_range():
    report = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    adapters = {p["name"]: p for p in report["plugins"]}["adapters"]
    assert set(adapters["adapter_notes"]) == set(adapters["adapters"])
    assert "image_newline" in adapters["adapter_notes"]["llava_next"]
    from tokenprune.engine import compat

    assert report["transformers"] == {
        "version": compat.transformers_version(),
        "supported": compat.supported_range(),
        "in_range": True,
    }


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_validate_reports_an_empty_file(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "the file is empty" in result.output and "stages: []" in result.output


def test_validate_accepts_an_explicit_no_op(tmp_path):
    path = tmp_path / "noop.yaml"
    path.write_text("stages: []\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "valid pipeline (0 stages" in result.output
