"""Typed comparison records: result and cost lines read and written byte for byte, the summary, `metrics`."""

import csv
import json

import pytest

from tokenprune.bench.config import REFERENCE, CompareConfig, load_config, pipeline_key
from tokenprune.bench.records import CostRecord, ResultRecord, Summary, as_results
from tokenprune.bench.report import METRICS, write_reports
from tokenprune.bench.store import ResultsStore
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline

# a results.jsonl line as tokenprune 0.x wrote it (the reference's: no agreement or kl; no labels: no accuracy)
OLD_LINE = {
    "key": "k1", "config": "c1", "pipeline": "unpruned", "task": "synthvqa", "id": "q7", "group": "colour",
    "question": "What colour?", "prediction": "red", "answers": [], "first_token": 5, "layer_tokens": [40, 40],
    "visual_tokens": 32.0, "macs": 123456, "kv_bytes": 2048, "seed": 0, "versions": {"torch": "2.13.0"},
}  # fmt: skip


def _dumped(record):
    return json.dumps(record, sort_keys=True)


def test_a_stored_line_reads_typed_and_writes_back_byte_for_byte(tmp_path):
    pruned = {**OLD_LINE, "pipeline": "half", "accuracy": 1.0, "vqa_score": 1.0, "agreement": 0.0, "kl": 0.25}
    later = {**OLD_LINE, "pipeline": "later", "new_field": [1, 2]}  # a key a later version added
    store = ResultsStore(tmp_path)
    store.append([OLD_LINE, pruned, later])
    typed = list(store.results())
    assert typed[0].accuracy is None and typed[0].metric("kl") is None and typed[0].layer_tokens == [40, 40]
    assert typed[1].metric("kl") == 0.25 and typed[2].extra == {"new_field": [1, 2]}
    assert [_dumped(r.to_json()) for r in typed] == [_dumped(OLD_LINE), _dumped(pruned), _dumped(later)]
    again = ResultsStore(tmp_path / "again")
    again.append(typed)  # typed records are written as their lines
    assert again.path.read_bytes() == store.path.read_bytes()
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        typed[0].metric("bleu")


def test_a_sparse_line_gets_defaults_and_mappings_are_accepted():
    record = ResultRecord.from_json({"pipeline": "p", "task": "t", "id": "3", "accuracy": 0.5})
    assert record.group == "all" and record.prediction is None and record.macs is None
    assert record.to_json() == {"pipeline": "p", "task": "t", "id": "3", "group": "all", "prediction": None,
                                "accuracy": 0.5}  # fmt: skip
    assert as_results([record, {"pipeline": "q", "task": "t", "id": "1"}])[0] is record
    with pytest.raises(TokenpruneError, match="a ResultRecord line lacks task, id"):
        ResultRecord.from_json({"pipeline": "p"})
    with pytest.raises(TokenpruneError, match="a CostRecord line lacks timing"):
        CostRecord.from_json({"key": "k", "pipeline": "p", "task": "t", "examples": 1, "prefill_seconds": []})


def test_cost_lines_round_trip_with_nulls_where_not_measured(tmp_path):
    line = {"key": "k", "pipeline": "p", "task": "t", "timing": "d", "examples": 4, "prefill_seconds": [0.1, 0.2],
            "peak_memory_bytes": None, "memory": None, "device": "cpu", "versions": {}}  # fmt: skip
    store = ResultsStore(tmp_path, "timings.jsonl")
    store.append([CostRecord.from_json(line)])
    assert json.loads(store.path.read_text()) == line
    assert next(store.costs()) == CostRecord.from_json(line)


def test_the_summary_reads_back_from_its_json():
    summary = Summary({"config_hash": "abc", "config": {}}, ["t"], [{"pipeline": "p", "rank": 1}], {}, {"seed": 0})
    data = summary.to_json()
    assert list(data)[:2] == ["config_hash", "config"] and Summary.from_json(data) == summary
    assert summary.config_hash == "abc" and summary.row("p")["rank"] == 1
    with pytest.raises(KeyError, match="no pipeline 'q'"):
        summary.row("q")


def _store_run(folder, config):
    """Hand-made results of `unpruned` and `half` on 30 examples, every metric stored."""
    pipes = [(REFERENCE, Pipeline(name=REFERENCE)), ("half", Pipeline(name="half"))]
    spec = config.tasks[0]
    records = []
    for name, pipe in pipes:
        key = pipeline_key(name, pipe, config, spec)
        for i in range(30):
            right = float(name == REFERENCE or i % 2 == 0)
            fidelity = {} if name == REFERENCE else {"agreement": right, "kl": 0.1 * (i % 3)}
            records.append(ResultRecord(pipeline=name, task="synthvqa", id=f"q{i}", key=key, macs=1e9,
                                        visual_tokens=10.0, kv_bytes=1024, accuracy=right, vqa_score=right,
                                        **fidelity))  # fmt: skip
    ResultsStore(folder).append(records)
    return pipes


def test_metrics_lists_what_the_report_shows_from_the_same_stored_results(tmp_path):
    full = CompareConfig(output=tmp_path, resamples=100)
    pipes = _store_run(tmp_path, full)
    summary = write_reports(full, pipes, ResultsStore(tmp_path))
    assert isinstance(summary, Summary) and summary.row("half")["kl"] == pytest.approx(0.1)
    header = next(csv.reader((tmp_path / "summary.csv").open()))
    assert all(m in header and f"{m}_lo" in header for m in METRICS)
    stored = ResultsStore(tmp_path).path.read_bytes()

    short = full.model_copy(update={"metrics": ["accuracy", "agreement"]})
    summary = write_reports(short, pipes, ResultsStore(tmp_path))
    header = next(csv.reader((tmp_path / "summary.csv").open()))
    assert "accuracy_hi" in header and "agreement" in header
    assert not {"kl", "kl_lo", "vqa_score", "vqa_score_hi"} & set(header)
    assert summary.row("half")["kl"] is None and summary.row("half")["accuracy"] == 0.5
    assert summary.row(REFERENCE)["kl"] is None and summary.row(REFERENCE)["kl_lo"] is None
    assert summary.row(REFERENCE)["tasks"]["synthvqa"]["vqa_score"] is None
    table = (tmp_path / "report.md").read_text()
    assert "| agreement |" in table and "| kl |" not in table and "vqa_score" not in table
    assert ResultsStore(tmp_path).path.read_bytes() == stored  # the results are kept whole

    fidelity = full.model_copy(update={"metrics": ["agreement", "kl"]})  # no labels reported: ranked by agreement
    summary = write_reports(fidelity, pipes, ResultsStore(tmp_path))
    assert summary.statistics["metric"] == "agreement" and summary.row("half")["accuracy"] is None
    assert summary.row("half")["kl"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (["kl", "vqa_score"], "neither `accuracy` nor `agreement`.*add one of them"),
        (["accuracy", "kl", "accuracy"], "accuracy listed twice; list each metric once"),
        (["bleu"], "metrics.0: Input should be 'accuracy', 'vqa_score', 'agreement' or 'kl'"),
    ],
)
def test_bad_metrics_are_named_with_the_fix(metrics, message):
    with pytest.raises(TokenpruneError, match=message):
        load_config({"metrics": metrics})
