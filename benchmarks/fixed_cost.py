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

Run:  python benchmarks/fixed_cost.py --threads 1 --write docs/benchmarks.md   (the `full` size: a minute)
      python benchmarks/fixed_cost.py --quick                                  (a toy model, seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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
    parser.add_argument("--section", default="fixed-cost", help="markers <!-- benchmarks:SECTION:begin/end -->")
    args = parser.parse_args()
    if args.quick:
        args.size, args.calls = "quick", min(args.calls, 3)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, torch.float32)
    inputs = make_inputs(model, [(2 * size.tile, 2 * size.tile)], size)
    before = load()
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
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_between_markers(args.write, text, markers(args.section), time.strftime("%Y-%m-%d %H:%M UTC"))


if __name__ == "__main__":
    sys.exit(main())
