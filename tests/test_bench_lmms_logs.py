"""`tokenprune report` on run folders laid out as lmms-eval 0.7.3 writes them (hand-made, no model)."""

import json

import pytest
from typer.testing import CliRunner

from tokenprune.bench.lmms_logs import read_run
from tokenprune.bench.stats import mcnemar_exact, wilson_interval
from tokenprune.cli import get_app
from tokenprune.cli.report import build_report
from tokenprune.errors import TokenpruneError

STAMP = "20261207_040000"
N = 40


def _run(root, folder, right, pipeline=None, costs=None, answer="red"):
    """One lmms-eval output folder: results, samples (``right`` docs answered correctly), bridge costs."""
    base = root / folder / "tokenprune"
    base.mkdir(parents=True)
    args = "pretrained=bundled" + (f",pipeline={pipeline}" if pipeline else "")
    results = {
        "results": {"vqa": {"alias": "vqa", "exact_match,none": right / N, "exact_match_stderr,none": 0.1}},
        "config": {"model": "tokenprune", "model_args": args},
    }
    (base / f"{STAMP}_results.json").write_text(json.dumps(results))
    lines = []
    for i in range(N):
        correct = i < right
        lines.append(
            {
                "doc_id": i,
                "doc": {"qid": f"q{i}", "kind": "a" if i % 2 else "b"},
                "target": "red",
                "filtered_resps": [answer if correct else "blue"],
                "exact_match": float(correct),
            }
        )
    (base / f"{STAMP}_samples_vqa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if costs is not None:
        cost_lines = [
            {
                "task": "vqa",
                "doc_id": i,
                "macs": costs[0],
                "visual_tokens": costs[1],
                "kv_bytes": 1024,
                "layer_tokens": [10, 10],
            }
            for i in range(N)
        ]
        (root / folder / "tokenprune_costs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cost_lines))
    return root / folder


def test_a_run_folder_becomes_records_named_by_its_pipeline(tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: fastv-25%\nstages:\n  - {at: {layer: 2}, reducer: fastv, keep: 0.25}\n")
    run = read_run(_run(tmp_path, "a", 30, pipeline=pipe, costs=(1e9, 20.0)), group_field="kind", id_field="qid")
    assert run.name == "fastv-25%" and run.model == "bundled" and run.metrics == {"vqa": "exact_match"}
    assert run.costs and len(run.records) == N
    first = run.records[0]
    assert first.id == "q0" and first.group == "b" and first.accuracy == 1.0 and first.macs == 1e9
    assert read_run(_run(tmp_path, "b", 30)).name == "unpruned"


def test_the_report_of_three_runs(tmp_path):
    runs = [
        str(_run(tmp_path, "ref", 36, costs=(4e9, 100.0))),
        f"fam-50%={_run(tmp_path, 'f50', 35, costs=(2e9, 50.0))}",
        f"fam-10%={_run(tmp_path, 'f10', 20, costs=(0.4e9, 10.0), answer='Red.')}",
    ]
    summary = build_report(runs, tmp_path / "out", group_field="kind", resamples=300)
    rows = {r["pipeline"]: r for r in summary.pipelines}
    assert rows["fam-10%"]["accuracy"] == 0.5 and rows["fam-10%"]["flops_reduction"] == pytest.approx(0.9)
    assert (rows["fam-10%"]["accuracy_lo"], rows["fam-10%"]["accuracy_hi"]) == pytest.approx(wilson_interval(20, N))
    ref = [float(i < 36) for i in range(N)]
    assert rows["fam-10%"]["vs_reference_p"] == pytest.approx(mcnemar_exact([float(i < 20) for i in range(N)], ref))
    # "Red." normalises as "red" (docs 0-19 agree), docs 20-35 differ, "blue" on both after 36
    assert rows["fam-10%"]["agreement"] == pytest.approx((N - 16) / N)
    assert summary.statistics["matched_budgets"]["flops"]["fam"]["75%"]["value"] == pytest.approx(
        0.875 * 0.375 + 0.5 * 0.625
    )
    assert "Warning: a task has only 40 examples" in " ".join(summary.statistics["findings"])
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000
    text = (tmp_path / "out" / "report.md").read_text()
    assert "- `fam-10%`: model `bundled`" in text and "## Accuracy per group" in text


def test_runs_without_costs_get_no_flops_and_no_plot(tmp_path):
    runs = [str(_run(tmp_path, "ref", 36)), f"other={_run(tmp_path, 'o', 30)}"]
    summary = build_report(runs, tmp_path / "out", resamples=200)
    assert all(r["gflops"] is None for r in summary.pipelines)
    assert not (tmp_path / "out" / "pareto.png").exists()
    assert "pareto.png" not in (tmp_path / "out" / "report.md").read_text()


def test_bad_runs_are_named(tmp_path):
    with pytest.raises(TokenpruneError, match="no lmms-eval results file"):
        read_run(tmp_path)
    ref = _run(tmp_path, "ref", 36)
    with pytest.raises(TokenpruneError, match="no numeric per-sample score 'acc'"):
        read_run(ref, metric="acc")
    with pytest.raises(TokenpruneError, match="no field 'missing'"):
        read_run(ref, id_field="missing")
    with pytest.raises(TokenpruneError, match="two runs have the same name"):
        build_report([str(ref), str(_run(tmp_path, "again", 30))], tmp_path / "out")
    result = CliRunner().invoke(get_app(), ["report", str(ref), "--reference", "nope", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--reference 'nope' is not one of the runs (unpruned)" in result.output
