"""tokenprune's fixed host time per prefill: what the engine's own code takes beyond the reducer's work.

The model and its one-image prompt are those of ``prefill.py`` (see ``_bench.py``). For ``random`` (whose
own work is drawing scores and a top-k) at keep 100% and 25%, after the projector and at layer 2, each
of ``--calls`` prefill calls (after a warm-up call) records, inside the call, tokenprune's time
(``ForwardStats.engine_seconds``: its hooks, layout, stage context, gathers, masks and positions) and the
stage's own time (``StageStats.seconds``: the reducer's ``reduce`` and the check of its result). The fixed
cost is their difference: the part of a prefill that tokenprune adds whatever the reducer. Measured inside
each call, the milliseconds move with the machine's speed (see docs/benchmarks.md, Noise), so the table
gives the median and the range over the calls, and the share of the call.

The pipeline is prepared once and installed around every call (as ``prefill.py`` does); the image's
layout is laid out afresh in the warm-up call only: LLaVA-NeXT keeps the layout of each image size it has
seen (``tokenprune.adapters.llava_next``), so the first call of a size costs 1-2 ms more (the column
``first call``).

``--breakdown`` times, inside the same calls, the engine's parts (the hooks, the stage and its steps, the
per-layer argument cuts), each wrapped with a timer for the run, and times the whole stage again in a warm
loop on the inputs of the last call: where the fixed time goes, and how much of it is the cold caches and fresh
pages a stage meets after the decoder layers' large matrix products (the warm loop has neither).

Run:  python benchmarks/fixed_cost.py --threads 1 --write docs/benchmarks.md   (the `full` size: a minute)
      python benchmarks/fixed_cost.py --threads 1 --breakdown --write docs/benchmarks.md
      python benchmarks/fixed_cost.py --quick                                  (a toy model, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _bench import SIZES, build_model, command, load, machine, make_inputs, markers, write_between_markers

import tokenprune as tp
from tokenprune.adapters.llava_next import forget_layouts

TARGET_MS = 3.0
CONFIGS = [("post_projector", 1.0), ("post_projector", 0.25), ("layer", 1.0), ("layer", 0.25)]


def pipeline(at: str, keep: float) -> dict[str, Any]:
    where: Any = "post_projector" if at == "post_projector" else {"layer": 2}
    return {"stages": [{"at": where, "reducer": "random", "keep": keep}]}


def measure(model: Any, inputs: dict[str, Any], at: str, keep: float, calls: int) -> dict[str, Any]:
    """Per call: ``(call s, engine s, stage s)``; the first (warm-up) call lays the image out afresh."""
    prepared = tp.prepare(pipeline(at, keep))
    forget_layouts()
    rows = []
    for _ in range(1 + calls):
        with tp.apply(model, prepared) as run, torch.inference_mode():
            start = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            seconds = time.perf_counter() - start
        f = run.stats.last_prefill
        rows.append((seconds, f.engine_seconds, sum(s.seconds for s in f.stages)))
    first, timed = rows[0], rows[1:]
    fixed = [e - s for _, e, s in timed]
    return {
        "first": 1000 * (first[1] - first[2]),
        "fixed": fixed,
        "stage": [s for _, _, s in timed],
        "share": [(e - s) / c for c, e, s in timed],
    }


#: The parts ``--breakdown`` times: (module, attribute where the engine looks it up, label), outer parts first.
PARTS = [
    ("tokenprune.engine.forward", "ForwardHooks._vlm_pre", "hook before the VLM's forward (inputs, layout)"),
    ("tokenprune.engine.forward", "ForwardHooks._lm_pre", "hook before the LM (and a post-projector stage)"),
    ("tokenprune.engine.layer_hooks", "LayerHooks._layer_stages", "layer-stage hook (the stage at layer 2)"),
    ("tokenprune.engine.layer_hooks", "run_stage", "the stage: run_stage (reducer included)"),
    ("tokenprune.engine.stage", "stage_context", "- stage_context (visual columns, layout, ReduceContext)"),
    ("tokenprune.engine.stage", "check_reduction", "- check_reduction (the selection's validation)"),
    ("tokenprune.engine.stage", "selection_stats", "- selection_stats (counts and kept indices, 2 host reads)"),
    ("tokenprune.engine.stage", "right_aligned_columns", "- right_aligned_columns (kept columns)"),
    ("tokenprune.engine.sequence", "TokenSequence.gather", "- TokenSequence.gather (the sequence's bookkeeping)"),
    ("tokenprune.engine.stage", "gather_kept_rows", "- gather_kept_rows (the kept hidden states, a copy)"),
    ("tokenprune.engine.layer_hooks", "pruned_layer_call", "per-layer argument cuts, all layers"),
    ("tokenprune.engine.layer_hooks", "record_layer_tokens", "per-layer token counts, all layers"),
]


FIXED = "**tokenprune's fixed time** (all of its time less the stage's own)"
OWN = "the stage's own time (reduce + check)"


@contextlib.contextmanager
def timed_parts(totals: dict[str, float], last: dict[str, Any]) -> Iterator[None]:
    """Wrap each of :data:`PARTS` with a timer adding to ``totals`` (``last["run_stage"]``: its last arguments)."""
    undo = []
    for module_name, attr, label in PARTS:
        owner: Any = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        setattr(owner, name, _timer(original, label, totals, last))
        undo.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


def _timer(fn: Any, label: str, totals: dict[str, float], last: dict[str, Any]) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if fn.__name__ == "run_stage":
            last["run_stage"] = (fn, args, kwargs)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return wrapper


def breakdown(model: Any, inputs: dict[str, Any], at: str, calls: int, loops: int = 50) -> list[str]:
    """Table rows: each part's time inside the call (median over ``calls``), and the stage in a warm loop."""
    prepared = tp.prepare(pipeline(at, 0.25))
    per_call: dict[str, list[float]] = defaultdict(list)
    last: dict[str, Any] = {}
    for i in range(1 + calls):
        totals: dict[str, float] = defaultdict(float)
        with timed_parts(totals, last), tp.apply(model, prepared) as run, torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)
        f = run.stats.last_prefill
        totals[OWN] = sum(s.seconds for s in f.stages)
        totals[FIXED] = f.engine_seconds - totals[OWN]
        for label, seconds in totals.items():
            if i:
                per_call[label].append(seconds)
    fn, args, kwargs = last["run_stage"]
    with torch.inference_mode():
        fn(*args, **kwargs)
        start = time.perf_counter()
        for _ in range(loops):
            fn(*args, **kwargs)
        warm = (time.perf_counter() - start) / loops
    where = "after the projector" if at == "post_projector" else "at layer 2"
    order = [label for *_, label in PARTS] + [FIXED, OWN]
    rows = [f"| {label} | {cell(per_call[label])} | |" for label in order if per_call.get(label)]
    rows.append(f"| the stage again, {loops} times in a warm loop on the last call's inputs | | {1000 * warm:.2f} |")
    return [f"| **random keep 25% {where}** | | |", *rows]


