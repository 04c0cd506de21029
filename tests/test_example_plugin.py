"""The example third-party package is found like any installed plugin, and the core never names it."""

import json
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.cli import app

ROOT = Path(__file__).resolve().parents[1]
DIST = "tokenprune-example-reducer"


@pytest.fixture(autouse=True)
def _installed():
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed; run `pip install -e examples/{DIST}` (scripts/setup.sh does)")


def test_it_is_discovered_through_its_entry_point():
    manager = tp.get_plugin_manager()
    assert manager.reducers.describe("centroid") == f"reducer 'centroid' (plugin 'centroid', distribution {DIST} 0.1.0)"


def test_tokenprune_plugins_lists_it_with_capabilities():
    report = json.loads(CliRunner().invoke(app, ["plugins", "--json"]).stdout)
    plugin = {p["name"]: p for p in report["plugins"]}["centroid"]
    assert plugin["distribution"] == DIST
    assert [r["name"] for r in plugin["reducers"]] == ["centroid"]
    assert plugin["reducers"][0]["params"]["properties"]["metric"]["enum"] == ["cosine", "l2"]


def test_it_is_usable_from_a_yaml_pipeline(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text("stages:\n  - {at: post_projector, reducer: centroid, keep: 0.25, params: {metric: l2}}\n")
    (reducer,) = tp.load_pipeline(path).build_reducers(tp.get_plugin_manager().reducers)
    assert type(reducer).__module__ == "tokenprune_example_reducer.reducer"
    assert reducer.params.metric == "l2"
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_it_can_be_disabled():
    assert "centroid" not in tp.get_plugin_manager(disabled=["centroid"]).reducers


def test_the_core_never_names_a_plugin():
    """Neither the example nor the built-ins are imported or named by the core package."""
    names = ["tokenprune_example_reducer", "tokenprune_random", "centroid"]
    for path in (ROOT / "tokenprune").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in names:
            assert name not in text, f"{path.relative_to(ROOT)} names {name!r}"
