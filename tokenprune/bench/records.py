"""Typed records of a comparison: a result line, a cost-pass line, and the summary.

* :class:`ResultRecord`: one line of ``results.jsonl`` (one pipeline on one example), or one sample
  of an lmms-eval run (``tokenprune report``), which has fewer fields.
* :class:`CostRecord`: one line of ``timings.jsonl`` (one pipeline's cost pass on one task).
* :class:`Summary`: what ``summary.json`` holds, and what :func:`~tokenprune.bench.runner.compare`
  and ``tokenprune report`` return.

The on-disk formats are unchanged: :meth:`ResultRecord.to_json` writes the keys an earlier version
wrote (a metric that was not computed is left out, not written as ``null``), and ``from_json`` reads
any earlier line; keys this version does not know are kept in ``extra`` and written back as they
were. The reference's first-token logits never travel in a record: the runner passes them beside
the records (see :mod:`tokenprune.bench.runner`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tokenprune.errors import TokenpruneError

METRIC_NAMES = ("accuracy", "vqa_score", "agreement", "kl")
"""Every per-example metric a result can carry (see :mod:`tokenprune.bench.metrics`)."""


@dataclass
class ResultRecord:
    """One pipeline's result on one example.

    Attributes:
        pipeline: The pipeline's name.
        task: The task's label.
        id: The example's id within the task.
        group: The label results are broken down by (question type); ``"all"`` without one.
        prediction: The generated answer (``None``: an lmms-eval sample without a text answer).
        key: The result key (:func:`~tokenprune.bench.config.pipeline_key`): what the result depends on.
        config: The comparison config's hash.
        question: The question asked.
        answers: The reference answers (empty: no labels).
        first_token: The id of the first generated token.
        layer_tokens: Tokens of this example entering each decoder layer.
        visual_tokens: Visual tokens per layer, on average.
        macs: The language model's prefill multiply-accumulates (analytic).
        kv_bytes: The KV cache's bytes after the prefill.
        seed: The comparison's seed.
        versions: Versions of tokenprune, torch, transformers and Python.
        accuracy: Exact match against the answers (``None``: not computed).
        vqa_score: The VQA soft score (``None``: not computed).
        agreement: 1.0 when the answer equals the unpruned model's, after normalisation.
        kl: ``KL(p_unpruned || p_pruned)`` of the first answer token, in nats.
        extra: Keys of a stored line that this version does not know, kept as they were.
    """

    pipeline: str
    task: str
    id: str
    group: str = "all"
    prediction: str | None = None
    key: str | None = None
    config: str | None = None
    question: str | None = None
    answers: list[str] | None = None
    first_token: int | None = None
    layer_tokens: list[int] | None = None
    visual_tokens: float | None = None
    macs: float | None = None
    kv_bytes: int | None = None
    seed: int | None = None
    versions: dict[str, str] | None = None
    accuracy: float | None = None
    vqa_score: float | None = None
    agreement: float | None = None
    kl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> float | None:
        """The value of metric ``name`` (one of :data:`METRIC_NAMES`), ``None`` when not computed."""
        if name not in METRIC_NAMES:
            raise KeyError(f"unknown metric {name!r}; one of {', '.join(METRIC_NAMES)}")
        value: float | None = getattr(self, name)
        return value

    def to_json(self) -> dict[str, Any]:
        """The ``results.jsonl`` line: every field set (``prediction`` even when ``None``), then ``extra``."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and (getattr(self, f.name) is not None or f.name == "prediction")
        }
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResultRecord:
        """Read a stored line (any earlier version's); unknown keys go to ``extra``."""
        return cls(**_split(cls, data, ("pipeline", "task", "id")))


def as_results(records: Iterable[ResultRecord | Mapping[str, Any]]) -> list[ResultRecord]:
    """Typed records from typed records or stored lines (a mapping, as earlier versions passed them)."""
    return [r if isinstance(r, ResultRecord) else ResultRecord.from_json(r) for r in records]


