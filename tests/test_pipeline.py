"""Pipelines: loading from files, strings and mappings, and one test per kind of bad pipeline."""

import json
import textwrap

import pytest
from pydantic import Field

import tokenprune as tp
from tokenprune import Capabilities, InsertionPoint, PipelineError, ReducerParams, ScoringReducer
from tokenprune.pipeline import Pipeline, load_pipeline, pipeline_json_schema
from tokenprune.plugins import get_plugin_manager


class LayerOnly(ScoringReducer):
    """Ranks by attention received (a FastV-like stand-in)."""

    name = "attn"
    capabilities = Capabilities(insertion_points=frozenset({"layer"}), attention=frozenset({"last"}))

    class Params(ReducerParams):
        k: int = Field(default=2, ge=1, description="A number.")
        source: str = "last"

    def score(self, tokens, ctx):
        return ctx.attention["last"]


class Anywhere(ScoringReducer):
    """Needs attention only when asked to."""

    name = "anywhere"

    class Params(ReducerParams):
        use_attention: bool = False

    def attention_sources(self):
        return frozenset({"all"}) if self.params.use_attention else frozenset()

    def score(self, tokens, ctx):
        return tokens.sum(-1)


class Plugin:
    @staticmethod
    @tp.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(LayerOnly)
        registry.add(Anywhere)


@pytest.fixture
def registry():
    return get_plugin_manager(plugins=[Plugin()]).reducers


def problems_of(source, registry, **kwargs):
    with pytest.raises(PipelineError) as info:
        load_pipeline(textwrap.dedent(source) if isinstance(source, str) else source, registry=registry, **kwargs)
    return str(info.value), info.value.problems


def test_file_string_and_mapping_give_the_same_pipeline(tmp_path, registry):
    text = "name: two\nstages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n  - {at: {layer: 2}, reducer: attn, keep: 64}\n"
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    from_file = load_pipeline(path, registry=registry)
    assert from_file == load_pipeline(str(path), registry=registry) == load_pipeline(text, registry=registry)
    assert from_file == load_pipeline(from_file.model_dump(), registry=registry)
    assert [s.point for s in from_file.stages] == [InsertionPoint("post_projector"), InsertionPoint("layer", 2)]
    assert isinstance(from_file.stages[0].keep, float) and isinstance(from_file.stages[1].keep, int)
    assert from_file.positions == "original" and from_file.protect_newlines


def test_an_empty_stage_list_is_a_valid_no_op(registry):
    assert load_pipeline("stages: []", registry=registry).stages == []
    assert load_pipeline("", registry=registry) == Pipeline()


def test_build_reducers_gives_validated_instances(registry):
    pipe = load_pipeline(
        {"stages": [{"at": {"layer": 3}, "reducer": "attn", "keep": 0.25, "params": {"k": 5}}]}, registry=registry
    )
    (reducer,) = pipe.build_reducers(registry)
    assert isinstance(reducer, LayerOnly) and reducer.params.k == 5


def test_unknown_reducer_lists_installed_and_suggests_closest(registry):
    message, problems = problems_of("stages:\n  - {at: post_projector, reducer: randmo, keep: 0.5}\n", registry)
    assert "stage 0 (reducer 'randmo'), line 2: reducer: unknown reducer 'randmo'; did you mean 'random'?" in message
    installed = message.split("Installed reducers: ")[1].split(".")[0].split(", ")
    assert {"anywhere", "attn", "random"} <= set(installed) and installed == sorted(installed)
    assert (problems[0].stage, problems[0].field, problems[0].line) == (0, "reducer", 2)


def test_unknown_param_lists_the_reducers_parameters(registry):
    message, _ = problems_of(
        """
        stages:
          - at: {layer: 2}
            reducer: attn
            keep: 0.5
            params:
              kk: 3
        """,
        registry,
    )
    assert (
        "stage 0 (reducer 'attn'), line 7: params.kk: unknown parameter of 'attn'; its parameters are: k, source"
        in message
    )


