"""The real ``lmms-eval`` command line with ``--model tokenprune``, on a local SynthVQA dataset.

The test builds a ``save_to_disk`` dataset and two task YAMLs (one generation task, one
multiple-choice task read through ``loglikelihood``), runs ``lmms-eval`` as a user does (a
subprocess), and checks its answers and scores against ``tokenprune compare`` (also its real command
line) on the same examples, and against the bridge's own log-likelihoods.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

PIPELINE = {"name": "fastv25", "stages": [{"at": {"layer": 2}, "reducer": "fastv", "keep": 0.25}]}
PER_TYPE = 3
MC_TYPES = ("colour", "background")

TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]
"""

GENERATION_TASK = """
task: tp_synthvqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """
task: tp_synthvqa_mc
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _text(response: str | list[str]) -> str:
    return response if isinstance(response, str) else response[0]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset, the task folder and the pipeline file, as a user would lay them out."""
    from tokenprune.bench.builtin_tasks import SynthVQA

    root = tmp_path_factory.mktemp("lmms")
    examples = SynthVQA(SynthVQA.Params(per_type=PER_TYPE)).examples()
    answers_of = {}
    for ex in examples:
        answers_of.setdefault(ex.group, set()).add(ex.answers[0])
    choices = [sorted(answers_of[ex.group]) if ex.group in MC_TYPES else [ex.answers[0]] for ex in examples]
    columns = {
        "id": [ex.id for ex in examples],
        "image": [ex.images[0] for ex in examples],
        "question": [ex.question for ex in examples],
        "answer": [ex.answers[0] for ex in examples],
        "group": [ex.group for ex in examples],
        "choices": choices,
        "target": [c.index(ex.answers[0]) for c, ex in zip(choices, examples, strict=True)],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "group": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "target": datasets.Value("int64"),
        }
    )
    dataset = datasets.Dataset.from_dict(columns, features=features)
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(root / "data"))
    datasets.DatasetDict({"test": dataset.filter(lambda d: d["group"] in MC_TYPES)}).save_to_disk(str(root / "mc"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    (tasks / "tp_synthvqa.yaml").write_text(GENERATION_TASK.format(data=root / "data"))
    (tasks / "tp_synthvqa_mc.yaml").write_text(CHOICE_TASK.format(data=root / "mc"))
    (root / "pipeline.yaml").write_text(yaml.safe_dump(PIPELINE))
    return root


def _lmms_eval(workdir: Path, name: str, tasks: str, pipeline: Path | None) -> dict[str, dict]:
    """Run the CLI (the bridge logging its costs into the run folder); returns ``{task: {"results": ..., "samples": [...]}}``."""
    out = workdir / f"out-{name}"
    model_args = f"pretrained=bundled,device=cpu,costs={out / 'tokenprune_costs.jsonl'}"
    model_args += f",pipeline={pipeline}" if pipeline else ""
    cmd = [
        _bin("lmms-eval"),
        "--model",
        "tokenprune",
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--include_path",
        str(workdir / "tasks"),
        "--batch_size",
        "4",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    found = {}
    for task in tasks.split(","):
        samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
        found[task] = {"results": results[task], "samples": samples}
    return found


@pytest.fixture(scope="module")
def compared(workdir: Path) -> dict[str, dict[str, dict]]:
    """``tokenprune compare`` (its command line) on the same SynthVQA examples: pipeline -> id -> record."""
    config = {
        "model": "bundled",
        "batch_size": 4,
        "output": str(workdir / "compare"),
        "tasks": [{"name": "synthvqa", "per_type": PER_TYPE}],
        "pipelines": [{"file": str(workdir / "pipeline.yaml")}],
    }
    path = workdir / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [_bin("tokenprune"), "compare", str(path), "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, dict[str, dict]] = {}
    for line in (workdir / "compare" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record["pipeline"], {})[record["id"]] = record
    return out


@pytest.fixture(scope="module")
def generated(workdir: Path) -> dict[str, dict[str, dict]]:
    """The lmms-eval CLI on the generation task, unpruned and with the pipeline: name -> its ``_lmms_eval`` result."""
    return {
        name: _lmms_eval(workdir, name, "tp_synthvqa", workdir / "pipeline.yaml" if name != "unpruned" else None)
        for name in ("unpruned", "fastv25")
    }


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["unpruned", "fastv25"])
def test_the_cli_answers_as_tokenprune_compare_does(workdir, compared, generated, pipeline):
    task = generated[pipeline]["tp_synthvqa"]
    ids = datasets.load_from_disk(str(workdir / "data"))["test"]["id"]
    answers = {ids[s["doc_id"]]: _text(s["filtered_resps"]) for s in task["samples"]}
    expected = compared[pipeline]
    assert set(answers) == set(expected) and len(answers) == 6 * PER_TYPE
    assert answers == {i: r["prediction"] for i, r in expected.items()}
    accuracy = sum(r["prediction"] == r["answers"][0] for r in expected.values()) / len(expected)
    assert task["results"]["exact_match,none"] == pytest.approx(accuracy)


@pytest.mark.slow
def test_a_multiple_choice_task_scores_the_bridges_loglikelihoods(workdir):
    """Through lmms-eval 0.7.3's CLI, loglikelihood results arrive as numbers (not their str()), and the
    accuracy is that of the choices with the lowest loss by the bridge's own loglikelihood."""
    from lmms_eval.api.instance import Instance

    from tokenprune.integrations.lmms_eval import TokenpruneLMM

    run = _lmms_eval(workdir, "mc", "tp_synthvqa_mc", workdir / "pipeline.yaml")["tp_synthvqa_mc"]
    dataset = datasets.load_from_disk(str(workdir / "mc"))["test"]
    lmm = TokenpruneLMM(pretrained="bundled", device="cpu", pipeline=str(workdir / "pipeline.yaml"))
    lmm.task_dict = {"mc": {"test": dataset}}
    correct = []
    for i, doc in enumerate(dataset):
        requests = [
            Instance(
                "loglikelihood",
                (doc["question"], f" {c}", lambda d: [d["image"]], i, "mc", "test"),
                idx=j,
                metadata={"task": "mc", "doc_id": i, "repeats": 1},
            )
            for j, c in enumerate(doc["choices"])
        ]
        scores = [loss for loss, _ in lmm.loglikelihood(requests)]
        correct.append(float(min(range(len(scores)), key=scores.__getitem__) == doc["target"]))  # lowest loss
    lmm.run.remove()
    assert sorted(s["doc_id"] for s in run["samples"]) == list(range(len(dataset)))
    logged = [float(resp[0]) for s in run["samples"] for resp in s["filtered_resps"]]  # the log writes str()
    assert all(v >= 0 for v in logged)  # losses
    assert run["results"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


REPORTED = ("n", "rank", "rank_range", "tier", "gflops", "flops_reduction", "visual_tokens", "kv_mib")
REPORTED_METRICS = ("accuracy", "accuracy_lo", "accuracy_hi", "agreement", "agreement_lo", "agreement_hi")
PAIRED = ("vs_reference", "vs_reference_lo", "vs_reference_hi", "vs_reference_p")


@pytest.mark.slow
def test_tokenprune_report_on_the_lmms_eval_logs_gives_the_numbers_of_compare(workdir, compared, generated):
    """Both command lines on the same examples: the same scores, intervals, paired test, tiers and costs."""
    runs = [str(workdir / "out-unpruned"), f"fastv25={workdir / 'out-fastv25'}"]
    cmd = [_bin("tokenprune"), "report", *runs, "-o", "report"]  # paired by doc_id: 0.7.3 logs no documents
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fastv25" in proc.stdout and "report.md" in proc.stdout
    report = json.loads((workdir / "report" / "summary.json").read_text())
    compare = json.loads((workdir / "compare" / "summary.json").read_text())
    mine = {r["pipeline"]: r for r in report["pipelines"]}
    theirs = {r["pipeline"]: r for r in compare["pipelines"]}
    assert set(mine) == set(theirs) == {"unpruned", "fastv25"}
    for name in mine:
        for key in REPORTED + REPORTED_METRICS + PAIRED:
            expected = theirs[name][key]
            expected = pytest.approx(expected, rel=1e-9) if isinstance(expected, float) else expected
            assert mine[name][key] == expected, (name, key)
    assert mine["fastv25"]["visual_tokens"] < mine["unpruned"]["visual_tokens"]  # the bridge's costs arrived
    assert list(report["statistics"]["group_intervals"]["tp_synthvqa"]["fastv25"]) == ["all"]  # no documents logged
    assert report["statistics"]["resamples"] == compare["statistics"]["resamples"] == 2000
    assert report["statistics"]["findings"] == compare["statistics"]["findings"]
    assert report["runs"][1]["metrics"] == {"tp_synthvqa": "exact_match"} and report["runs"][1]["costs"] is True
    text = (workdir / "report" / "report.md").read_text()
    assert "lmms-eval runs (`--log_samples`), compared with the reference run `unpruned`" in text