@dataclass
class CostRecord:
    """One pipeline's cost pass on one task's timing batches (a line of ``timings.jsonl``).

    Attributes:
        key: The pipeline's result key on this task.
        pipeline: The pipeline's name.
        task: The task's label.
        timing: Hash of the cost-pass settings, the timing batches' ids and the versions.
        examples: Examples in the timing batches.
        prefill_seconds: Prefill seconds per example, one per timed round.
        peak_memory_bytes: Peak tensor memory of one batch's prefill; ``None``: not measured.
        memory: How peak memory was measured; ``None``: not measured.
        device: The device.
        versions: Versions of tokenprune, torch, transformers and Python.
        extra: Keys of a stored line that this version does not know.
    """

    key: str
    pipeline: str
    task: str
    timing: str
    examples: int
    prefill_seconds: list[float]
    peak_memory_bytes: int | None = None
    memory: str | None = None
    device: str | None = None
    versions: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``timings.jsonl`` line (every field, ``null`` where not measured), then ``extra``."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CostRecord:
        """Read a stored line; unknown keys go to ``extra``."""
        return cls(**_split(cls, data, ("key", "pipeline", "task", "timing", "examples", "prefill_seconds")))


def as_costs(records: Iterable[CostRecord | Mapping[str, Any]]) -> list[CostRecord]:
    """Typed cost records from typed records or stored lines."""
    return [r if isinstance(r, CostRecord) else CostRecord.from_json(r) for r in records]


def _split(cls: type, data: Mapping[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """The constructor's arguments: the known keys, the rest as ``extra``; a missing required key is named."""
    missing = [k for k in required if k not in data]
    if missing:
        raise TokenpruneError(
            f"a {cls.__name__} line lacks {', '.join(missing)} (it has {', '.join(sorted(data)) or 'nothing'}); "
            "it was not written by tokenprune compare: remove it or rerun the comparison into a fresh folder"
        )
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    return {**known, "extra": {k: v for k, v in data.items() if k not in names}}


SUMMARY_BODY: tuple[str, ...] = ("tasks", "pipelines", "groups", "statistics")
"""The sections of ``summary.json`` after the head's keys, in the order they are written."""

SummaryRow = dict[str, Any]
"""A ranked pipeline's row: the columns of ``summary.csv`` (metrics, intervals, costs, paired tests) and ``tasks``."""


@dataclass
class Summary:
    """What ``summary.json`` holds.

    Attributes:
        head: What the summary is of: ``config`` and ``config_hash`` for ``tokenprune compare``,
            ``source`` and ``runs`` for ``tokenprune report``; written first.
        tasks: Task labels, in config order.
        pipelines: The ranked rows.
        groups: Per task, per pipeline, accuracy per group.
        statistics: :func:`~tokenprune.bench.significance.significance`'s output.
    """

    head: dict[str, Any]
    tasks: list[str]
    pipelines: list[SummaryRow]
    groups: dict[str, dict[str, dict[str, float]]]
    statistics: dict[str, Any]

    @property
    def config_hash(self) -> str | None:
        """The comparison config's hash (``None`` for a ``tokenprune report`` summary)."""
        value = self.head.get("config_hash")
        return None if value is None else str(value)

    def row(self, pipeline: str) -> SummaryRow:
        """The row of ``pipeline``."""
        for row in self.pipelines:
            if row["pipeline"] == pipeline:
                return row
        raise KeyError(f"no pipeline {pipeline!r} in the summary; pipelines: {[r['pipeline'] for r in self.pipelines]}")

    def to_json(self) -> dict[str, Any]:
        """``summary.json``'s content: the head's keys, then the :data:`SUMMARY_BODY` sections in order."""
        return {**self.head, **{key: getattr(self, key) for key in SUMMARY_BODY}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Summary:
        """Read a ``summary.json`` (any version that wrote the four :data:`SUMMARY_BODY` keys)."""
        head = {k: v for k, v in data.items() if k not in SUMMARY_BODY}
        return cls(head, list(data["tasks"]), list(data["pipelines"]), dict(data["groups"]), dict(data["statistics"]))


__all__ = ["METRIC_NAMES", "CostRecord", "ResultRecord", "Summary", "SummaryRow", "as_costs", "as_results"]
