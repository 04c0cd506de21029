"""Two plugins registering the same name: everything is listed, only the colliding name fails.

The plugins are installed distributions (``dist-info`` folders with entry points, as ``pip install``
leaves them), and the tutorial's case uses the real example package the set-up installs
(``tokenprune-example-reducer``, whose reducer is ``centroid``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_sources import reducer_plugin_source
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune import PluginError
from tokenprune.bench.tasks import Task
from tokenprune.cli import app
from tokenprune.plugins import get_plugin_manager

runner = CliRunner()
RANDOM = "stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n"
TWIN = "stages:\n  - {at: post_projector, reducer: twin, keep: 0.5}\n"

ADAPTER_PLUGIN = """
import tokenprune
from tokenprune.adapters import ModelAdapter


class {cls}(ModelAdapter):
    name = "{cls_lower}"
    model_types = ("twin_vlm", "{own}")
    notes = "{notes}"


@tokenprune.hookimpl
def tokenprune_register_adapters(registry):
    registry.add({cls})
"""


@pytest.fixture
def twins(fake_distribution):
    """Two installed distributions that both register a reducer ``twin`` (classes A and B)."""
    fake_distribution(
        "first-dist", "first_plugin", reducer_plugin_source("twin", cls="A"), entry_point="first", version="1.0"
    )
    fake_distribution(
        "second-dist", "second_plugin", reducer_plugin_source("twin", cls="B"), entry_point="second", version="2.0"
    )


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _assert_names_both_and_the_fix(message: str) -> None:
    assert "reducer 'twin' is registered twice" in message
    assert "plugin 'first' (distribution first-dist 1.0) (first_plugin.A)" in message
    assert "plugin 'second' (distribution second-dist 2.0) (second_plugin.B)" in message
    assert "TOKENPRUNE_DISABLE_PLUGINS=first or TOKENPRUNE_DISABLE_PLUGINS=second" in message


def test_the_registry_lists_the_name_and_fails_only_when_it_is_used(twins):
    manager = get_plugin_manager()
    reducers = manager.reducers  # building the registry no longer raises
    assert {"twin", "random", "centroid"} <= set(reducers)
    assert "twin" in tp.list_reducers()
    assert reducers.get("random").name == "random"
    (collision,) = manager.collisions
    assert (collision.kind, collision.name) == ("reducer", "twin")
    assert [c.origin.distribution for c in collision.claims] == ["first-dist", "second-dist"]
    assert [c.value.__name__ for c in collision.claims] == ["A", "B"]
    assert reducers.registered_by("twin", "second").__name__ == "B"
    assert reducers.provided_by("first") == ["twin"] and reducers.provided_by("second") == ["twin"]
    with pytest.raises(PluginError) as info:
        reducers.get("twin")
    _assert_names_both_and_the_fix(str(info.value))
    assert "twin" not in reducers.unambiguous() and "random" in reducers.unambiguous()


def test_pipelines_that_do_not_use_the_name_work_and_one_that_does_fails(twins, tmp_path):
    registry = get_plugin_manager().reducers
    pipe = tp.load_pipeline(_write(tmp_path, "random.yaml", RANDOM), registry=registry)
    assert [type(r).name for r in pipe.build_reducers(registry)] == ["random"]
    with pytest.raises(PluginError) as info:
        tp.load_pipeline(_write(tmp_path, "twin.yaml", TWIN), registry=registry)
    _assert_names_both_and_the_fix(str(info.value))


def test_disabling_one_plugin_as_the_message_says_resolves_it(twins, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGINS", "second")
    manager = get_plugin_manager()
    assert manager.collisions == []
    assert manager.reducers.get("twin").__name__ == "A"
    tp.load_pipeline(_write(tmp_path, "twin.yaml", TWIN), registry=manager.reducers)


def test_cli_plugins_lists_both_and_marks_the_collision(twins):
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_plugin = {p["name"]: p for p in report["plugins"]}
    for plugin, cls in (("first", "first_plugin.A"), ("second", "second_plugin.B")):
        (reducer,) = by_plugin[plugin]["reducers"]
        assert (reducer["name"], reducer["class"], reducer["collision"]) == ("twin", cls, True)
    assert by_plugin["random"]["reducers"][0]["collision"] is False
    (collision,) = report["collisions"]
    assert [(c["plugin"], c["distribution"], c["version"]) for c in collision["claims"]] == [
        ("first", "first-dist", "1.0"),
        ("second", "second-dist", "2.0"),
    ]
    _assert_names_both_and_the_fix(collision["message"])

    table = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert table.exit_code == 0
    assert "twin (collision)" in table.stdout and "random" in table.stdout
    assert "collision: reducer 'twin' is registered twice" in table.stderr


def test_cli_validate_and_schema_keep_working(twins, tmp_path):
    ok = runner.invoke(app, ["validate", str(_write(tmp_path, "random.yaml", RANDOM))])
    assert ok.exit_code == 0, ok.output
    assert "valid pipeline (1 stage: random" in ok.stdout
    bad = runner.invoke(app, ["validate", str(_write(tmp_path, "twin.yaml", TWIN))])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    _assert_names_both_and_the_fix(" ".join(bad.stderr.split()))
    schema = runner.invoke(app, ["schema"])
    assert schema.exit_code == 0
    defs = json.loads(schema.stdout)["$defs"]
    assert "Stage_random" in defs and "Stage_twin" not in defs
    assert "left out of the schema: reducer 'twin'" in schema.stderr


def test_the_installed_script_keeps_working(twins, tmp_path):
    """As a user runs it (the console script, both distributions on the path): one process, as each
    start costs seconds; the listing and the failing pipeline are checked in-process above."""
    script = os.path.join(os.path.dirname(sys.executable), "tokenprune")
    path = os.pathsep.join([str(tmp_path / "first-dist"), str(tmp_path / "second-dist"), *sys.path])
    result = subprocess.run(
        [script, "validate", str(_write(tmp_path, "r.yaml", RANDOM))],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert result.returncode == 0, result.stderr
    assert "valid pipeline (1 stage: random" in result.stdout


def test_the_tutorials_old_name_against_the_installed_example_package(fake_distribution, tmp_path):
    """The issue's case: a reader's package named ``centroid``, next to tokenprune-example-reducer."""
    fake_distribution("my-reducer", "my_reducer", reducer_plugin_source("centroid"), entry_point="mine")
    listing = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    (collision,) = listing["collisions"]
    assert {c["distribution"] for c in collision["claims"]} == {"tokenprune-example-reducer", "my-reducer"}
    assert runner.invoke(app, ["validate", str(_write(tmp_path, "r.yaml", RANDOM))]).exit_code == 0
    assert "centroid" in tp.list_reducers()
    bad = runner.invoke(app, ["validate", str(_write(tmp_path, "c.yaml", RANDOM.replace("random", "centroid")))])
    message = " ".join(bad.stderr.split())
    assert bad.exit_code == 2
    assert "distribution tokenprune-example-reducer 0.1.0" in message and "distribution my-reducer 1.0" in message
    assert "TOKENPRUNE_DISABLE_PLUGINS=centroid or TOKENPRUNE_DISABLE_PLUGINS=mine" in message


def test_a_model_type_claimed_by_two_adapter_plugins(fake_distribution):
    for cls, dist, own in (("First", "first-adapters", "first_vlm"), ("Second", "second-adapters", "second_vlm")):
        source = ADAPTER_PLUGIN.format(cls=cls, cls_lower=cls.lower(), own=own, notes=f"{cls} notes.")
        fake_distribution(dist, f"{cls.lower()}_adapters", source, entry_point=f"{cls.lower()}_adapters")
    manager = get_plugin_manager()
    assert manager.adapters.get("first_vlm").__name__ == "First"
    assert manager.adapters.get("llava_next").__name__  # the built-in adapters are untouched
    with pytest.raises(PluginError) as info:
        manager.adapters.get("twin_vlm")
    message = str(info.value)
    assert "adapter for model_type 'twin_vlm' is registered twice" in message
    assert "first-adapters" in message and "second-adapters" in message
    assert "TOKENPRUNE_DISABLE_PLUGINS=first_adapters or TOKENPRUNE_DISABLE_PLUGINS=second_adapters" in message

    report = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    by_plugin = {p["name"]: p for p in report["plugins"]}
    assert by_plugin["second_adapters"]["adapter_notes"] == {"second_vlm": "Second notes.", "twin_vlm": "Second notes."}
    assert [(c["kind"], c["name"]) for c in report["collisions"]] == [("adapter for model_type", "twin_vlm")]
    table = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "twin_vlm (collision)" in table.stdout


def _task(cls_name: str) -> type[Task]:
    return type(cls_name, (Task,), {"name": "twin_task", "examples": lambda self: []})


def test_a_task_name_registered_twice_directly():
    """Plugins registered in code (no distribution): the fix is to register one class only."""

    def plugin(task: type[Task]) -> object:
        class Plugin:
            @staticmethod
            @tp.hookimpl
            def tokenprune_register_tasks(registry):
                registry.add(task)

        return Plugin()

    manager = get_plugin_manager(plugins=[plugin(_task("One")), plugin(_task("Two"))])
    assert manager.tasks.get("synthvqa").name == "synthvqa"
    with pytest.raises(PluginError, match=r"task 'twin_task' is registered twice: .*register only one of the classes"):
        manager.tasks.get("twin_task")
    assert [c.name for c in manager.collisions] == ["twin_task"]
