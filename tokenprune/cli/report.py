"""``tokenprune report``: the comparison report of lmms-eval runs, one run per pipeline.

Each argument is the ``--output_path`` folder of one ``lmms-eval --log_samples`` run (``NAME=FOLDER``
to name it; by default its pipeline's name, ``unpruned`` without one). The report is the one
``tokenprune compare`` writes (``summary.csv``, ``summary.json``, ``report.md``, ``pareto.png``):
per-sample scores with 95% intervals, paired differences against the reference run, rank ranges and
tiers, seeds and matched budgets where the runs are named as a sweep names its pipelines
(``fastv-25%``, ``random-25%@seed1``) and carry the bridge's token counts (``costs=`` model arg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tokenprune.bench.records import Summary
from tokenprune.errors import TokenpruneError

WIDTH = 150
"""The least width the summary table is printed at (a log file or a pipe reports 80 columns)."""


def report(
    runs: Annotated[list[str], typer.Argument(help="lmms-eval --output_path folders, each FOLDER or NAME=FOLDER.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the report files.")] = Path("runs/report"),
    reference: Annotated[
        str | None, typer.Option("--reference", help="The run the others are compared with (default: unpruned).")
    ] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="Also compare every run with this one.")] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", help="Per-sample score (default: each task's first metric).")
    ] = None,
    id_field: Annotated[
        str | None, typer.Option("--id-field", help="Document field that identifies it (default: doc_id).")
    ] = None,
    group_field: Annotated[
        str | None, typer.Option("--group-field", help="Document field for the per-group tables.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    resamples: Annotated[int, typer.Option("--resamples", help="Bootstrap resamples.", min=100)] = 2000,
) -> None:
    """Report lmms-eval runs as tokenprune compare does: intervals, paired tests, tiers, matched budgets."""
    try:
        summary = build_report(runs, output, reference, baseline, metric, id_field, group_field, seed, resamples)
    except (TokenpruneError, FileNotFoundError) as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(str(exc), markup=False)
        raise typer.Exit(2) from None
    Console(width=max(WIDTH, Console().width)).print(summary_table(summary, f"tokenprune report ({len(runs)} runs)"))
    typer.echo(f"report: {output / 'report.md'}")


def build_report(
    runs: list[str],
    output: Path,
    reference: str | None = None,
    baseline: str | None = None,
    metric: str | None = None,
    id_field: str | None = None,
    group_field: str | None = None,
    seed: int = 0,
    resamples: int = 2000,
) -> Summary:
    """Read the runs, write the report files into ``output``; returns the summary (``summary.json``'s content)."""
    from tokenprune.bench.config import CompareConfig
    from tokenprune.bench.lmms_logs import UNPRUNED, add_agreement, check_names, read_run
    from tokenprune.bench.report import report_markdown, summarize, write_summary
    from tokenprune.bench.significance import significance

    loaded = []
    for spec in runs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (None, "", spec)
        loaded.append(read_run(Path(folder), name or None, metric, id_field, group_field))
    check_names(loaded)
    names = [r.name for r in loaded]
    reference = reference or (UNPRUNED if UNPRUNED in names else names[0])
    for label, wanted in (("--reference", reference), ("--baseline", baseline)):
        if wanted is not None and wanted not in names:
            raise TokenpruneError(f"{label} {wanted!r} is not one of the runs ({', '.join(names)})")
    add_agreement(loaded, reference)
    records = [r for run in loaded for r in run.records]
    tasks = list(dict.fromkeys(r.task for r in records))
    order = [reference] + [n for n in names if n != reference]
    rows, groups = summarize(records, order, tasks, reference=reference)
    stats = significance(records, rows, tasks, reference, baseline=baseline, seed=seed, resamples=resamples)
    head = {"source": "lmms-eval", "runs": [_describe(r) for r in loaded]}
    header = _header(loaded, reference)
    text = report_markdown(CompareConfig(seed=seed), rows, groups, tasks, stats, header=header)
    return write_summary(output, head, rows, groups, tasks, stats, text)


def _describe(run: Any) -> dict[str, Any]:
    return {"name": run.name, "model": run.model, "folder": str(run.folder), "metrics": run.metrics, "costs": run.costs}


def _header(runs: list[Any], reference: str) -> list[str]:
    lines = ["lmms-eval runs (`--log_samples`), compared with the reference run `" + reference + "`:", ""]
    for run in runs:
        metrics = ", ".join(f"{task}: `{m}`" for task, m in run.metrics.items())
        costs = "token counts and FLOPs from the bridge" if run.costs else "no token counts (costs= not set)"
        lines.append(f"- `{run.name}`: model `{run.model}`, `{run.folder}`; score per sample: {metrics}; {costs}.")
    lines += [
        "",
        "`accuracy` is each task's per-sample score as lmms-eval logged it; `agreement` compares the normalised "
        f"answer with `{reference}`'s (generation tasks). GFLOPs: the language model's prefill (2 x MACs, analytic).",
    ]
    return lines


def summary_table(summary: Summary | dict[str, Any], title: str) -> Table:
    """The ranked pipelines of a summary (or a ``summary.json``'s content), with intervals and the paired
    difference to the reference."""
    summary = summary if isinstance(summary, Summary) else Summary.from_json(summary)
    table = Table(title=title)
    heads = (
        "rank",
        "pipeline",
        "rank range",
        "accuracy [95%]",
        "vs ref (p)",
        "agreement",
        "GFLOPs",
        "reduction",
        "visual tokens",
        "prefill ms",
    )
    for column in heads:
        table.add_column(column, no_wrap=column in ("pipeline", "accuracy [95%]", "vs ref (p)"))
    for row in summary.pipelines:
        table.add_row(
            str(row["rank"]),
            row["pipeline"],
            str(row.get("rank_range", "-")),
            _with_interval(row, "accuracy"),
            _difference(row),
            _pct(row["agreement"]),
            "-" if row["gflops"] is None else f"{row['gflops']:.4g}",
            _pct(row["flops_reduction"]),
            "-" if row["visual_tokens"] is None else f"{row['visual_tokens']:.1f}",
            _milliseconds(row.get("prefill_ms"), row.get("prefill_ms_spread")),
        )
    return table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _with_interval(row: dict[str, Any], metric: str) -> str:
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if row.get(metric) is None or lo is None or hi is None:
        return _pct(row.get(metric))
    return f"{_pct(row[metric])} [{100 * lo:.1f}-{100 * hi:.1f}]"


def _difference(row: dict[str, Any]) -> str:
    diff, p = row.get("vs_reference"), row.get("vs_reference_p")
    return "-" if diff is None or p is None else f"{100 * diff:+.1f} (p={p:.2g})"


def _milliseconds(median: float | None, spread: float | None) -> str:
    if median is None:
        return "not measured"
    return f"{median:.2f}" if spread is None else f"{median:.2f} (spread {spread:.2f})"


__all__ = ["build_report", "report", "summary_table"]
