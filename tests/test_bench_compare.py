"""`tokenprune compare` end to end on a tiny (untrained) mini VLM saved to disk and loaded back."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

import tokenprune.bench.runner as runner
from tokenprune.bench.config import load_config
from tokenprune.bench.records import Summary
from tokenprune.bench.runner import compare
from tokenprune.bench.store import ReferenceLogits, ResultsStore

PIPELINES = [
    {"sweep": {"reducers": ["random", "l2norm"], "keep": [0.5, 0.1], "seeds": 1}},  # seeds: test_bench_significance
    {
        "name": "two-stage",
        "stages": [
            {"at": "post_projector", "reducer": "random", "keep": 0.5},
            {"at": {"layer": 1}, "reducer": "random", "keep": 8},
        ],
    },
]
STABLE = ("pipeline", "n", "accuracy", "vqa_score", "agreement", "gflops", "flops_reduction", "visual_tokens", "kv_mib")


def _config(tiny_model_dir, out, **extra):
    base = {
        "model": str(tiny_model_dir),
        "output": str(out),
        "batch_size": 4,
        "tasks": [{"name": "synthvqa", "per_type": 2}],
        "pipelines": PIPELINES,
    }
    return load_config({**base, **extra})


def _stable_rows(folder):
    rows = json.loads((Path(folder) / "summary.json").read_text())["pipelines"]
    out = {}
    for r in rows:
        out[r["pipeline"]] = {k: (round(v, 9) if isinstance(v, float) else v) for k, v in r.items() if k in STABLE}
    return out


def _keys(folder):
    return [(r["key"], r["task"], r["id"]) for r in ResultsStore(Path(folder)).records()]


def test_compare_writes_results_and_reports(tiny_model_dir, tmp_path):
    outcome = compare(_config(tiny_model_dir, tmp_path / "run"))
    assert outcome.computed == 6 * 12 and outcome.reused == 0
    records = list(ResultsStore(tmp_path / "run").records())
    assert len(records) == 72 and len(set(_keys(tmp_path / "run"))) == 72
    first = records[0]
    assert first["pipeline"] == "unpruned" and first["versions"]["torch"] and first["seed"] == 0
    rows = _stable_rows(tmp_path / "run")
    assert rows["unpruned"]["flops_reduction"] == 0.0 and rows["unpruned"]["agreement"] == 1.0
    assert rows["random-10%"]["visual_tokens"] < rows["random-50%"]["visual_tokens"] < rows["unpruned"]["visual_tokens"]
    assert rows["random-10%"]["flops_reduction"] > rows["random-50%"]["flops_reduction"] > 0
    two = [r for r in records if r["pipeline"] == "two-stage"]
    assert all(r["layer_tokens"][1] < r["layer_tokens"][0] for r in two)  # the layer-1 stage shortened layer 1
    assert all("kl" in r and r["kl"] >= 0 for r in two)
    # the reference's logits travel beside its records, straight to reference/: never in a results line
    ref_lines = [r for r in records if r["pipeline"] == "unpruned"]
    assert len(ref_lines) == 12 and all(not {"agreement", "kl", "_logits"} & set(r) for r in ref_lines)
    logits = ReferenceLogits(tmp_path / "run")
    assert all(getattr(logits.get(r["key"], r["task"], r["id"]), "ndim", 0) == 1 for r in ref_lines)
    assert isinstance(outcome.summary, Summary) and outcome.summary.config_hash == first["config"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "| rank | pipeline |" in report
        and "| pipeline | background | colour | count | exists | position | text |" in report
    )
    assert (tmp_path / "run" / "pareto.png").stat().st_size > 1000
    header = (tmp_path / "run" / "summary.csv").read_text().splitlines()[0]
    assert header.startswith("rank,pipeline,n,accuracy") and "prefill_ms,prefill_ms_spread" in header
    assert "accuracy:" not in header  # one task: no per-task columns
    # the cost pass: every pipeline timed over the same rounds, and its peak memory measured
    timings = list(ResultsStore(tmp_path / "run", "timings.jsonl").records())
    assert sorted(t["pipeline"] for t in timings) == sorted(rows) and all(
        len(t["prefill_seconds"]) == 5 for t in timings
    )
    assert all(t["examples"] == 4 and t["peak_memory_bytes"] > 0 for t in timings)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["pipelines"]
    assert all(r["prefill_ms"] > 0 and r["prefill_ms_spread"] >= 0 and r["peak_memory_mib"] > 0 for r in summary)
    assert "interquartile range" in report and "CPU allocator" in report
    # every row has its intervals and its paired test; compare returns what it wrote
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written == json.loads(json.dumps(outcome.summary.to_json(), default=str))
    for r in summary:
        assert r["accuracy_lo"] <= r["accuracy"] <= r["accuracy_hi"] and r["kl_lo"] <= r["kl"] <= r["kl_hi"]
        assert r["pipeline"] == "unpruned" or 0 <= r["vs_reference_p"] <= 1
    assert written["statistics"]["resamples"] == 2000 and report.startswith("# tokenprune comparison\n\nOf 5 pipelines")
    # kept-token heatmaps: the first 3 examples of every pruning pipeline, none for the unpruned model
    maps = sorted(p.relative_to(tmp_path / "run" / "heatmaps") for p in (tmp_path / "run" / "heatmaps").rglob("*.png"))
    assert len(maps) == 5 * 3 and not any(p.parts[0] == "unpruned" for p in maps)
    assert {p.parts[0] for p in maps} == {"random-50%", "random-10%", "l2norm-50%", "l2norm-10%", "two-stage"}


def test_interrupted_run_resumes_without_recomputing(tiny_model_dir, tmp_path, monkeypatch):
    reference = tmp_path / "whole"
    compare(_config(tiny_model_dir, reference))
    original = runner._run_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        compare(_config(tiny_model_dir, tmp_path / "cut"))
    kept = len(_keys(tmp_path / "cut"))
    assert kept == 6 * 4  # six finished batches of four
    monkeypatch.setattr(runner, "_run_batch", original)
    outcome = compare(_config(tiny_model_dir, tmp_path / "cut"))
    assert (outcome.reused, outcome.computed) == (kept, 72 - kept)
    keys = _keys(tmp_path / "cut")
    assert len(keys) == len(set(keys)) == 72
    assert _stable_rows(tmp_path / "cut") == _stable_rows(reference)


def test_killed_process_resumes_and_a_torn_line_is_dropped(tiny_model_dir, tmp_path):
    config = tmp_path / "compare.yaml"
    out = tmp_path / "killed"
    config.write_text(yaml.safe_dump({**_config(tiny_model_dir, out).model_dump(mode="json"), "output": str(out)}))
    script = Path(sys.executable).with_name("tokenprune")
    proc = subprocess.Popen(
        [str(script), "compare", str(config), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert results.exists(), proc.stderr.read().decode()[-2000:]
    with results.open("ab") as f:
        f.write(b'{"key": "torn", "task"')  # a write cut short by the kill
    before = len(_keys(out))
    assert 8 <= before < 72
    result = subprocess.run([str(script), "compare", str(config), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{72 - before} computed, {before} reused" in result.stdout
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 72


def test_a_local_jsonl_task_runs_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (64, 32), colour).save(data / f"{i}.png")
        lines.append(
            json.dumps(
                {
                    "id": f"q{i}",
                    "image": f"{i}.png",
                    "question": "what colour is the background ?",
                    "answers": [colour],
                    "group": "colour",
                }
            )
        )
    (data / "questions.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(
        tiny_model_dir,
        tmp_path / "run",
        tasks=[{"name": "jsonl", "path": str(data / "questions.jsonl"), "max_new_tokens": 2}],
    )
    outcome = compare(config)
    assert outcome.computed == 3 * 6
    records = list(ResultsStore(tmp_path / "run").records())
    assert {r["id"] for r in records} == {"q0", "q1", "q2"} and {r["task"] for r in records} == {"jsonl"}
    assert all(r["answers"] and "accuracy" in r for r in records)


def test_a_saved_hugging_face_dataset_runs_end_to_end(tiny_model_dir, tmp_path):
    import datasets

    colours = ["red", "blue", "green", "yellow"]
    data = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (64, 32), c) for c in colours],
            "question": ["what colour is the background ?"] * 4,
            "answers": [[c, c] for c in colours],
            "qid": [f"d{i}" for i in range(4)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.Sequence(datasets.Value("string")),
                "qid": datasets.Value("string"),
            }
        ),
    )
    data.save_to_disk(str(tmp_path / "ds"))
    task = {"name": "hf_disk", "path": str(tmp_path / "ds"), "id_column": "qid", "limit": 3, "max_new_tokens": 1}
    outcome = compare(_config(tiny_model_dir, tmp_path / "run", tasks=[task]))
    assert outcome.computed == 3 * 6
    records = list(ResultsStore(tmp_path / "run").records())
    assert {r["id"] for r in records} == {"d0", "d1", "d2"} and all(len(r["answers"]) == 2 for r in records)
    bad = _config(tiny_model_dir, tmp_path / "bad", tasks=[{**task, "id_column": "nope"}])
    with pytest.raises(Exception, match=r"columns \['nope'\] are not in"):
        compare(bad)


def test_a_third_party_task_plugin_runs(tiny_model_dir, tmp_path):
    outcome = compare(_config(tiny_model_dir, tmp_path / "run", tasks=[{"name": "solid_colours", "per_colour": 1}]))
    assert outcome.computed == 4 * 6
    groups = json.loads((tmp_path / "run" / "summary.json").read_text())["groups"]["solid_colours"]["unpruned"]
    assert set(groups) == {"red", "green", "blue", "yellow"}


def test_two_tasks_get_per_task_columns_and_group_tables(tiny_model_dir, tmp_path):
    tasks = [{"name": "synthvqa", "per_type": 1}, {"name": "solid_colours", "per_colour": 1}]
    pipelines = [{"name": "half", "stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]}]
    config = _config(tiny_model_dir, tmp_path / "run", tasks=tasks, pipelines=pipelines)
    assert compare(config).computed == 2 * (6 + 4)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks"] == ["synthvqa", "solid_colours"]
    assert list(summary["groups"]) == ["synthvqa", "solid_colours"]
    assert set(summary["groups"]["solid_colours"]["unpruned"]) == {"red", "green", "blue", "yellow"}
    assert set(summary["groups"]["synthvqa"]["half"]) == {"background", "colour", "count", "exists", "position", "text"}
    for row in summary["pipelines"]:
        per = row["tasks"]
        assert per["synthvqa"]["n"] == 6 and per["solid_colours"]["n"] == 4
        assert row["accuracy"] == pytest.approx((per["synthvqa"]["accuracy"] + per["solid_colours"]["accuracy"]) / 2)
        assert row["agreement:solid_colours"] == per["solid_colours"]["agreement"]
    header = (tmp_path / "run" / "summary.csv").read_text().splitlines()[0].split(",")
    start = header.index("accuracy:synthvqa")  # the per-task columns after the others, each with its interval
    per_task = [
        f"{m}:{t}{s}"
        for t in ("synthvqa", "solid_colours")
        for m in ("accuracy", "agreement")
        for s in ("", "_lo", "_hi")
    ]
    assert header[start : start + 12] == per_task and header[start + 12 :][:2] == ["rank_range", "tier"]
    assert all(row["accuracy:solid_colours_lo"] <= row["accuracy:solid_colours"] for row in summary["pipelines"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| accuracy:synthvqa | agreement:synthvqa | accuracy:solid_colours | agreement:solid_colours |" in report
    assert "## Accuracy per group: synthvqa" in report and "## Accuracy per group: solid_colours" in report
    assert "| pipeline | blue | green | red | yellow |" in report
    timings = ResultsStore(tmp_path / "run", "timings.jsonl")
    assert sorted((t["task"], t["pipeline"]) for t in timings.records()) == [
        ("solid_colours", "half"), ("solid_colours", "unpruned"), ("synthvqa", "half"), ("synthvqa", "unpruned"),
    ]  # fmt: skip
    again = compare(config)  # a rerun reuses the results and the cost pass's measurements
    assert (again.computed, again.reused) == (0, 20) and len(list(timings.records())) == 4


def test_length_bucketing_reorders_batches_and_changes_no_result(tiny_model_dir, tmp_path):
    pipelines = [{"name": "half", "stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]}]
    runs = {}
    for bucket in (True, False):
        out = tmp_path / str(bucket)
        compare(_config(tiny_model_dir, out, pipelines=pipelines, bucket=bucket, heatmaps=0))
        runs[bucket] = list(ResultsStore(out).records())
    order = {b: [r["visual_tokens"] for r in rs if r["pipeline"] == "unpruned"] for b, rs in runs.items()}
    assert order[True] == sorted(order[True]) and order[False] != sorted(order[False])  # batches of similar length
    bucketed = {(r["pipeline"], r["id"]): r for r in runs[True]}
    plain = {(r["pipeline"], r["id"]): r for r in runs[False]}
    assert bucketed.keys() == plain.keys() and len(plain) == 24
    for k, r in plain.items():
        assert bucketed[k]["prediction"] == r["prediction"] and bucketed[k]["layer_tokens"] == r["layer_tokens"], k
        assert bucketed[k]["first_token"] == r["first_token"], k
        assert bucketed[k].get("kl", 0) == pytest.approx(r.get("kl", 0), abs=1e-5), k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    single = tmp_path / "single"
    compare(_config(tiny_model_dir, single))
    config = tmp_path / "compare.yaml"
    double = tmp_path / "double"
    config.write_text(
        yaml.safe_dump({**_config(tiny_model_dir, double).model_dump(mode="json"), "output": str(double)})
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "tokenprune.cli",
        "compare",
        str(config),
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = {(r["pipeline"], r["id"]): r for r in ResultsStore(single).records()}
    b = {(r["pipeline"], r["id"]): r for r in ResultsStore(double).records()}
    assert a.keys() == b.keys() and len(b) == 72
    for k in a:
        assert a[k]["prediction"] == b[k]["prediction"] and a[k]["layer_tokens"] == b[k]["layer_tokens"], k
        assert a[k].get("kl", 0) == pytest.approx(b[k].get("kl", 0), abs=1e-5), k
    assert _stable_rows(single) == _stable_rows(double)


def test_output_that_is_not_a_terminal_gets_plain_progress_lines(tiny_model_dir, tmp_path):
    """Under a pipe or a log file the progress bars would print nothing for minutes: plain lines instead."""
    from typer.testing import CliRunner

    from tokenprune.cli import app

    config = tmp_path / "compare.yaml"
    pipelines = [{"name": "half", "stages": [{"at": "post_projector", "reducer": "random", "keep": 0.5}]}]
    data = _config(tiny_model_dir, tmp_path / "run", pipelines=pipelines, batch_size=6).model_dump(mode="json")
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["compare", str(config)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[1/3] synthvqa / unpruned: 1/2 batches")
    assert any(line.startswith("[2/3] synthvqa / half: 2/2 batches") for line in lines)
    assert lines[-1].startswith("[3/3] synthvqa / cost pass")  # counted among the passes
    assert all("ETA" in line for line in lines)
