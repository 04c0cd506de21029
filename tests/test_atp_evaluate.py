"""ATP's evaluation runs through the comparison harness: ATP, then FastV and G-Prune matched to its token count."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from tokenprune_atp import ATPConfig, ATPWeights
from tokenprune_atp.evaluate import compare, matched_keep

from tokenprune.synth.model import TINY, build_model
from tokenprune.synth.processor import build_processor


def test_matched_keep_solves_the_average_over_layers():
    f = matched_keep(4, 150.0, 200.0, 1)  # (1 * 200 + 3 * f * 200) / 4 = 150
    assert (200 + 3 * f * 200) / 4 == pytest.approx(150.0)
    assert matched_keep(4, 100.0, 200.0, None) == pytest.approx(0.5)


@pytest.mark.slow
def test_compare_goes_through_the_harness(tmp_path):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, text_layers=4), seed=0).eval()
    weights = ATPWeights(ATPConfig(hidden_size=32, num_layers=4, layers=[1, 2, 3]))
    with torch.no_grad():
        for head in weights.heads.values():
            head.fc2.bias.copy_(torch.tensor([0.0, 1.5]))  # θ_r = 0.5: about half the tokens pass
    path = weights.save(tmp_path / "atp")
    results = compare(path, model, build_processor(), per_type=1, batch_size=6, output=tmp_path / "eval")
    by_name = {r.pipeline: r for r in results}
    assert list(by_name)[:2] == ["unpruned", "atp"]
    unpruned, atp = by_name["unpruned"], by_name["atp"]
    assert atp.avg_tokens < unpruned.avg_tokens == pytest.approx(unpruned.avg_visual_in)
    assert len(atp.per_layer) == 4 and atp.per_layer[0] == pytest.approx(unpruned.avg_visual_in)
    assert atp.per_layer[1] < atp.per_layer[0] and len(atp.tokens_per_type) == 6
    matched = [r for r in results if r.pipeline not in ("unpruned", "atp")]
    assert matched, [r.label for r in results]
    for r in matched:
        assert "(not matched)" in r.label or abs(r.avg_tokens - atp.avg_tokens) <= 0.05 * atp.avg_tokens
        assert not math.isnan(r.accuracy)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {p["pipeline"] for p in summary["pipelines"]} >= {"unpruned", "atp"} | {r.pipeline for r in matched}