def test_wrong_param_type_and_range(registry):
    message, problems = problems_of(
        "stages:\n  - {at: {layer: 2}, reducer: attn, keep: 0.5, params: {k: two}}\n"
        "  - {at: {layer: 3}, reducer: attn, keep: 0.5, params: {k: 0}}\n",
        registry,
    )
    assert (
        "stage 0 (reducer 'attn'), line 2: params.k: Input should be a valid integer" in message
        and "(got 'two')" in message
    )
    assert "stage 1 (reducer 'attn'), line 3: params.k: Input should be greater than or equal to 1 (got 0)" in message
    assert len(problems) == 2


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.25, float("inf")])
def test_fraction_keep_outside_zero_one(keep, registry):
    message, problems = problems_of({"stages": [{"at": "post_projector", "reducer": "random", "keep": keep}]}, registry)
    assert f"stage 0 (reducer 'random'): keep: keep {keep} is a fraction and must lie in (0, 1]" in message
    assert problems[0].field == "keep"


@pytest.mark.parametrize("keep", [0, -3])
def test_non_positive_count(keep, registry):
    message, _ = problems_of({"stages": [{"at": "post_projector", "reducer": "random", "keep": keep}]}, registry)
    assert f"keep {keep} is a token count and must be >= 1" in message


@pytest.mark.parametrize("keep", ["half", True, None, [0.5]])
def test_keep_of_the_wrong_type(keep, registry):
    message, _ = problems_of({"stages": [{"at": "post_projector", "reducer": "random", "keep": keep}]}, registry)
    assert "keep is a fraction in (0, 1] such as 0.25 (1.0 keeps all), or a token count >= 1" in message


def test_stage_at_an_insertion_point_the_reducer_does_not_declare(registry):
    message, _problems = problems_of("stages:\n  - at: post_projector\n    reducer: attn\n    keep: 0.5\n", registry)
    assert "stage 0 (reducer 'attn'), line 2: at: 'attn' does not run at post_projector; it supports: layer" in message


def test_attention_needed_by_params_rules_out_post_projector(registry):
    ok = {"stages": [{"at": "post_projector", "reducer": "anywhere", "keep": 0.5}]}
    load_pipeline(ok, registry=registry)
    ok["stages"][0]["params"] = {"use_attention": True}
    message, _ = problems_of(ok, registry)
    assert "'anywhere' reads attention scores (all), which exist only inside the LLM; put it at {layer: k}" in message


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ("layer 2", "`at` is 'post_projector', {layer: k} with k >= 1"),
        ({"layer": 0}, "layer must be an integer >= 1, got 0"),
        ({"layer": "2"}, "layer must be an integer >= 1, got '2'"),
        ({"layr": 2}, "`at` is 'post_projector', {layer: k}"),
        ({"layer": 2, "head": 1}, "`at` is 'post_projector', {layer: k}"),
        ("post-projector", "got 'post-projector'"),
    ],
)
def test_malformed_at(at, expected, registry):
    message, problems = problems_of({"stages": [{"at": at, "reducer": "random", "keep": 0.5}]}, registry)
    assert expected in message
    assert [p.field for p in problems] == ["at"] and problems[0].stage == 0


def test_stages_out_of_forward_order(registry):
    message, _ = problems_of(
        "stages:\n  - {at: {layer: 3}, reducer: random, keep: 0.5}\n  - {at: {layer: 1}, reducer: random, keep: 0.5}\n",
        registry,
    )
    assert "stage 1 (reducer 'random'), line 3: at: stages must be ordered by insertion point" in message
    assert "layer 1 comes after layer 3" in message


def test_yaml_syntax_error_gives_the_line(registry):
    message, problems = problems_of("stages:\n  - at: post_projector\n    reducer: [random\n    keep: 0.5\n", registry)
    assert message.startswith("<yaml string>: YAML syntax error at line 4")
    assert problems[0].line == 4


@pytest.mark.parametrize(("document", "kind"), [("- a\n- b\n", "list"), ("just text\n", "string"), ("42\n", "number")])
def test_a_non_mapping_document(document, kind, registry):
    message, _ = problems_of(document, registry)
    assert f"a pipeline must be a mapping with a `stages:` list, got a {kind}" in message


