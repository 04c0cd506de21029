"""SynthVQA accuracy of trained ATP weights against FastV and G-Prune at the same average token count.

``python -m tokenprune_atp.evaluate --weights runs/atp/atp.safetensors`` evaluates, on the held-out
SynthVQA split and the bundled mini VLM (or ``--model``):

1. the unpruned model;
2. ATP (one stage per module, hard masks, ``keep: 1.0``), measuring its average visual-token count
   over all decoder layers, ``A``;
3. FastV (at layers 1 and 2) and G-Prune (after the projector and at layer 1) with their keep
   fraction solved so that their average over all layers is ``A`` (the measured averages are
   printed next to each accuracy; a row more than 5% away from ``A`` is marked "not matched").

The average counts, per sample, the visual tokens (newline tokens included) each decoder layer
processes, averaged over the layers, then over the samples: ATP-LLaVA's "Token" column.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import nn

import tokenprune as tp
from tokenprune.engine.stats import RunStats


@dataclass
class PipelineResult:
    """Accuracy and token counts of one pipeline on a sample set."""

    label: str
    accuracy: float
    per_type: dict[str, float]
    avg_tokens: float
    avg_visual_in: float
    std_tokens: float = float("nan")
    per_layer: list[float] = field(default_factory=list)
    tokens_per_type: dict[str, float] = field(default_factory=dict)
    """Average visual tokens over all layers, per question type: does the budget adapt to the question?"""

    def row(self) -> str:
        """One line of the comparison table."""
        types = " ".join(f"{k} {v:.3f}" for k, v in self.per_type.items())
        tokens = f"tokens {self.avg_tokens:7.1f} (sd {self.std_tokens:5.1f}) / {self.avg_visual_in:6.1f}"
        return f"{self.label:<34} {tokens}  acc {self.accuracy:.3f}  {types}"


def average_tokens(
    stats: RunStats, num_layers: int, per_layer: list[list[int]] | None = None
) -> tuple[list[float], list[int]]:
    """Per sample of every prefill: the visual tokens averaged over all decoder layers, and the input count.

    ``per_layer``, if given, receives each sample's visual-token count at every layer.
    """
    averages: list[float] = []
    inputs: list[int] = []
    for fwd in stats.prefills:
        if not fwd.stages:
            continue
        for b in range(fwd.batch_size):
            first = fwd.stages[0].entering[b]
            counts = [first] * num_layers
            for s in fwd.stages:
                k = 0 if s.at == "post_projector" else int(s.at.split()[-1])
                for i in range(k, num_layers):
                    counts[i] = s.leaving[b]
            averages.append(sum(counts) / num_layers)
            inputs.append(first)
            if per_layer is not None:
                per_layer.append(counts)
    return averages, inputs


def predict(model: nn.Module, processor: Any, samples: list[Any], batch_size: int = 50) -> list[str]:
    """The answers, greedy until ``</s>``, as :func:`tokenprune.synth.evaluate.predict` gives them.

    Inside a ``tokenprune.apply`` block the pipeline prunes each prefill; decoding runs on the kept
    tokens' cache.
    """
    from tokenprune.synth.evaluate import predict as synth_predict

    return [answer for answer, _ in synth_predict(model, processor, samples, batch_size=batch_size)]


def run_pipeline(
    model: nn.Module,
    processor: Any,
    samples: list[Any],
    pipeline: Mapping[str, Any] | None,
    label: str,
    batch_size: int = 50,
) -> PipelineResult:
    """Evaluate ``pipeline`` (``None``: unpruned) on SynthVQA ``samples``."""
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    averages: list[float] = []
    inputs: list[int] = []
    layers: list[list[int]] = []
    if pipeline is None:
        preds = predict(model, processor, samples, batch_size)
    else:
        with tp.apply(model, dict(pipeline)) as run:
            preds = predict(model, processor, samples, batch_size)
            averages, inputs = average_tokens(run.stats, num_layers, layers)
    hits: dict[str, list[int]] = {}
    for s, p in zip(samples, preds, strict=True):
        hits.setdefault(s.qa.qtype, []).append(int(p == s.qa.answer))
    per_type = {t: sum(h) / len(h) for t, h in hits.items()}
    accuracy = sum(sum(h) for h in hits.values()) / max(1, len(samples))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    std = (sum((a - mean(averages)) ** 2 for a in averages) / len(averages)) ** 0.5 if averages else float("nan")
    per_layer = [sum(c[i] for c in layers) / len(layers) for i in range(num_layers)] if layers else []
    by_type = tokens_by_type(samples, averages, batch_size)
    return PipelineResult(label, accuracy, per_type, mean(averages), mean(inputs), std, per_layer, by_type)


def tokens_by_type(samples: list[Any], averages: list[float], batch_size: int) -> dict[str, float]:
    """Mean of the per-sample averages per question type; ``averages`` are in prefill order, i.e. the
    order of :func:`tokenprune.synth.evaluate.size_groups` (empty without a pipeline)."""
    from tokenprune.synth.evaluate import size_groups

    if not averages:
        return {}
    order = [i for idx in size_groups(samples, batch_size) for i in idx]
    if len(order) != len(averages):
        raise RuntimeError(f"{len(averages)} prefills recorded for {len(order)} samples")
    groups: dict[str, list[float]] = {}
    for i, tokens in zip(order, averages, strict=True):
        groups.setdefault(samples[i].qa.qtype, []).append(tokens)
    return {t: sum(v) / len(v) for t, v in groups.items()}


def _stage(layer: int | None, reducer: str, keep: float) -> dict[str, Any]:
    at: Any = "post_projector" if layer is None else {"layer": layer}
    return {"at": at, "reducer": reducer, "keep": keep}


def compare(
    weights: str | Path, model: nn.Module, processor: Any, samples: list[Any], batch_size: int = 50
) -> list[PipelineResult]:
    """Unpruned, ATP, then FastV and G-Prune at ATP's measured average (see the module docstring)."""
    from tokenprune_atp import atp_pipeline, load_atp

    load_atp(weights, model)
    num_layers = int(model.config.get_text_config().num_hidden_layers)
    results = [run_pipeline(model, processor, samples, None, "unpruned", batch_size)]
    atp = run_pipeline(model, processor, samples, atp_pipeline(weights), "atp (learned)", batch_size)
    results.append(atp)
    target, n = atp.avg_tokens, atp.avg_visual_in
    for reducer, layer in (("fastv", 1), ("fastv", 2), ("gprune", None), ("gprune", 1)):
        k = 0 if layer is None else layer
        # average = (k N + (L - k) f N) / L  =>  f = (L A / N - k) / (L - k)
        frac = (num_layers * target / n - k) / (num_layers - k)
        label = f"{reducer}@{'post_projector' if layer is None else f'layer {layer}'} keep {frac:.3f}"
        if not 0 < frac <= 1:
            results.append(PipelineResult(label + " (unreachable)", float("nan"), {}, float("nan"), n))
            continue
        pipe = {"name": reducer, "stages": [_stage(layer, reducer, round(frac, 4))]}
        result = run_pipeline(model, processor, samples, pipe, label, batch_size)
        if abs(result.avg_tokens - target) > 0.05 * target:  # e.g. the protected newlines exceed the budget
            result.label += " (not matched)"
        results.append(result)
    return results


def main(
    weights: Annotated[Path, typer.Option(help="ATP weights (atp.safetensors or its directory).")],
    model: Annotated[str, typer.Option(help="VLM directory or hub id; 'bundled' = the shipped mini VLM.")] = "bundled",
    n_per_type: Annotated[int, typer.Option(help="Held-out SynthVQA questions per type.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 50,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """Print the comparison table."""
    from tokenprune.adapters.loading import load_model
    from tokenprune.synth.questions import heldout_split

    torch.set_num_threads(threads)
    vlm, processor = load_model(model)
    samples = heldout_split(n_per_type)
    with torch.no_grad():
        results = compare(weights, vlm, processor, samples, batch_size)
    typer.echo(
        f"SynthVQA held-out, {len(samples)} questions ({n_per_type} per type); tokens = average visual tokens "
        "over all decoder layers / visual tokens in"
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
