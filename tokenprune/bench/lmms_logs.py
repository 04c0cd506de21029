"""lmms-eval runs as comparison records: what ``tokenprune report`` reads.

A run is the folder that ``lmms-eval --output_path DIR --log_samples`` wrote: ``<model>/<time>_results.json``
(its ``config.model_args`` name the pipeline and the model) and ``<time>_samples_<task>.jsonl``, one line
per document with the task's per-sample scores. With the tokenprune bridge's ``costs=`` model arg
pointed into the folder, ``tokenprune_costs.jsonl`` adds each answer's token counts and FLOPs.

Every run becomes the result records :func:`tokenprune.bench.report.summarize` reads: one per
document, ``accuracy`` holding the task's per-sample score (its first metric, or the one named),
``agreement`` the normalised answer's equality with the reference run's answer.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenprune.bench.metrics import normalize_answer
from tokenprune.bench.records import ResultRecord
from tokenprune.errors import TokenpruneError

COSTS_FILE = "tokenprune_costs.jsonl"
UNPRUNED = "unpruned"


@dataclass
class LmmsRun:
    """One lmms-eval run: its name (the pipeline), model, folder, metric per task, and records."""

    name: str
    model: str
    folder: Path
    metrics: dict[str, str] = field(default_factory=dict)
    records: list[ResultRecord] = field(default_factory=list)
    costs: bool = False


def read_run(
    folder: Path,
    name: str | None = None,
    metric: str | None = None,
    id_field: str | None = None,
    group_field: str | None = None,
) -> LmmsRun:
    """Read one ``--output_path`` folder (its latest results file when it holds several).

    Args:
        folder: The run's folder.
        name: The run's label (default: the pipeline's ``name:``, else its file's stem, ``unpruned`` without one).
        metric: The per-sample score to use (default: each task's first metric).
        id_field: A document field that identifies it across runs (default: lmms-eval's ``doc_id``).
        group_field: A document field to break results down by (default: none, one group ``all``).

    Raises:
        TokenpruneError: no results file, no sample logs, or a metric the logs lack (named, with the fix).
    """
    results_files = sorted(Path(folder).rglob("*_results.json"), key=lambda p: p.name)
    if not results_files:
        raise TokenpruneError(f"{folder}: no lmms-eval results file (*_results.json); run lmms-eval with --output_path")
    results_path = results_files[-1]
    stamp = results_path.name[: -len("_results.json")]
    results = json.loads(results_path.read_text(encoding="utf-8"))
    args = _model_args(results.get("config", {}).get("model_args", ""))
    run = LmmsRun(name or _pipeline_name(args.get("pipeline")), str(args.get("pretrained", "?")), Path(folder))
    samples = sorted(results_path.parent.glob(f"{stamp}_samples_*.jsonl"))
    if not samples:
        raise TokenpruneError(
            f"{folder}: no per-sample logs ({stamp}_samples_<task>.jsonl); run lmms-eval with --log_samples"
        )
    costs = _costs(Path(folder))
    run.costs = bool(costs)
    for path in samples:
        task = path.name[len(f"{stamp}_samples_") : -len(".jsonl")]
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        run.metrics[task] = _metric(task, results.get("results", {}).get(task, {}), lines, metric, folder)
        for sample in lines:
            run.records.append(_record(run.name, task, sample, run.metrics[task], id_field, group_field, costs))
    return run


def _record(
    name: str,
    task: str,
    sample: dict[str, Any],
    metric: str,
    id_field: str | None,
    group_field: str | None,
    costs: dict[tuple[str, int], dict[str, Any]],
) -> ResultRecord:
    doc = sample.get("doc", {})
    if id_field is not None and id_field not in doc:
        raise TokenpruneError(f"task {task!r}: the logged documents have no field {id_field!r} (--id-field)")
    response = sample.get("filtered_resps", [None])
    response = response[0] if isinstance(response, list) and response else response
    return ResultRecord(
        pipeline=name,
        task=task,
        id=str(doc[id_field]) if id_field is not None else str(sample["doc_id"]),
        group=str(doc.get(group_field, "all")) if group_field else "all",
        prediction=response if isinstance(response, str) else None,
        accuracy=float(sample[metric]),
        **costs.get((task, int(sample["doc_id"])), {}),
    )


def add_agreement(runs: list[LmmsRun], reference: str) -> None:
    """``agreement`` of each record: its normalised answer equals the reference run's (generation tasks only)."""
    ref = next(r for r in runs if r.name == reference)
    answers = {(r.task, r.id): r.prediction for r in ref.records}
    for run in runs:
        for record in run.records:
            theirs = answers.get((record.task, record.id))
            if isinstance(theirs, str) and isinstance(record.prediction, str):
                record.agreement = float(normalize_answer(record.prediction) == normalize_answer(theirs))


def _metric(task: str, results: dict[str, Any], lines: list[dict[str, Any]], metric: str | None, folder: Path) -> str:
    """The per-sample score: ``metric`` if given, else the task's first aggregated metric found in its samples."""
    logged = [k.split(",")[0] for k in results if "," in k and not k.split(",")[0].endswith("_stderr")]
    candidates = [metric] if metric is not None else logged
    for name in candidates:
        if lines and all(isinstance(s.get(name), (int, float)) and not isinstance(s.get(name), bool) for s in lines):
            return name
    raise TokenpruneError(
        f"{folder}: task {task!r}: no numeric per-sample score "
        + (f"{metric!r}" if metric else f"among {logged}")
        + "; name one that every sample line has with --metric"
    )


def _costs(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The bridge's cost lines by ``(task, doc_id)`` (the last line of a document wins)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted(folder.rglob(COSTS_FILE)):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                c = json.loads(line)
                keep = ("layer_tokens", "visual_tokens", "macs", "kv_bytes")
                out[(c["task"], int(c["doc_id"]))] = {k: c[k] for k in keep if k in c}
    return out


def _model_args(text: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    out = {}
    for part in str(text).split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _pipeline_name(path: str | None) -> str:
    """The pipeline file's ``name:`` (its stem when it has none or cannot be read); ``unpruned`` without one."""
    if not path:
        return UNPRUNED
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return file.stem
    return str(data.get("name") or file.stem) if isinstance(data, dict) else file.stem


def check_names(runs: list[LmmsRun]) -> None:
    """Refuse two runs with one name: they would be averaged as one pipeline."""
    seen: dict[str, list[Path]] = defaultdict(list)
    for run in runs:
        seen[run.name].append(run.folder)
    clashes = {n: f for n, f in seen.items() if len(f) > 1}
    if clashes:
        detail = "; ".join(f"{n}: {', '.join(map(str, f))}" for n, f in clashes.items())
        raise TokenpruneError(f"two runs have the same name ({detail}); name them with NAME=FOLDER")


__all__ = ["COSTS_FILE", "LmmsRun", "add_agreement", "check_names", "read_run"]