def test_unknown_top_level_and_stage_fields(registry):
    message, problems = problems_of(
        "stage:\n  - {at: post_projector, reducer: random, keep: 0.5}\nstages:\n  - {at: post_projector, reducer: random, keep: 0.5, prams: {}}\n",
        registry,
    )
    assert "line 1: stage: unknown field; allowed here: name, positions, protect_newlines, stages" in message
    assert (
        "stage 0 (reducer 'random'), line 4: prams: unknown field; allowed here: at, reducer, keep, params" in message
    )
    assert len(problems) == 2


def test_missing_fields_and_bad_policy(registry):
    message, _ = problems_of("positions: shuffled\nstages:\n  - {at: post_projector}\n", registry)
    assert "line 1: positions: Input should be 'original' or 'compact'" in message
    assert "stage 0, line 3: reducer: Field required" in message
    assert "stage 0, line 3: keep: Field required" in message


def test_every_problem_is_reported_at_once(registry):
    _, problems = problems_of(
        "stages:\n  - {at: post_projector, reducer: nope, keep: 0.5}\n  - {at: {layer: 2}, reducer: attn, keep: 2.0}\n",
        registry,
    )
    # one run reports both: the structural problem and, on the stages that can be checked, the reducers'
    assert [(p.stage, p.field) for p in problems] == [(0, "reducer"), (1, "keep")]
    _, problems = problems_of(
        "stages:\n  - {at: post_projector, reducer: nope, keep: 0.5}\n  - {at: post_projector, reducer: attn, keep: 2}\n",
        registry,
    )
    assert [(p.stage, p.field) for p in problems] == [(0, "reducer"), (1, "at")]


def test_a_malformed_stage_is_still_checked_against_its_reducer(registry):
    """A bad keep, an unknown parameter and misordered stages: all three in one run (issue 16)."""
    message, problems = problems_of(
        "stages:\n  - {at: {layer: 2}, reducer: attn, keep: 2.0, params: {bogus: 1}}\n"
        "  - {at: post_projector, reducer: anywhere, keep: 0.5}\n",
        registry,
    )
    assert [(p.stage, p.field) for p in problems] == [(0, "keep"), (0, "params.bogus"), (1, "at")]
    assert "stages must be ordered by insertion point" in message
    _, problems = problems_of("stages:\n  - {at: nowhere, reducer: nope, keep: 0.5, params: {x: 1}}\n", registry)
    assert [(p.stage, p.field) for p in problems] == [(0, "at")]  # no insertion point: nothing more to check


def test_missing_file_and_structure_only_checks(tmp_path, registry):
    with pytest.raises(FileNotFoundError, match=r"pipeline file .*missing\.yaml' does not exist"):
        load_pipeline(tmp_path / "missing.yaml")
    unchecked = load_pipeline(
        {"stages": [{"at": "post_projector", "reducer": "not_installed", "keep": 3}]}, check=False
    )
    assert unchecked.stages[0].reducer == "not_installed"


def test_json_schema_carries_each_reducers_params(registry):
    schema = pipeline_json_schema(registry)
    text = json.dumps(schema)
    assert schema["title"] == "tokenprune pipeline"
    defs = schema["$defs"]
    assert {"Stage_attn", "Stage_anywhere", "Stage_random"} <= set(defs)
    attn = defs["Stage_attn"]
    assert attn["properties"]["reducer"]["const"] == "attn"
    params_ref = attn["properties"]["params"]["$ref"].rsplit("/", 1)[-1]
    assert defs[params_ref]["properties"]["k"]["minimum"] == 1
    assert "A number." in text
    core = pipeline_json_schema()
    assert core["properties"]["stages"]["items"]["$ref"].endswith("/Stage")


@pytest.mark.parametrize(
    "path",
    sorted((__import__("pathlib").Path(__file__).parents[1] / "examples" / "pipelines").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_example_pipelines_are_valid(path):
    pipe = load_pipeline(path)
    assert pipe.stages, f"{path.name} has no stages"
