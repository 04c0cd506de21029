"""Host reads of tensor data (syncs on a GPU) and own time of every built-in reducer, per stage.

The model and its one-image prompt are those of ``prefill.py`` (see ``_bench.py``). For each built-in
reducer at each insertion point it supports (keep 25%; ``layer: 2`` for layer stages), one greedy
generation of ``--tokens`` tokens runs under :class:`tokenprune.testing.SyncCounter` and the table
gives tokenprune's host reads: in the stage (for a layer stage: in decoder layer 1, whose forward hook
runs it; after the projector: the prefill's reads outside the decoder layers less those of a prefill
whose only stage is a layer stage), in the prefill outside the stages, in the most-reading decoder
layer that holds no stage, and in the most-reading decoding step. Counting is exact and does not
depend on the machine.

Beside them, the reducer's own time (``StageStats.seconds``: its ``reduce`` and the result check) as a
share of the stock model's prefill, both timed round-robin without the counter (``--repeats`` rounds,
medians): a timing, so the header gives the load it ran under.

Run:  python benchmarks/syncs.py --write docs/benchmarks.md     (the `full` size: a few minutes on one core)
      python benchmarks/syncs.py --quick                         (a toy model, seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _bench import SIZES, build_model, command, load, machine, make_inputs, markers, write_between_markers

import tokenprune as tp
from tokenprune.adapters.llava_next import forget_layouts
from tokenprune.cost.measure import Case, interleaved
from tokenprune.testing import SyncCounter

LAYER = 2
KEEP = 0.25


def pipeline(name: str, at: str, params: dict[str, Any]) -> dict[str, Any]:
    where: Any = "post_projector" if at == "post_projector" else {at: LAYER}
    return {"stages": [{"at": where, "reducer": name, "keep": KEEP, "params": params}]}


def count(model: Any, inputs: dict[str, Any], pipe: dict[str, Any], tokens: int) -> SyncCounter:
    """tokenprune's host reads in one greedy generation under ``pipe`` (images laid out afresh: the worst case)."""
    forget_layouts()
    with tp.apply(model, pipe), SyncCounter(model) as syncs, torch.inference_mode():
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return syncs


def reads(syncs: SyncCounter, at: str, fixed: int) -> tuple[int, int, int, int]:
    """``(stage, prefill outside stages, most in a layer without a stage, most in a decoding step)``."""
    per_layer = syncs.per_layer(owner="tokenprune", phase="prefill")
    host = LAYER - 1 if at == "layer" else None
    layers = max((n for layer, n in per_layer.items() if layer not in (None, host)), default=0)
    steps = syncs.per_forward(owner="tokenprune", phase="decode")
    if at == "decode":  # a decode stage runs in every step
        return max(steps.values(), default=0), per_layer[None], layers, max(steps.values(), default=0)
    stage = per_layer[host] if at == "layer" else per_layer[None] - fixed
    return stage, fixed if at != "layer" else per_layer[None], layers, max(steps.values(), default=0)


def own_times(model: Any, inputs: dict[str, Any], pipes: dict[str, dict[str, Any]], rounds: int) -> dict[str, float]:
    """Each pipeline's reducer time per prefill over the stock prefill's median (round-robin)."""
    seconds: dict[str, list[float]] = {name: [] for name in pipes}

    def call() -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=False, logits_to_keep=1)

    def installed(name: str) -> Any:
        run = tp.apply(model, pipes[name])

        class Context:
            def __enter__(self) -> None:
                run.__enter__()

            def __exit__(self, *exc: object) -> None:
                seconds[name].append(run.stats.last_prefill.reducer_seconds)
                run.__exit__(*exc)

        return Context()

    cases = [Case("stock", call)] + [Case(n, call, lambda n=n: installed(n)) for n in pipes]
    timings = interleaved(cases, rounds=rounds, warmup_rounds=1)
    stock = timings["stock"].median
    return {name: statistics.median(s[1:]) / stock for name, s in seconds.items()}