def cell(values: list[float], scale: float = 1000.0, fmt: str = "{:.2f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy size and 3 calls: seconds")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--calls", type=int, default=15, help="timed prefill calls per row (after a warm-up one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write", type=Path, help="update this markdown file between the section's markers")
    parser.add_argument(
        "--section",
        help="markers <!-- benchmarks:SECTION:begin/end --> (default: fixed-cost, or "
        "fixed-cost-breakdown with --breakdown)",
    )
    parser.add_argument("--breakdown", action="store_true", help="where the fixed time goes: the engine's parts, timed")
    args = parser.parse_args()
    if args.quick:
        args.size, args.calls = "quick", min(args.calls, 3)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    args.section = args.section or ("fixed-cost-breakdown" if args.breakdown else "fixed-cost")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, torch.float32)
    inputs = make_inputs(model, [(2 * size.tile, 2 * size.tile)], size)
    before = load()
    if args.breakdown:
        lines = breakdown_table(model, inputs, args, before)
    else:
        lines = fixed_table(model, inputs, args, before)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_between_markers(args.write, text, markers(args.section), time.strftime("%Y-%m-%d %H:%M UTC"))


def breakdown_table(model: Any, inputs: dict[str, Any], args: argparse.Namespace, before: str) -> list[str]:
    lines = [
        f"Machine: {machine('cpu', 'float32')}; load average (1/5/15 min) {before} before.",
        f"Command: `{command('fixed_cost.py')}`; {args.calls} timed prefill calls per configuration after a warm-up "
        "call, each part's time summed within a call; median (range) over the calls. Parts nest: a `-` row is "
        "inside the stage.",
        "",
        "| part | in the call, ms | warm loop, ms |",
        "|---|---|---|",
    ]
    for at in ("post_projector", "layer"):
        lines += breakdown(model, inputs, at, args.calls)
    return lines


def fixed_table(model: Any, inputs: dict[str, Any], args: argparse.Namespace, before: str) -> list[str]:
    lines = [
        f"Machine: {machine('cpu', 'float32')}; load average (1/5/15 min) {before} before.",
        f"Command: `{command('fixed_cost.py')}`; {args.calls} timed prefill calls per row after a warm-up call; "
        "median (range) over the calls.",
        "",
        f"| random | tokenprune's fixed time, ms (target at most {TARGET_MS:.0f}) | first call of an image size, ms "
        "| stage's own time (reduce + check), ms | fixed, % of the call |",
        "|---|---|---|---|---|",
    ]
    for at, keep in CONFIGS:
        m = measure(model, inputs, at, keep, args.calls)
        where = "after the projector" if at == "post_projector" else "at layer 2"
        lines.append(
            f"| keep {keep:.0%} {where} | {cell(m['fixed'])} | {m['first']:.2f} | {cell(m['stage'])} | "
            f"{cell(m['share'], 100.0, '{:.3f}')}% |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
