"""ATP (inference): the hard keep rule, the scores, the budget cap, the weights file and its checks."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from tokenprune_atp import ATP, ATPConfig, ATPWeights, ATPWeightsError, atp_pipeline, default_layers, load_atp
from tokenprune_atp.scores import NUM_STATS, redundancy_scores, spatial_scores

from tokenprune import InsertionPoint, ReduceContext, ReducerInputError, TokenLayout
from tokenprune.testing import check_reducer, make_reduce_inputs


def make_weights(tmp_path, hidden=16, num_layers=4, layers=(1, 2, 3), seed=0, theta=None, name="w"):
    """Random heads (so thresholds depend on the input), or constant thresholds ``theta = (θ_r, θ_s)``."""
    torch.manual_seed(seed)
    w = ATPWeights(ATPConfig(hidden_size=hidden, num_layers=num_layers, layers=list(layers)))
    with torch.no_grad():
        for head in w.heads.values():
            if theta is None:
                head.fc2.weight.normal_(0, 1.0)
            else:
                head.fc2.weight.zero_()
                head.fc2.bias.copy_(torch.logit(torch.tensor(theta)))
    return w, w.save(tmp_path / name)


def ctx_for(att_v, att_t, layout=None, budget=None, protected=None, layer=2):
    b, n = att_v.shape
    valid = torch.ones(b, n, dtype=torch.bool)
    return ReduceContext(
        at=InsertionPoint("layer", layer),
        budget=torch.full((b,), n) if budget is None else torch.tensor(budget),
        valid=valid,
        protected=torch.zeros(b, n, dtype=torch.bool) if protected is None else protected,
        sizes=valid.float(),
        layout=layout,
        attention={"visual": att_v, "text": att_t},
    )


def test_contract(tmp_path):
    _, path = make_weights(tmp_path)
    check_reducer(ATP, {"weights": str(path)})


def test_capabilities_and_registration(tokenprune_manager):
    assert tokenprune_manager.reducers.get("atp") is ATP
    caps = ATP.capabilities
    assert caps.insertion_points == {"layer"} and caps.attention == {"visual", "text"}
    assert caps.trainable and not caps.deterministic_count


def test_keep_rule_redundancy_or_spatial(tmp_path):
    """θ_r = 0.5, θ_s = 0.9: keep the top half by mean attention rank, plus the stride-8 grid point."""
    _, path = make_weights(tmp_path, theta=(0.5, 0.9))
    gen = torch.Generator().manual_seed(3)
    layout = TokenLayout.grid(8, 8)
    att_v = torch.rand(1, 64, generator=gen).softmax(-1)
    att_t = torch.rand(1, 64, generator=gen).softmax(-1)
    kept = ATP({"weights": str(path)}).reduce(torch.randn(1, 64, 16), ctx_for(att_v, att_t, layout)).tolist()[0]
    combined = (att_v + att_t)[0]
    rank = {i: r / 63 for r, i in enumerate(sorted(range(64), key=lambda i: (combined[i].item(), i)))}
    expected = sorted({i for i in range(64) if rank[i] > 0.5} | {0})  # (0, 0): stride 8, 1 - 3/64 > 0.9
    assert kept == expected


def test_spatial_scores_follow_the_coarsest_grid():
    lay = TokenLayout.grid(8, 8, newlines=True)
    s = spatial_scores(lay.row, lay.col, lay.view, lay.image, lay.newline, 3.0)[0].view(8, 9)
    assert s[0, 0] == pytest.approx(1 - 3 / 64)
    assert s[4, 4] == pytest.approx(1 - 3 / 16) and s[0, 4] == pytest.approx(1 - 3 / 16)
    assert s[2, 2] == pytest.approx(0.25) and s[2, 6] == pytest.approx(0.25)
    assert s[1, 1] == 0 and s[3, 0] == 0
    assert (s[:, 8] == 0).all()  # newlines


def test_redundancy_scores_are_ranks_over_candidates():
    att = torch.tensor([[0.4, 0.1, 0.3, 0.2, 0.9]])
    candidates = torch.tensor([[True, True, True, True, False]])
    s = redundancy_scores(att, att, candidates)
    assert s.tolist() == [[1.0, 0.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]]


def test_budget_caps_by_margin_and_protected_first(tmp_path):
    _, path = make_weights(tmp_path, theta=(0.2, 0.99))
    att = torch.tensor([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1]])
    protected = torch.tensor([[True, False, False, False, False, False]])
    ctx = ctx_for(att, att, budget=[3], protected=protected)
    # Candidates 1..5 ranked: 1 (1.0), 3 (0.75), 4 (0.5), 2 and 5 tie (0.0 / 0.25); budget 3 = token 0 + two best.
    assert ATP({"weights": str(path)}).reduce(torch.randn(1, 6, 16), ctx).tolist() == [[0, 1, 3]]


def test_counts_adapt_per_sample(tmp_path):
    _, path = make_weights(tmp_path, seed=1)
    tokens, ctx = make_reduce_inputs(
        keep=1.0,
        at=InsertionPoint("layer", 2),
        attention_sources=("visual", "text"),
        grids=((6, 6), (6, 6), (6, 6)),
        seed=5,
    )
    tokens = tokens * torch.tensor([0.1, 1.0, 10.0])[:, None, None]  # different pooled states
    fractions = (ATP({"weights": str(path)}).reduce(tokens, ctx).counts / ctx.num_valid).tolist()
    assert len({round(f, 3) for f in fractions}) > 1, fractions


def test_weights_round_trip(tmp_path):
    w, path = make_weights(tmp_path, seed=4)
    loaded = load_atp(path)
    assert loaded.config == w.config
    assert json.loads((tmp_path / "w" / "atp.json").read_text())["layers"] == [1, 2, 3]
    for (k, a), (k2, b) in zip(w.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    stats, pooled = torch.randn(2, NUM_STATS), torch.randn(2, 16)
    assert torch.equal(w.head(2)(stats, pooled), loaded.head(2)(stats, pooled))
    assert load_atp(tmp_path / "w").config == w.config  # the directory works too
    assert [s["at"]["layer"] for s in atp_pipeline(path)["stages"]] == [1, 2, 3]


def test_weights_that_do_not_fit_are_named(tmp_path):
    from tiny_models import llava_next

    _, path = make_weights(tmp_path, hidden=48, num_layers=6, layers=(2, 4))
    model = llava_next().model  # hidden 64, 4 layers
    with pytest.raises(
        ATPWeightsError, match=r"hidden size 48 \(the model's is 64\).*6 decoder layers \(the model has 4\)"
    ):
        load_atp(path, model)
    reducer = ATP({"weights": str(path)})
    tokens, ctx = make_reduce_inputs(at=InsertionPoint("layer", 2), attention_sources=("visual", "text"), dim=64)
    with pytest.raises(ReducerInputError, match=r"trained for hidden size 48.*have size 64"):
        reducer.reduce(tokens, ctx)
    tokens, ctx = make_reduce_inputs(at=InsertionPoint("layer", 3), attention_sources=("visual", "text"), dim=48)
    with pytest.raises(ReducerInputError, match=r"modules at layers \[2, 4\], not at layer 3"):
        reducer.reduce(tokens, ctx)


def test_apply_refuses_weights_for_another_model_before_installing(tmp_path):
    """ATP.bind checks the model and the stage's layer when the pipeline is applied, not at the first forward."""
    from tiny_models import llava_next

    import tokenprune as tp

    model = llava_next().model  # hidden 64, 4 layers
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    def stage(path, layer):
        return {"stages": [{"at": {"layer": layer}, "reducer": "atp", "keep": 1.0, "params": {"weights": str(path)}}]}

    _, other = make_weights(tmp_path, hidden=48, num_layers=6, layers=(2, 4), name="other")
    with pytest.raises(ReducerInputError, match=r"stage 0 \('atp' at layer 2\).*hidden size 48 and 6 decoder layers"):
        tp.apply(model, stage(other, 2))
    _, fits = make_weights(tmp_path, hidden=64, num_layers=4, layers=(1, 2), name="fits")
    with pytest.raises(
        ReducerInputError, match=r"stage 0 \('atp' at layer 3\).*modules at layers \[1, 2\], not at layer 3"
    ):
        tp.apply(model, stage(fits, 3))
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks
    with tp.apply(model, stage(fits, 2)) as run:
        assert [type(r).__name__ for r in run.reducers] == ["ATP"]