def builtins(names: list[str] | None) -> list[tuple[str, str]]:
    registry = tp.get_plugin_manager().reducers
    out = []
    for name in sorted(registry):
        if registry.origin(name).distribution != "tokenprune" or (names and name not in names):
            continue
        points = registry.get(name).capabilities.insertion_points
        out += [(name, at) for at in ("post_projector", "layer", "decode") if at in points]
    return out


def atp_params(model: Any, tmp: Path) -> dict[str, Any]:
    """Random ATP heads for this model (its scorer needs weights trained for the model; these measure cost)."""
    from tokenprune_atp import ATPConfig, ATPWeights

    text = model.config.text_config
    layers = list(range(1, text.num_hidden_layers))
    torch.manual_seed(0)
    weights = ATPWeights(ATPConfig(hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, layers=layers))
    return {"weights": str(weights.save(tmp / "atp"))}


def reducer_params(name: str, model: Any, tmp: Path) -> dict[str, Any]:
    """The params a built-in needs on this model: ATP's heads, and HiPrune's object layer inside the tower."""
    if name == "atp":
        return atp_params(model, tmp)
    if name == "hiprune":  # its default object layer (9, LLaVA's CLIP ViT-L) is deeper than the benchmark tower
        return {"object_layer": max(1, model.config.vision_config.num_hidden_layers // 2)}
    return {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy size, 2 rounds: seconds")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the own-time measurement")
    parser.add_argument("--tokens", type=int, default=3, help="new tokens per counted generation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--reducers", default="", help="comma-separated reducer names (default: every built-in)")
    parser.add_argument("--write", type=Path, help="update this markdown file between the section's markers")
    parser.add_argument("--section", default="syncs", help="markers <!-- benchmarks:SECTION:begin/end -->")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = "quick", min(args.repeats, 2)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, torch.float32)
    inputs = make_inputs(model, [(2 * size.tile, 2 * size.tile)], size)
    before = load()
    rows = builtins([n for n in args.reducers.split(",") if n])
    with tempfile.TemporaryDirectory() as tmp:
        params = {name: reducer_params(name, model, Path(tmp)) for name, _ in rows}
        pipes = {f"{n}@{a}": pipeline(n, a, params[n]) for n, a in rows}
        fixed = count(model, inputs, pipeline("random", "layer", {}), args.tokens).per_layer(
            owner="tokenprune", phase="prefill"
        )[None]
        counted = {key: reads(count(model, inputs, pipes[key], args.tokens), key.split("@")[1], fixed) for key in pipes}
        own = own_times(model, inputs, {k: p for k, p in pipes.items() if not k.endswith("@decode")}, args.repeats)
    lines = [
        f"Machine: {machine('cpu', 'float32')}; load average (1/5/15 min) {before} before, {load()} after.",
        f"Model: size `{args.size}`, LLM hidden {size.hidden}, {size.layers} layers; one image; keep {KEEP:.0%}, "
        f"layer stages at layer {LAYER}; {args.tokens} new tokens.",
        f"Command: `{command('syncs.py')}`; host reads counted by `tokenprune.testing.SyncCounter` (exact); own "
        f"time: the reducer's seconds per prefill over the stock prefill, medians of {args.repeats} rounds.",
        "",
        "| reducer | at | host reads in the stage | in the prefill outside stages | most in a layer without a "
        "stage | most in a decoding step | own time, % of the stock prefill |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (stage, outside, layers, steps) in counted.items():
        name, at = key.split("@")
        where = "post_projector" if at == "post_projector" else f"{at} {LAYER}"
        share = f"{100 * own[key]:.2f}%" if key in own else "(per step)"
        lines.append(f"| {name} | {where} | {stage} | {outside} | {layers} | {steps} | {share} |")
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        write_between_markers(args.write, text, markers(args.section), stamp=time.strftime("%Y-%m-%d"))


if __name__ == "__main__":
    sys.exit(main())
