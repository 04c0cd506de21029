import pytest

import tokenprune as tp
from tokenprune.bench.config import REFERENCE, default_sweep_reducers, load_config, pipeline_key, resolve_pipelines
from tokenprune.errors import PipelineError, TokenpruneError


@pytest.fixture
def registry():
    return tp.get_plugin_manager().reducers


def test_default_config_is_the_offline_comparison(registry):
    config = load_config(None)
    assert config.model == "bundled" and config.tasks == [{"name": "synthvqa"}]
    names = [n for n, _ in resolve_pipelines(config, registry)]
    assert names[0] == REFERENCE
    assert "random-50%" in names and "random-10%" in names
    # three budgets each; random (the one stochastic reducer: a `seed` param) with three seeds each; the reducers
    # that also run inside the vision encoder, there too (before the projector, before vision layer 1)
    sweep = default_sweep_reducers(registry)
    inside = sum(len({"pre_projector", "vision_layer"} & registry.get(n).capabilities.insertion_points) for n in sweep)
    assert inside >= 2
    assert len(names) == 1 + 3 * len(sweep) + 3 * 2 + 3 * inside
    assert {"random-50%@seed1", "random-50%@seed2", "random-10%@seed2"} <= set(names)
    assert {"visionzip-pre-50%", "visionzip-50%", "tome-vl1-25%", "tome-25%"} <= set(names)
    resolved = dict(resolve_pipelines(config, registry))
    assert str(resolved["visionzip-pre-10%"].stages[0].point) == "pre_projector"
    assert str(resolved["tome-vl1-10%"].stages[0].point) == "vision layer 1"


def test_a_stochastic_reducer_runs_several_seeds_unless_its_params_fix_one(registry):
    config = load_config({"pipelines": [{"sweep": {"reducers": ["random", "l2norm"], "keep": [0.5], "seeds": 4}}]})
    resolved = dict(resolve_pipelines(config, registry))
    assert list(resolved) == [
        REFERENCE,
        "random-50%",
        "random-50%@seed1",
        "random-50%@seed2",
        "random-50%@seed3",
        "l2norm-50%",
    ]
    assert resolved["random-50%"].stages[0].params == {}  # the default seed: the same pipeline as a one-seed run
    assert [resolved[f"random-50%@seed{k}"].stages[0].params["seed"] for k in (1, 2, 3)] == [1, 2, 3]
    fixed = load_config(
        {"pipelines": [{"sweep": {"reducers": ["random"], "keep": [0.5], "params": {"random": {"seed": 7}}}}]}
    )
    assert [n for n, _ in resolve_pipelines(fixed, registry)] == [REFERENCE, "random-50%"]
    one = load_config({"pipelines": [{"sweep": {"reducers": ["random"], "keep": [0.5], "seeds": 1}}]})
    assert [n for n, _ in resolve_pipelines(one, registry)] == [REFERENCE, "random-50%"]


def test_the_baseline_must_name_a_pipeline(registry):
    config = load_config({"pipelines": [{"sweep": {"reducers": ["l2norm"], "keep": [0.5]}}], "baseline": "l2norm-25%"})
    with pytest.raises(PipelineError, match="baseline: 'l2norm-25%' is not one of the comparison's pipelines"):
        resolve_pipelines(config, registry)


def test_default_sweep_is_read_from_the_registry(registry):
    """Every training-free reducer tokenprune ships, none hard-coded: not ATP, not third-party ones."""
    names = default_sweep_reducers(registry)
    assert {"random", "downsample", "l2norm", "gprune", "tome", "fastv"} <= set(names)
    assert "atp" in registry and "atp" not in names  # trainable: needs weights
    assert "dycoke" in registry and "dycoke" not in names  # video only: would keep every image token
    assert "vidcom2" in registry and "vidcom2" not in names
    assert "hiprune" in registry and "hiprune" not in names  # object layer 9: deeper than the bundled tower
    assert "centroid" in registry and "centroid" not in names  # the example package's reducer
    assert all(registry.origin(n).distribution == "tokenprune" for n in names)
    without_random = tp.get_plugin_manager(disabled=["random"]).reducers
    assert default_sweep_reducers(without_random) == [n for n in names if n != "random"]
    resolved = [n for n, _ in resolve_pipelines(load_config(None), without_random)]
    assert not any(n.startswith("random-") for n in resolved) and "gprune-50%" in resolved


def test_files_inline_and_sweeps_resolve(tmp_path, registry):
    (tmp_path / "pipes").mkdir()
    (tmp_path / "pipes" / "half.yaml").write_text("stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n")
    path = tmp_path / "compare.yaml"
    path.write_text(
        "pipelines:\n"
        "  - file: pipes/half.yaml\n"
        "  - name: two\n    stages:\n      - {at: post_projector, reducer: random, keep: 0.5}\n"
        "      - {at: {layer: 2}, reducer: random, keep: 8}\n"
        "  - sweep: {reducers: [random], keep: [0.3, 16]}\n"
    )
    pipes = dict(resolve_pipelines(load_config(path), registry))
    seeded = [f"random-{b}{s}" for b in ("30%", "16tok") for s in ("", "@seed1", "@seed2")]
    assert list(pipes) == [REFERENCE, "half", "two", *seeded]
    assert len(pipes["two"].stages) == 2 and pipes["random-16tok"].stages[0].keep == 16


def test_bad_pipelines_are_named(registry):
    with pytest.raises(PipelineError, match=r"(?s)pipeline 'bad'.*keep 2.0 is a fraction"):
        resolve_pipelines(
            load_config(
                {"pipelines": [{"name": "bad", "stages": [{"at": "post_projector", "reducer": "random", "keep": 2.0}]}]}
            ),
            registry,
        )
    with pytest.raises(PipelineError, match="sweep: unknown reducer 'randon'; did you mean 'random'"):
        resolve_pipelines(load_config({"pipelines": [{"sweep": {"reducers": ["randon"]}}]}), registry)
    with pytest.raises(PipelineError, match="repeated: x"):
        resolve_pipelines(
            load_config({"pipelines": [{"name": "x", "stages": []}, {"name": "x", "stages": []}]}), registry
        )


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TokenpruneError, match="batch_size: Input should be greater than or equal to 1"):
        load_config({"batch_size": 0})
    with pytest.raises(TokenpruneError, match="either `file: PATH`, `preset: NAME`, `sweep"):
        load_config({"pipelines": [{"name": "nothing"}]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_pipeline_key_changes_with_what_results_depend_on(registry):
    config = load_config({"pipelines": [{"sweep": {"reducers": ["random"], "keep": [0.5]}}]})
    name, pipe = resolve_pipelines(config, registry)[1]
    task = {"name": "synthvqa"}
    key = pipeline_key(name, pipe, config, task)
    assert key == pipeline_key(name, pipe, config, task)
    assert key != pipeline_key(name, pipe, config, {"name": "synthvqa", "per_type": 3})
    assert key != pipeline_key(name, pipe, config.model_copy(update={"dtype": "bfloat16"}), task)
    changed = resolve_pipelines(
        load_config(
            {"pipelines": [{"sweep": {"reducers": ["random"], "keep": [0.5], "params": {"random": {"seed": 3}}}}]}
        ),
        registry,
    )[1][1]
    assert key != pipeline_key(name, changed, config, task)
    # the output folder and batch size do not change results
    assert key == pipeline_key(name, pipe, config.model_copy(update={"batch_size": 3, "output": "elsewhere"}), task)
