"""Discovery through entry points, disabling, broken plugins, registry checks (collisions: test_plugin_collisions)."""

import pytest
from plugin_sources import reducer_plugin_source

import tokenprune as tp
from tokenprune import PluginError, PluginLoadWarning, ReducerParams, ScoringReducer, TokenReducer
from tokenprune.adapters import ModelAdapter
from tokenprune.errors import UnknownReducerError, UnsupportedModelError
from tokenprune.plugins import AdapterRegistry, ReducerRegistry, get_plugin_manager


def test_builtin_random_is_found_through_its_entry_point():
    manager = get_plugin_manager()
    info = {p.name: p for p in manager.plugins}["random"]
    assert (info.distribution, info.version, info.module) == ("tokenprune", tp.__version__, "tokenprune_random")
    assert manager.reducers.provided_by("random") == ["random"]
    assert "random" in tp.list_reducers()


def test_no_entry_points_means_no_builtins():
    assert len(get_plugin_manager(entry_points=False).reducers) == 0


def test_disable_env_blocks_a_plugin(monkeypatch):
    monkeypatch.setenv("TOKENPRUNE_DISABLE_PLUGINS", " random , something_else")
    manager = get_plugin_manager()
    assert "random" not in manager.reducers
    assert "random" not in {p.name for p in manager.plugins}
    assert "random" in get_plugin_manager(disabled=[]).reducers  # an explicit list overrides the env


def test_third_party_plugin_is_discovered_with_its_distribution(fake_distribution):
    fake_distribution(
        "acme-pruners", "acme_norm", reducer_plugin_source("acme_norm"), entry_point="acme", version="0.3"
    )
    manager = get_plugin_manager()
    assert (
        manager.reducers.describe("acme_norm") == "reducer 'acme_norm' (plugin 'acme', distribution acme-pruners 0.3)"
    )
    assert manager.reducers.provided_by("acme") == ["acme_norm"]
    assert "random" in manager.reducers


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_still_load(fake_distribution):
    fake_distribution(
        "broken-dist", "broken_plugin", "raise ImportError('needs libfoo >= 2')\n", entry_point="broken", version="9.9"
    )
    fake_distribution("fine-dist", "fine_plugin", reducer_plugin_source("fine"), entry_point="fine")
    with pytest.warns(
        PluginLoadWarning,
        match=r"plugin 'broken' \(distribution broken-dist 9.9\) failed to load: ImportError: needs libfoo >= 2",
    ):
        manager = get_plugin_manager()
    assert [(f.name, f.distribution, f.error) for f in manager.failures] == [
        ("broken", "broken-dist", "ImportError: needs libfoo >= 2")
    ]
    assert {"fine", "random"} <= set(manager.reducers)


def test_a_hook_missing_its_marker_is_a_load_failure(fake_distribution):
    source = reducer_plugin_source("unmarked").replace("@tokenprune.hookimpl\n", "")
    fake_distribution("unmarked-dist", "unmarked_plugin", source, entry_point="unmarked")
    with pytest.warns(PluginLoadWarning, match="is not marked with @tokenprune.hookimpl"):
        manager = get_plugin_manager()
    assert "unmarked" not in manager.reducers


def test_a_misspelt_hook_is_a_load_failure(fake_distribution):
    source = reducer_plugin_source("typo").replace(
        "def tokenprune_register_reducers", "def tokenprune_register_reducer"
    )
    fake_distribution("typo-dist", "typo_plugin", source, entry_point="typo")
    with pytest.warns(PluginLoadWarning, match="'tokenprune_register_reducer', which is not a tokenprune hook"):
        manager = get_plugin_manager()
    assert manager.failures[0].distribution == "typo-dist"
    assert "typo" not in {p.name for p in manager.plugins}


def test_plugins_registered_directly_are_listed_without_distribution():
    class Plugin:
        @staticmethod
        @tp.hookimpl
        def tokenprune_register_reducers(registry):
            registry.add(Direct)

    class Direct(ScoringReducer):
        name = "direct"

        def score(self, tokens, ctx):
            return tokens.sum(-1)

    manager = get_plugin_manager(entry_points=False, plugins=[Plugin()])
    assert list(manager.reducers) == ["direct"]
    assert "registered directly" in manager.plugins[0].describe()


