"""Cost of the core's check of every reducer result (``tokenprune.validation.check_reduction``).

The engine validates each stage's selection before using it. The check is vectorised over the
batch: a valid selection costs a constant number of host syncs (two), whatever the batch size;
only an invalid one is walked sample by sample, to name the first defect. This script times the
check of a valid selection at the benchmark size (2928 visual tokens, as LLaVA-NeXT's anyres
layout gives for one 672x672 image) for batches of 1, 8 and 64 samples, with every fourth token
protected (as newline tokens are), and prints a markdown table (median and spread over repeats).

Run:  python benchmarks/validation.py --write docs/benchmarks.md   (seconds)
      python benchmarks/validation.py --quick                      (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tokenprune.reducer import Capabilities, InsertionPoint, ReduceContext, Selection
from tokenprune.validation import check_reduction

BEGIN, END = "<!-- benchmarks:validation:begin -->", "<!-- benchmarks:validation:end -->"
TOKENS = 2928


def valid_case(batch: int, tokens: int, keep: int, seed: int = 0) -> tuple[Selection, torch.Tensor, ReduceContext]:
    """A valid selection of ``keep`` tokens per sample, every fourth token protected and kept."""
    generator = torch.Generator().manual_seed(seed)
    protected = (torch.arange(tokens) % 4 == 3).expand(batch, tokens)
    scores = torch.rand(batch, tokens, generator=generator).masked_fill(protected, 2.0)
    indices = scores.topk(keep, dim=1).indices.sort(dim=1).values
    ctx = ReduceContext(
        at=InsertionPoint("post_projector"),
        budget=torch.full((batch,), keep),
        valid=torch.ones(batch, tokens, dtype=torch.bool),
        protected=protected.clone(),
        sizes=torch.ones(batch, tokens),
    )
    return Selection(indices, torch.full((batch,), keep)), torch.zeros(batch, tokens, 1), ctx


def time_check(batch: int, tokens: int, keep: int, repeats: int) -> list[float]:
    """Seconds of ``check_reduction`` on one valid case, ``repeats`` times (after one warm-up)."""
    selection, features, ctx = valid_case(batch, tokens, keep)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        check_reduction(selection, features, ctx, who="benchmark", capabilities=Capabilities())
        times.append(time.perf_counter() - start)
    return times[1:]


def table(batches: tuple[int, ...], tokens: int, repeats: int) -> str:
    """The markdown table: batch, kept per sample, median and min-max of the check in ms."""
    rows = ["| batch | tokens | kept | median ms | min-max ms | per sample ms |", "|---|---|---|---|---|---|"]
    for batch in batches:
        keep = tokens // 2
        ms = [t * 1e3 for t in time_check(batch, tokens, keep, repeats)]
        median = statistics.median(ms)
        rows.append(
            f"| {batch} | {tokens} | {keep} | {median:.3f} | {min(ms):.3f}-{max(ms):.3f} | {median / batch:.4f} |"
        )
    return "\n".join(rows)


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``path`` (written atomically)."""
    old = path.read_text(encoding="utf-8")
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END}")
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, help="update this markdown file between the validation markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, tokens, repeats = ((1, 4), 64, 3) if args.quick else ((1, 8, 64), TOKENS, args.repeats)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    stamp = (
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} cores (load {load}), "
        f"torch {torch.__version__}, {args.threads} thread(s)"
    )
    text = f"_Measured {stamp}; {repeats} repeats after a warm-up._\n\n{table(batches, tokens, repeats)}"
    print(text)
    if args.write is not None:
        write_between_markers(args.write, text)


if __name__ == "__main__":
    main()
