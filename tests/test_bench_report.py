"""Report summaries: ranking ties, several tasks, per-task group tables (from hand-made result records)."""

import pytest

from tokenprune.bench.config import CompareConfig
from tokenprune.bench.report import columns, report_markdown, summarize, task_labels


def _record(pipeline, task, i, accuracy, agreement=None, kl=None, macs=1e9, group="g"):
    r = {
        "pipeline": pipeline,
        "task": task,
        "id": f"{task}-{i}",
        "group": group,
        "accuracy": accuracy,
        "vqa_score": accuracy,
        "macs": macs,
        "visual_tokens": 10.0,
        "kv_bytes": 2**20,
    }
    if agreement is not None:
        r.update(agreement=agreement, kl=kl)
    return r


def test_ties_rank_by_agreement_then_kl_so_unpruned_leads_its_equals():
    records = [
        _record("unpruned", "t", 0, 1.0, macs=4e9),
        _record("unpruned", "t", 1, 0.0, macs=4e9),
        _record("cheap", "t", 0, 1.0, 0.5, 0.30, macs=1e9),  # same accuracy, less agreement, fewer FLOPs
        _record("cheap", "t", 1, 0.0, 0.5, 0.30, macs=1e9),
        _record("close", "t", 0, 1.0, 0.5, 0.10, macs=2e9),  # same accuracy and agreement, lower KL
        _record("close", "t", 1, 0.0, 0.5, 0.10, macs=2e9),
        _record("best", "t", 0, 1.0, 1.0, 0.0, macs=1e9),
        _record("best", "t", 1, 1.0, 1.0, 0.0, macs=1e9),
    ]
    rows, _ = summarize(records, ["unpruned", "cheap", "close", "best"])
    assert [r["pipeline"] for r in rows] == ["best", "unpruned", "close", "cheap"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]


def test_several_tasks_get_columns_and_group_tables_each():
    records = []
    for i in range(4):  # task a: four examples, unpruned right on all, half wrong on two
        records.append(_record("unpruned", "a", i, 1.0, group="x" if i < 2 else "y"))
        records.append(_record("half", "a", i, float(i % 2), float(i % 2), 0.1, group="x" if i < 2 else "y"))
    for i in range(2):  # task b: two examples, both pipelines wrong on one
        records.append(_record("unpruned", "b", i, float(i), group="z"))
        records.append(_record("half", "b", i, float(i), 1.0, 0.0, group="z"))
    rows, groups = summarize(records, ["unpruned", "half"], ["a", "b"])
    half = next(r for r in rows if r["pipeline"] == "half")
    assert half["tasks"]["a"]["accuracy"] == 0.5 and half["tasks"]["b"]["accuracy"] == 0.5
    assert half["accuracy"] == pytest.approx(0.5)  # each task counts once
    assert half["accuracy:a"] == 0.5 and half["agreement:a"] == 0.5 and half["agreement:b"] == 1.0
    unpruned = next(r for r in rows if r["pipeline"] == "unpruned")
    assert unpruned["accuracy"] == pytest.approx((1.0 + 0.5) / 2) and unpruned["agreement:b"] == 1.0
    assert groups == {
        "a": {"unpruned": {"x": 1.0, "y": 1.0}, "half": {"x": 0.5, "y": 0.5}},
        "b": {"unpruned": {"z": 0.5}, "half": {"z": 0.5}},
    }
    config = CompareConfig(tasks=[{"name": "a"}, {"name": "b"}])
    text = report_markdown(config, rows, groups, ["a", "b"])
    assert "| accuracy:a | agreement:a | accuracy:b | agreement:b |" in text
    assert (
        "## Accuracy per group: a\n\n| pipeline | x | y |" in text
        and "## Accuracy per group: b\n\n| pipeline | z |" in text
    )
    assert "| half | 50.0% | 50.0% |" in text and "not measured" in text  # no cost pass in these records


def test_columns_and_labels():
    assert "accuracy:a" not in columns(["a"])
    assert columns(["a", "b"])[-4:] == ["accuracy:a", "agreement:a", "accuracy:b", "agreement:b"]
    assert task_labels([{"name": "a"}, {"name": "b"}, {"name": "a", "split": "validation"}]) == ["a", "b", "a#2"]