def test_a_hook_built_by_reducers_hook_registers_each_class_with_its_origin():
    import types

    from tokenprune.plugins import reducers_hook

    class Second(Good):
        name = "second"

    module = types.ModuleType("built_hook_plugin")
    module.tokenprune_register_reducers = reducers_hook(Good, Second)
    manager = get_plugin_manager(entry_points=False, plugins=[module])
    assert list(manager.reducers) == ["good", "second"]
    assert manager.reducers.provided_by("built_hook_plugin") == ["good", "second"]
    assert manager.failures == []


class Good(ScoringReducer):
    name = "good"

    def score(self, tokens, ctx):
        return tokens.sum(-1)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (int, "not a subclass of tokenprune.TokenReducer"),
        (type("NoName", (Good,), {"name": "Bad-Name"}), "lower case letters, digits and '_'"),
        (
            type("Loose", (Good,), {"Params": type("P", (ReducerParams,), {"model_config": {"extra": "allow"}})}),
            "must forbid unknown fields",
        ),
        (
            type("NoCaps", (Good,), {"capabilities": {"insertion_points": ["layer"]}}),
            "capabilities must be a tokenprune.Capabilities",
        ),
        (type("Abstract", (TokenReducer,), {"name": "abstract"}), "does not implement reduce"),
    ],
)
def test_registry_rejects_classes_that_break_the_contract(cls, message):
    with pytest.raises(PluginError, match=message):
        ReducerRegistry().add(cls)


def test_unknown_reducer_suggests_the_closest_name():
    registry = ReducerRegistry()
    registry.add(Good)
    with pytest.raises(
        UnknownReducerError, match=r"unknown reducer 'godo'; did you mean 'good'\? Installed reducers: good"
    ):
        registry.get("godo")


def test_same_class_twice_is_not_a_conflict():
    registry = ReducerRegistry()
    registry.add(Good)
    registry.add(Good)
    assert list(registry) == ["good"]


class TinyAdapter(ModelAdapter):
    name = "tiny"
    model_types = ("tiny_vlm", "tiny_vlm_v2")


def test_adapter_registry_lists_supported_types_and_points_to_the_docs():
    registry = AdapterRegistry()
    registry.add(TinyAdapter)
    assert registry.get("tiny_vlm_v2") is TinyAdapter
    with pytest.raises(UnsupportedModelError) as info:
        registry.get("mistral3")
    assert "model_type 'mistral3'" in str(info.value)
    assert "Supported: tiny_vlm, tiny_vlm_v2" in str(info.value)
    assert "docs/extending/adapters.md" in str(info.value)


def test_adapter_registry_records_a_duplicate_and_rejects_empty_declarations():
    registry = AdapterRegistry()
    registry.add(TinyAdapter)
    other = type("Other", (ModelAdapter,), {"name": "other", "model_types": ("tiny_vlm",)})
    registry.add(other)  # recorded, not raised: the other model types keep working
    assert registry.get("tiny_vlm_v2") is TinyAdapter
    with pytest.raises(PluginError, match="adapter for model_type 'tiny_vlm' is registered twice"):
        registry.get("tiny_vlm")
    registry.add(other, exist_ok=True)  # an explicit replacement is not a collision
    assert registry.get("tiny_vlm") is other and registry.collisions == []
    with pytest.raises(PluginError, match="non-empty tuple"):
        registry.add(type("Empty", (ModelAdapter,), {"name": "empty", "model_types": ()}))


def test_adapters_arrive_through_the_hook_with_their_origin():
    class Plugin:
        @staticmethod
        @tp.hookimpl
        def tokenprune_register_adapters(registry):
            registry.add(TinyAdapter)

    manager = get_plugin_manager(entry_points=False, plugins=[Plugin()])
    assert list(manager.adapters) == ["tiny_vlm", "tiny_vlm_v2"]
    assert manager.adapters.provided_by(manager.plugins[0].name) == ["tiny_vlm", "tiny_vlm_v2"]


def test_each_manager_is_independent():
    a, b = get_plugin_manager(), get_plugin_manager(entry_points=False)
    assert a.pluggy is not b.pluggy and "random" in a.reducers and "random" not in b.reducers
