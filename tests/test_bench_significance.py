"""The statistics of a report, on hand-made records whose answers are known: intervals, paired tests,
seeds of `random`, matched budgets, the generated paragraph."""

import json

import numpy as np
import pytest

from tokenprune.bench.config import CompareConfig
from tokenprune.bench.pareto import style
from tokenprune.bench.report import csv_columns, report_markdown, summarize, write_summary
from tokenprune.bench.significance import significance
from tokenprune.bench.stats import mcnemar_exact, wilson_interval

N = 200
MACS = {"unpruned": 4e9, "50%": 2e9, "10%": 0.4e9}
TOKENS = {"unpruned": 100.0, "50%": 50.0, "10%": 10.0}
RIGHT = {  # pipeline -> how many of the first examples it answers right (the rest wrong)
    "unpruned": 180,
    "fam-50%": 180,
    "fam-10%": 100,
    "random-50%": 170,
    "random-50%@seed1": 175,
    "random-50%@seed2": 172,
    "random-10%": 60,
    "random-10%@seed1": 62,
    "random-10%@seed2": 58,
}


def _records():
    out = []
    for name, right in RIGHT.items():
        budget = "unpruned" if name == "unpruned" else name.split("-")[1].split("@")[0]
        for i in range(N):
            correct = float(i < right)
            out.append(
                {
                    "pipeline": name,
                    "task": "t",
                    "id": f"e{i}",
                    "group": "a" if i % 2 else "b",
                    "accuracy": correct,
                    "vqa_score": correct,
                    "agreement": float(correct == float(i < 180)),
                    "kl": 0.0 if name == "unpruned" else 0.01 * (i % 7),
                    "macs": MACS[budget],
                    "visual_tokens": TOKENS[budget],
                    "kv_bytes": 2**20,
                }
            )
    return out


def _analyse(seed=0, baseline=None):
    records = _records()
    rows, groups = summarize(records, list(RIGHT), ["t"])
    stats = significance(records, rows, ["t"], "unpruned", baseline=baseline, seed=seed, resamples=500)
    return {r["pipeline"]: r for r in rows}, groups, stats, rows


def test_rows_get_wilson_intervals_and_exact_mcnemar_against_unpruned():
    rows, _, stats, _ = _analyse()
    assert (rows["fam-10%"]["accuracy_lo"], rows["fam-10%"]["accuracy_hi"]) == pytest.approx(wilson_interval(100, N))
    assert rows["unpruned"]["agreement_lo"] == wilson_interval(N, N)[0] and rows["unpruned"]["agreement_hi"] == 1.0
    unpruned = [float(i < 180) for i in range(N)]
    assert rows["fam-10%"]["vs_reference"] == pytest.approx(-0.4)
    assert rows["fam-10%"]["vs_reference_p"] == pytest.approx(
        mcnemar_exact([float(i < 100) for i in range(N)], unpruned)
    )
    assert rows["fam-10%"]["vs_reference_hi"] < 0 < rows["random-50%@seed1"]["vs_reference_p"]
    assert rows["fam-50%"]["vs_reference"] == 0 and rows["fam-50%"]["vs_reference_p"] == 1.0
    assert rows["unpruned"]["vs_reference"] is None
    kl = rows["fam-50%"]  # a score, not 0/1: the bootstrap's interval
    assert kl["kl_lo"] < kl["kl"] < kl["kl_hi"]
    assert rows["unpruned"]["kl_lo"] == rows["unpruned"]["kl_hi"] == 0.0  # KL is no rate: no Wilson interval at 0
    assert stats["resamples"] == 500 and stats["metric"] == "accuracy"
    assert stats["group_intervals"]["t"]["fam-10%"]["a"] == pytest.approx(list(wilson_interval(50, 100)))


def test_tiers_and_rank_ranges_follow_the_paired_tests():
    rows, _, _, ordered = _analyse()
    assert ordered[0]["pipeline"] in ("unpruned", "fam-50%") and ordered[0]["tier"] == 1
    assert rows["unpruned"]["tier"] == rows["fam-50%"]["tier"] == 1
    assert rows["fam-10%"]["tier"] > rows["random-50%"]["tier"] >= 1
    assert rows["random-10%"]["rank_range"] != "1"
    assert rows["fam-10%"]["rank_range"] == "6"  # 100 right: between the 50% runs and the 10% randoms, always


def test_beating_random_needs_a_significant_win_over_every_seed():
    rows, _, stats, _ = _analyse()
    # fam-50% (180) vs random-50% (170: p = 2/2^10) and @seed1 (175: p = 2/2^5 > 0.05): not every seed
    assert rows["fam-50%"]["vs_random"] == "indistinguishable"
    assert rows["fam-10%"]["vs_random"] == "beats"
    assert rows["random-50%"]["vs_random"] is None and rows["unpruned"]["vs_random"] is None
    (fifty,) = [g for g in stats["seeds"] if g["group"] == "random-50%"]
    assert fifty["seeds"] == 3 and fifty["values"] == pytest.approx([0.85, 0.875, 0.86])
    assert fifty["mean"] == pytest.approx(np.mean([0.85, 0.875, 0.86])) and fifty["min"] == 0.85
    assert fifty["lo"] < fifty["mean"] < fifty["hi"]


