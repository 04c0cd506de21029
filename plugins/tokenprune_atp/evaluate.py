"""SynthVQA accuracy of trained ATP weights against FastV and G-Prune at the same average token count.

``python -m tokenprune_atp.evaluate --weights runs/atp/atp.safetensors`` runs, through the comparison
harness (:func:`tokenprune.bench.runner.compare`, results in ``--out``), on the held-out SynthVQA split
and the bundled mini VLM (or ``--model``):

1. the unpruned model and ATP (one stage per module, hard masks, ``keep: 1.0``); the harness records
   ATP's average visual-token count over all decoder layers, ``A`` (its ``visual_tokens``);
2. FastV (at layers 1 and 2) and G-Prune (after the projector and at layer 1) with their keep
   fraction solved so that their average over all layers is ``A``, in a second comparison that reuses
   the first one's results (the measured averages are printed next to each accuracy; a row more than
   5% away from ``A`` is marked "not matched").

The average counts, per sample, the visual tokens (newline tokens included) each decoder layer
processes, averaged over the layers, then over the samples: ATP-LLaVA's "Token" column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import nn

from tokenprune.bench.config import REFERENCE, CompareConfig, TimingConfig
from tokenprune.bench.records import ResultRecord, Summary
from tokenprune.bench.runner import compare as run_comparison
from tokenprune.bench.store import ResultsStore
from tokenprune.plugins import PluginManager

MATCHED = (("fastv", 1), ("fastv", 2), ("gprune", None), ("gprune", 1))
"""The training-free reducers matched to ATP's token count, with their layer (``None``: post_projector)."""


@dataclass
class PipelineResult:
    """Accuracy and token counts of one pipeline on the task, read from the comparison's summary."""

    label: str
    accuracy: float
    per_type: dict[str, float]
    avg_tokens: float
    avg_visual_in: float
    pipeline: str | None = None
    std_tokens: float = float("nan")
    per_layer: list[float] = field(default_factory=list)
    tokens_per_type: dict[str, float] = field(default_factory=dict)
    """Average visual tokens over all layers, per question type: does the budget adapt to the question?"""

    def row(self) -> str:
        """One line of the comparison table."""
        types = " ".join(f"{k} {v:.3f}" for k, v in self.per_type.items())
        tokens = f"tokens {self.avg_tokens:7.1f} (sd {self.std_tokens:5.1f}) / {self.avg_visual_in:6.1f}"
        return f"{self.label:<40} {tokens}  acc {self.accuracy:.3f}  {types}"


def matched_keep(num_layers: int, target: float, visual_in: float, layer: int | None) -> float:
    """The keep fraction of a one-stage pipeline at ``layer`` whose average over all layers is ``target``.

    ``average = (k N + (L - k) f N) / L``, so ``f = (L A / N - k) / (L - k)`` (``k = 0`` after the projector).
    """
    k = 0 if layer is None else layer
    return (num_layers * target / visual_in - k) / (num_layers - k)


def _entry(name: str, stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "stages": stages}


def _config(base: dict[str, Any], pipelines: list[dict[str, Any]]) -> CompareConfig:
    return CompareConfig.model_validate({**base, "pipelines": pipelines})


def _result(summary: Summary, name: str, label: str, visual_in: float) -> PipelineResult:
    row = summary.row(name)
    task = summary.tasks[0]
    per_type = summary.groups.get(task, {}).get(name, {})
    return PipelineResult(label, float(row["accuracy"]), dict(per_type), float(row["visual_tokens"]), visual_in, name)


def token_details(records: list[ResultRecord], reference: list[ResultRecord], result: PipelineResult) -> None:
    """Fill ``result``'s spread, per-layer and per-type token counts from its per-example ``records``.

    A record's ``layer_tokens`` count every token entering each layer; the text tokens of an example are
    those of its unpruned ``reference`` record less that record's visual tokens (unpruned: the same at every
    layer).
    """
    text = {r.id: r.layer_tokens[0] - r.visual_tokens for r in reference if r.layer_tokens and r.visual_tokens}
    mine = [r for r in records if r.visual_tokens is not None and r.id in text and r.layer_tokens]
    if not mine:
        return
    averages = [float(r.visual_tokens or 0.0) for r in mine]
    mean = sum(averages) / len(averages)
    result.std_tokens = (sum((a - mean) ** 2 for a in averages) / len(averages)) ** 0.5
    layers = [[t - text[r.id] for t in r.layer_tokens or []] for r in mine]
    result.per_layer = [sum(c[i] for c in layers) / len(layers) for i in range(len(layers[0]))]
    groups: dict[str, list[float]] = {}
    for r, a in zip(mine, averages, strict=True):
        groups.setdefault(r.group, []).append(a)
    result.tokens_per_type = {g: sum(v) / len(v) for g, v in groups.items()}


