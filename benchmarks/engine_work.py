"""The work tokenprune adds to a prefill and to a decoding step, counted (not timed): tensor operations and
calls of tokenprune's own Python functions.

Timing a change of a few percent of a step is beyond this host's noise; counting is exact and does not depend
on the machine, so two checkouts of the engine can be compared on the same model and prompt. For each
configuration one greedy generation of 1 token (the prefill) and one of ``1 + --steps`` tokens run under a
dispatch mode that counts ATen operations and a profile hook that counts calls of functions defined in files
under a ``tokenprune`` folder (the core and its plugins); per decoding step is the difference divided by
``--steps``. Configurations: the stock model; keep-all (``random`` keeping 100% after the projector); a 25%
cut after the projector; a 25% cut at ``layer: 2``.

The script uses only the public API (``tp.apply``), so it runs against an older checkout too::

    python benchmarks/engine_work.py                                    # this checkout
    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old python benchmarks/engine_work.py

``--write`` puts the table between the ``engine-work`` markers of a markdown file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from _bench import SIZES, build_model, make_inputs, markers, write_between_markers
from torch.utils._python_dispatch import TorchDispatchMode

import tokenprune as tp

CONFIGS: dict[str, dict[str, Any] | None] = {
    "stock model": None,
    "keep-all after the projector": {"stages": [{"at": "post_projector", "reducer": "random", "keep": 1.0}]},
    "25% after the projector": {"stages": [{"at": "post_projector", "reducer": "random", "keep": 0.25}]},
    "25% at layer 2": {"stages": [{"at": {"layer": 2}, "reducer": "random", "keep": 0.25}]},
}


class _OpCount(TorchDispatchMode):
    """Counts every ATen operation dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _own_calls(counter: list[int]) -> Iterator[None]:
    """Counts calls of Python functions whose file lies under a ``tokenprune`` folder (core and plugins)."""

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and f"{os.sep}tokenprune" in frame.f_code.co_filename:
            counter[0] += 1

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)


def _counts(
    model: Any, inputs: dict[str, Any], tokens: int, installed: Callable[[], AbstractContextManager]
) -> tuple[int, int]:
    """``(ATen operations, tokenprune calls)`` of one greedy generation of ``tokens`` tokens."""
    calls = [0]
    with installed(), torch.inference_mode():
        with _OpCount() as ops, _own_calls(calls):
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return ops.ops, calls[0]


def measure(size: str, steps: int) -> list[tuple[str, int, float, int, float]]:
    """Per configuration: ``(name, prefill ops, ops per step, prefill calls, calls per step)``."""
    torch.manual_seed(0)
    shape = SIZES[size]
    model = build_model(shape, torch.float32)
    inputs = make_inputs(model, [(2 * shape.tile, 2 * shape.tile)], shape)
    rows = []
    for name, pipeline in CONFIGS.items():

        def installed(pipeline: dict[str, Any] | None = pipeline) -> AbstractContextManager:
            return nullcontext() if pipeline is None else tp.apply(model, pipeline)

        _counts(model, inputs, 1, installed)  # warm-up: lazy imports and caches outside the count
        ops1, calls1 = _counts(model, inputs, 1, installed)
        ops, calls = _counts(model, inputs, 1 + steps, installed)
        rows.append((name, ops1, (ops - ops1) / steps, calls1, (calls - calls1) / steps))
    return rows


def table(rows: list[tuple[str, int, float, int, float]], size: str, steps: int) -> str:
    engine = Path(tp.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(engine), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    lines = [
        f"Checkout `{head.stdout.strip() or engine}`, size `{size}`, {steps} decoding steps; "
        f"command: `python benchmarks/engine_work.py --size {size} --steps {steps}`.",
        "",
        "| configuration | ATen ops, prefill | ATen ops per step | tokenprune calls, prefill "
        "| tokenprune calls per step |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {a} | {b:g} | {c} | {d:g} |" for n, a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--quick", action="store_true", help="the quick size and 2 steps (for the test suite)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write", type=Path, help="markdown file to write the table into (between markers)")
    parser.add_argument("--section", default="engine-work")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps = "quick", 2
    text = table(measure(args.size, args.steps), args.size, args.steps)
    print(text)
    if args.write:
        write_between_markers(args.write, text, markers(args.section), time.strftime("%Y-%m-%d") + ", counted")


if __name__ == "__main__":
    main()