def test_matched_budgets_interpolate_between_a_reducers_budgets():
    _, _, stats, _ = _analyse()
    budgets = stats["matched_budgets"]
    fam = budgets["flops"]["fam"]
    assert fam["50%"]["value"] == pytest.approx(0.9) and fam["90%"]["value"] == pytest.approx(0.5)
    assert fam["75%"]["value"] == pytest.approx(0.9 * 0.375 + 0.5 * 0.625)  # 75% lies 5/8 of the way from 50 to 90
    assert fam["75%"]["lo"] < fam["75%"]["value"] < fam["75%"]["hi"] and fam["75%"]["p"] < 0.05
    assert budgets["tokens"]["fam"]["25%"]["value"] == pytest.approx(0.5 * 0.625 + 0.9 * 0.375)
    assert budgets["auc_range"] == pytest.approx(0.9)
    assert budgets["auc"]["fam"]["value"] == pytest.approx((0.5 * 0.9 + 0.4 * 0.7) / 0.9)
    seeds = np.mean([170, 175, 172]) / N
    assert budgets["flops"]["random"]["50%"]["value"] == pytest.approx(seeds)  # seeds averaged


def test_the_statistics_are_reproducible_under_their_seed():
    _, _, first, a = _analyse(seed=3)
    _, _, again, b = _analyse(seed=3)
    _, _, other, _ = _analyse(seed=4)
    assert json.dumps(first, default=str) == json.dumps(again, default=str) and a == b
    assert first["matched_budgets"]["flops"]["fam"]["75%"] != other["matched_budgets"]["flops"]["fam"]["75%"]


def test_the_report_says_what_is_significant_and_warns_on_small_samples(tmp_path):
    rows_by, groups, stats, rows = _analyse(baseline="random-50%")
    assert rows_by["fam-10%"]["vs_baseline"] == pytest.approx(-0.35)
    paragraph = " ".join(stats["findings"])
    assert "Of 8 pipelines compared with `unpruned`" in paragraph
    assert "At keep 50%: indistinguishable from `unpruned`: `fam-50%`" in paragraph
    assert "beat every random seed: `fam-10%`" in paragraph
    assert "Warning" not in paragraph  # 200 examples
    config = CompareConfig(baseline="random-50%")
    text = report_markdown(config, rows, groups, ["t"], stats)
    assert text.startswith("# tokenprune comparison\n\nOf 8 pipelines")
    assert f"| fam-10% | {rows_by['fam-10%']['rank_range']} | " in text
    lo, hi = wilson_interval(100, N)
    assert f"50.0% [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "## Matched budgets" in text and "## Stochastic reducers over seeds" in text
    summary = write_summary(tmp_path, {"head": 1}, rows, groups, ["t"], stats, text)
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header == csv_columns(["t"], "random-50%")
    assert header[:6] == ["rank", "pipeline", "n", "accuracy", "accuracy_lo", "accuracy_hi"]
    assert "accuracy_lo" in header and "vs_baseline_p_holm" in header and "vs_random" in header
    assert json.loads((tmp_path / "summary.json").read_text())["statistics"]["resamples"] == 500
    assert summary.statistics is stats
    small = [r for r in _records() if int(r["id"][1:]) < 40]
    rows2, _ = summarize(small, list(RIGHT), ["t"])
    warned = significance(small, rows2, ["t"], "unpruned", resamples=200)
    assert "Warning: a task has only 40 examples" in " ".join(warned["findings"])


def test_every_method_gets_its_own_colour_and_marker_pair():
    pairs = [style(i) for i in range(80)]
    assert len(set(pairs)) == 80
    assert all(style(i)[1] != style(i + 1)[1] for i in range(79))  # neighbours differ in marker too


def test_several_tasks_resample_each_task_and_test_with_the_paired_bootstrap():
    from tokenprune.bench.stats import bootstrap_p_value
    from tokenprune.bench.uncertainty import collect

    records = []
    for task, n, right in (("a", 60, {"unpruned": 54, "x": 40}), ("b", 20, {"unpruned": 18, "x": 17})):
        for name, k in right.items():
            records += [
                {
                    "pipeline": name,
                    "task": task,
                    "id": str(i),
                    "group": "g",
                    "accuracy": float(i < k),
                    "macs": 1.0,
                    "visual_tokens": 1.0,
                    "kv_bytes": 1,
                }
                for i in range(n)
            ]
    rows, _ = summarize(records, ["unpruned", "x"], ["a", "b"])
    stats = significance(records, rows, ["a", "b"], "unpruned", resamples=400)
    x = next(r for r in rows if r["pipeline"] == "x")
    assert x["accuracy"] == pytest.approx((40 / 60 + 17 / 20) / 2)  # each task counts once
    assert x["accuracy_lo"] < x["accuracy"] < x["accuracy_hi"]
    assert (x["accuracy:a_lo"], x["accuracy:a_hi"]) == pytest.approx(wilson_interval(40, 60))  # one task: Wilson
    analysis = collect(records, ["unpruned", "x"], ["a", "b"], "unpruned", resamples=400)
    diff = analysis.samples["accuracy"][1] - analysis.samples["accuracy"][0]
    assert x["vs_reference_p"] == bootstrap_p_value(diff)  # a mean over tasks: the paired bootstrap, not McNemar
    weights = [t.boot.weights for t in analysis.tasks]
    assert [w.shape for w in weights] == [(400, 60), (400, 20)]  # stratified: each task resampled on its own
    assert stats["examples_per_task"] == {"a": 60, "b": 20}