def _records(output: str | Path, hashes: set[str | None]) -> dict[str, list[ResultRecord]]:
    """The results of the comparisons whose config hashes are ``hashes``, per pipeline (one per example)."""
    latest: dict[tuple[str, str], ResultRecord] = {}
    for r in ResultsStore(Path(output)).results():
        if r.config in hashes:
            latest[(r.pipeline, r.id)] = r
    out: dict[str, list[ResultRecord]] = {}
    for (pipeline, _), r in latest.items():
        out.setdefault(pipeline, []).append(r)
    return out


def compare(
    weights: str | Path,
    model: nn.Module,
    processor: Any,
    *,
    per_type: int = 100,
    batch_size: int = 50,
    output: str | Path = "runs/atp-eval",
    plugins: PluginManager | None = None,
) -> list[PipelineResult]:
    """Unpruned, ATP, then FastV and G-Prune at ATP's measured average (see the module docstring)."""
    from tokenprune_atp import atp_pipeline, load_atp

    load_atp(weights, model)
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    base = {
        "tasks": [{"name": "synthvqa", "per_type": per_type}],
        "batch_size": batch_size,
        "output": str(output),
        "heatmaps": 0,
        "timing": TimingConfig(warmup=0, repeats=1, memory=False).model_dump(),
    }
    atp = _entry("atp", atp_pipeline(weights)["stages"])
    first = run_comparison(_config(base, [atp]), plugins=plugins, model_and_processor=(model, processor)).summary
    if first is None:  # a non-zero rank of a distributed run
        return []
    visual_in = float(first.row(REFERENCE)["visual_tokens"])
    results = [_result(first, REFERENCE, "unpruned", visual_in), _result(first, "atp", "atp (learned)", visual_in)]
    target = results[1].avg_tokens
    labels: dict[str, str] = {}
    entries = [atp]
    second = None
    for reducer, layer in MATCHED:
        frac = matched_keep(num_layers, target, visual_in, layer)
        label = f"{reducer}@{'post_projector' if layer is None else f'layer {layer}'} keep {frac:.3f}"
        if not 0 < frac <= 1:
            results.append(PipelineResult(label + " (unreachable)", float("nan"), {}, float("nan"), visual_in))
            continue
        at: Any = "post_projector" if layer is None else {"layer": layer}
        name = f"{reducer}-matched-{'pp' if layer is None else layer}"
        labels[name] = label
        entries.append(_entry(name, [{"at": at, "reducer": reducer, "keep": round(frac, 4)}]))
    if labels:
        second = run_comparison(_config(base, entries), plugins=plugins, model_and_processor=(model, processor))
        for name, label in labels.items():
            result = _result(second.summary, name, label, visual_in)  # type: ignore[union-attr,arg-type]
            if abs(result.avg_tokens - target) > 0.05 * target:  # e.g. the protected newlines exceed the budget
                result.label += " (not matched)"
            results.append(result)
    hashes = {first.config_hash, second.summary.config_hash if labels and second.summary else None}
    records = _records(output, hashes)
    for r in results:
        if r.pipeline is not None:
            token_details(records.get(r.pipeline, []), records.get(REFERENCE, []), r)
    return results


def main(
    weights: Annotated[Path, typer.Option(help="ATP weights (atp.safetensors or its directory).")],
    model: Annotated[str, typer.Option(help="VLM directory or hub id; 'bundled' = the shipped mini VLM.")] = "bundled",
    n_per_type: Annotated[int, typer.Option(help="Held-out SynthVQA questions per type.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 50,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    out: Annotated[Path, typer.Option(help="The comparison's folder (results.jsonl, summary files).")] = Path(
        "runs/atp-eval"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """Print the comparison table."""
    from tokenprune.adapters.loading import load_model

    torch.set_num_threads(threads)
    vlm, processor = load_model(model)
    results = compare(weights, vlm, processor, per_type=n_per_type, batch_size=batch_size, output=out)
    typer.echo(
        f"SynthVQA held-out, {n_per_type} questions per type; tokens = average visual tokens over all decoder "
        f"layers / visual tokens in (the comparison's files: {out})"
    )
    for r in results:
        typer.echo(r.row())
    for r in results:
        if r.per_layer:
            typer.echo(f"per layer, {r.label}: " + ", ".join(f"{c:.1f}" for c in r.per_layer))
        if r.tokens_per_type:
            counts = ", ".join(f"{t} {c:.1f}" for t, c in r.tokens_per_type.items())
            typer.echo(f"tokens per type, {r.label}: {counts}")
    if json_out is not None:
        json_out.write_text(json.dumps([r.__dict__ for r in results], indent=2))


if __name__ == "__main__":
    typer.run(main)