def test_a_three_stage_pipeline_reads_its_weights_once_per_stage(tmp_path, monkeypatch):
    """Validation does not build reducers, apply builds each once, and ATP reads its file in bind, once."""
    from tiny_models import llava_next

    import tokenprune as tp

    _, path = make_weights(tmp_path, hidden=64, num_layers=4, layers=(1, 2, 3))
    reads = []
    load = ATPWeights.load.__func__

    def counting(cls, p):
        reads.append(str(p))
        return load(cls, p)

    document = atp_pipeline(path)  # reads the file's config to list its layers
    monkeypatch.setattr(ATPWeights, "load", classmethod(counting))
    tiny = llava_next()
    pipeline = tp.load_pipeline(document)
    assert reads == []  # validating the pipeline reads nothing
    with tp.apply(tiny.model, pipeline) as run:
        assert reads == [str(path)] * 3
        tiny.model(**tiny.make_inputs([(56, 56)]))
    assert reads == [str(path)] * 3 and len(run.stats.last_prefill.stages) == 3


def test_validate_reports_a_missing_weights_path_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from tokenprune.cli import app

    missing = tmp_path / "nowhere" / "atp.safetensors"
    pipeline = tmp_path / "atp.yaml"
    pipeline.write_text(
        f"stages:\n  - {{at: {{layer: 2}}, reducer: atp, keep: 0.5, params: {{weights: '{missing}'}}}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(pipeline)])
    output = result.stdout + (result.stderr or "")
    assert result.exit_code == 2
    assert "stage 0 (reducer 'atp')" in output and "params.weights" in output and "no ATP weights" in output
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bad_files_are_clear_errors(tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(ValidationError, match="no ATP weights"):  # a params problem, found by validation
        ATP({"weights": missing})
    with pytest.raises(ATPWeightsError, match="no ATP weights"):
        load_atp(missing)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ATPWeightsError, match="not ATP weights"):
        load_atp(other)
    w, path = make_weights(tmp_path)
    state = {k: v for k, v in w.state_dict().items() if not k.startswith("heads.3.")}
    save_file(state, str(path), metadata={"format": "tokenprune-atp", "atp_config": json.dumps(w.config.to_json())})
    with pytest.raises(ATPWeightsError, match=r"missing \['heads\.3\."):
        load_atp(path)
    with pytest.raises(ATPWeightsError, match="distinct layers"):
        ATPConfig(hidden_size=8, num_layers=4, layers=[0, 2])


def test_missing_attention_is_a_clear_error(tmp_path):
    _, path = make_weights(tmp_path)
    tokens, ctx = make_reduce_inputs(at=InsertionPoint("layer", 2), attention_sources=("last",))
    with pytest.raises(ReducerInputError, match=r"no 'visual' attention"):
        ATP({"weights": str(path)}).reduce(tokens, ctx)


def test_default_layers():
    assert default_layers(32) == [4, 14, 24]
    assert default_layers(4) == [1, 2, 3]
    assert default_layers(2) == [1]
    with pytest.raises(ValueError):
        default_layers(1)
