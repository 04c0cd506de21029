"""Pipeline presets: registered through a hook, listed, validated, usable as `preset:` documents."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tokenprune as tp
from tokenprune.cli import app
from tokenprune.errors import PipelineError, PluginError
from tokenprune.plugins import get_plugin_manager

DOCS = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
BUILT_IN = {
    "fastv-k2-r50",
    "fastv-k2-r75",
    "fastv-k3-r50",
    "gprune-50",
    "gprune-70",
    "gprune-90",
    "pdrop-llava",
    "sparsevlm-192",
    "sparsevlm-128",
    "sparsevlm-64",
    "visionzip-192",
    "visionzip-128",
    "visionzip-64",
    "dycoke-llava-ov",
    "vidcom2-25",
    "holitom-15",
    "fastvid-10",
    "evs-q75",
    "prumerge",
    "prumerge-plus",
    "hiprune-192",
    "hiprune-128",
    "hiprune-64",
    "hiprune-next-640",
    "hiprune-next-320",
    "hiprune-next-160",
    "hiprune-qwen-33",
    "hiprune-qwen-22",
    "hiprune-qwen-11",
}


def _plugin(**presets):
    class Plugin:
        @staticmethod
        @tp.hookimpl
        def tokenprune_register_pipelines(registry):
            for name, kwargs in presets.items():
                registry.add(name, **kwargs)

    return Plugin()


HALF = {
    "definition": {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]},
    "paper": "Nobody (2026)",
    "table": "Table 9",
}


def test_the_built_in_presets_are_registered_by_their_reducers_plugins_and_validate():
    manager = get_plugin_manager()
    presets = manager.pipelines
    assert set(presets) == BUILT_IN
    for name in presets:
        preset = presets.get(name)
        assert preset.paper and preset.table
        assert presets.origin(name).distribution == "tokenprune"
        pipeline = tp.load_pipeline({"preset": name}, registry=manager.reducers, presets=presets)
        assert pipeline.name == name
        assert all(s.reducer.startswith(name.split("-")[0]) for s in pipeline.stages)


def test_the_presets_reproduce_the_official_settings():
    presets = get_plugin_manager().pipelines
    sparse = tp.load_pipeline({"preset": "sparsevlm-192"}, presets=presets)
    assert [(s.point.layer, s.keep) for s in sparse.stages] == [(3, 300), (7, 200), (16, 110)]
    assert sparse.positions == "compact" and not sparse.protect_newlines
    fastv = tp.load_pipeline({"preset": "fastv-k3-r50"}, presets=presets)
    assert [(s.point.layer, s.keep, s.params) for s in fastv.stages] == [(3, 0.5, {"rounding": "nearest"})]
    gprune = tp.load_pipeline({"preset": "gprune-70"}, presets=presets)
    assert gprune.stages[0].keep == pytest.approx(0.3) and gprune.stages[0].params["budget"] == "official"
    for tokens, split in ((192, (162, 30)), (128, (108, 20)), (64, (54, 10))):
        (stage,) = tp.load_pipeline({"preset": f"visionzip-{tokens}"}, presets=presets).stages
        assert (stage.point.kind, stage.keep, stage.params) == ("pre_projector", tokens, {})
        assert f"dominant={split[0]}, contextual={split[1]}" in presets.get(f"visionzip-{tokens}").table
    ttm, dp = tp.load_pipeline({"preset": "dycoke-llava-ov"}, presets=presets).stages
    assert (ttm.point.kind, ttm.reducer, ttm.keep, ttm.tokens) == ("post_projector", "dycoke", 0.3, "video")
    assert (str(dp.point), dp.reducer, dp.keep, dp.tokens) == ("decode layer 3", "dycoke_dp", 0.3, "video")
    (hiprune,) = tp.load_pipeline({"preset": "hiprune-qwen-33"}, presets=presets).stages
    assert (hiprune.keep, hiprune.params) == (0.334, {"object_layer": 16})
    for name, reducer, keep in (
        ("vidcom2-25", "vidcom2", 0.25),
        ("evs-q75", "evs", 0.25),
        ("fastvid-10", "fastvid", 0.1),
    ):
        (video,) = tp.load_pipeline({"preset": name}, presets=presets).stages
        assert (video.point.kind, video.reducer, video.keep, video.tokens, video.params) == (
            "post_projector",
            reducer,
            keep,
            "video",
            {},
        )


def test_video_preset_hook_registers_its_reducer_alone_on_the_video_tokens():
    from tokenprune_evs import EVS

    from tokenprune.video_reducer import video_preset_hook

    hook = video_preset_hook(EVS, "evs-tenth", 0.1, paper="P (2026)", table="Table 1", description="a tenth")

    class Plugin:
        tokenprune_register_pipelines = staticmethod(hook)

    manager = get_plugin_manager(plugins=[Plugin()])
    preset = manager.pipelines.get("evs-tenth")
    assert preset.definition == {"stages": [{"at": "post_projector", "tokens": "video", "reducer": "evs", "keep": 0.1}]}
    assert (preset.paper, preset.table, preset.description) == ("P (2026)", "Table 1", "a tenth")


def test_every_built_in_preset_is_documented_with_its_paper_and_table():
    rows = re.findall(r"^\| `([a-z0-9.-]+)` \|", DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert set(rows) == BUILT_IN


def test_a_preset_document_may_rename_but_not_change_the_preset(tmp_path):
    manager = get_plugin_manager(plugins=[_plugin(half=HALF)])
    assert tp.load_pipeline({"preset": "half", "name": "mine"}, presets=manager.pipelines).name == "mine"
    with pytest.raises(PipelineError, match="holds only `preset:` and optionally `name:`, not stages"):
        tp.load_pipeline({"preset": "half", "stages": []}, presets=manager.pipelines)
    with pytest.raises(PipelineError, match="unknown pipeline preset 'hafl'; did you mean 'half'"):
        tp.load_pipeline({"preset": "hafl"}, presets=manager.pipelines)


def test_a_preset_is_validated_against_the_reducers_when_used():
    broken = {**HALF, "definition": {"stages": [{"at": "post_projector", "reducer": "nosuch", "keep": 0.5}]}}
    manager = get_plugin_manager(plugins=[_plugin(broken=broken)])
    assert "broken" in manager.pipelines  # registering checks the shape only
    with pytest.raises(PipelineError, match="unknown reducer 'nosuch'"):
        tp.load_pipeline({"preset": "broken"}, registry=manager.reducers, presets=manager.pipelines)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("Bad Name", HALF, "a preset name is lower case"),
        ("nostages", {**HALF, "definition": {"positions": "compact"}}, "must be a mapping with a `stages:` list"),
        ("named", {**HALF, "definition": {"name": "x", "stages": []}}, "must not set `name` or `preset`"),
        ("nopaper", {**HALF, "paper": " "}, "must name its paper and the table"),
    ],
)
def test_malformed_presets_are_refused_naming_the_plugin(name, kwargs, message):
    manager = get_plugin_manager(plugins=[_plugin(**{name: kwargs})])
    with pytest.raises(PluginError, match=message):
        list(manager.pipelines)


def test_a_preset_name_two_plugins_register_collides_only_when_used():
    manager = get_plugin_manager(plugins=[_plugin(half=HALF), _plugin(half={**HALF, "table": "Table 8"})])
    assert "half" in manager.pipelines and "gprune-50" in manager.pipelines
    assert [c.name for c in manager.collisions] == ["half"]
    tp.load_pipeline({"preset": "gprune-50"}, registry=manager.reducers, presets=manager.pipelines)
    with pytest.raises(PluginError, match="pipeline preset 'half' is registered twice"):
        tp.load_pipeline({"preset": "half"}, presets=manager.pipelines)


def test_presets_match_shell_patterns():
    presets = get_plugin_manager().pipelines
    assert presets.matching("sparsevlm-*") == ["sparsevlm-128", "sparsevlm-192", "sparsevlm-64"]
    assert presets.matching("gprune-70") == ["gprune-70"]
    assert presets.matching("visionzip-*") == ["visionzip-128", "visionzip-192", "visionzip-64"]
    with pytest.raises(PipelineError, match="no pipeline preset matches 'fastervlm-\\*'"):
        presets.matching("fastervlm-*")


def test_the_cli_lists_presets_and_validates_a_preset_file(tmp_path):
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    presets = {p["name"]: p for p in listed["presets"]}
    assert set(presets) == BUILT_IN
    assert presets["pdrop-llava"]["plugin"] == "pdrop" and "PyramidDrop" in presets["pdrop-llava"]["paper"]
    assert presets["gprune-90"]["definition"]["stages"][0]["keep"] == pytest.approx(0.1)
    table = runner.invoke(app, ["plugins"], env={"COLUMNS": "250"}).stdout
    assert "pipeline presets" in table and "sparsevlm-192" in table
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("preset: fastv-k2-r50\n")
    bad.write_text("preset: fastv-k2-r05\n")
    assert runner.invoke(app, ["validate", str(good)]).exit_code == 0
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "unknown pipeline preset 'fastv-k2-r05'; did you mean" in result.output
