"""Decoding-step time with tokenprune against the stock model, at keep-all and after a 25% cut, from pairs
of single decoding steps.

The model and its one-image prompt are those of ``prefill.py`` (see ``_bench.py``). A tokenprune handle
must stay installed over a whole generation, so two copies of the model (the same weights) decode side
by side: each generation prefills both, then alternates single greedy decoding steps between them
(AB, BA, ...), each step timed alone (the GPU synchronised around it). Each pair of steps gives a ratio;
the table gives the median ratio with its bootstrap 95% interval over every pair of every generation.
Pairs (the tokenprune side against the reference side):

* ``keep-all``: tokenprune with a post-projector stage that keeps every visual token (the engine maps
  every decoding step's mask and positions, nothing is dropped) against the stock model: target 1.01;
* ``cut 25%``: tokenprune, random keep 25% after the projector, against the stock model with that many
  visual tokens (the same kept features) as ``inputs_embeds`` (the equal-length reference): target 1.03;
* ``hooks only``: the stock model with no-op forward hooks on the modules tokenprune hooks for a
  post-projector stage, against the stock model: what PyTorch's hook dispatch costs, which
  tokenprune's own time does not include;
* ``copies``: the stock model against itself: the null check of the pairing (it should read 1).

The two sides swap model copies every generation (an even ``--generations`` gives each copy each side
equally often): a first run with copy A always hooked read 0.974 for the no-op hooks, a difference
between the copies, not a cost.

``--write`` refuses (exit 3) when the keep-all or the cut ratio's interval reaches further than
``--max-interval`` from its median (``_bench.write_or_refuse``).

Run:  python benchmarks/decode.py --threads 1 --write docs/benchmarks.md   (full size: a few minutes on one core)
      python benchmarks/decode.py --quick                                  (a toy model, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _bench import (
    IMAGE_TOKEN,
    SIZES,
    PairedRatio,
    build_model,
    command,
    image_features,
    load,
    machine,
    make_inputs,
    markers,
    share_cell,
    widest,
    write_or_refuse,
)

import tokenprune as tp
from tokenprune.cost.measure import Timing
from tokenprune.engine import compat
from tokenprune.engine.hooks import HookSet


class Decoder:
    """One model copy decoding greedily, one timed step at a time, from a prompt (``input_ids`` or embeddings)."""

    def __init__(self, model: Any, inputs: dict[str, Any], cuda: bool) -> None:
        self.model, self.inputs, self.cuda = model, inputs, cuda
        self.cache_name = compat.cache_argument_name(model.forward)  # `cache` or `past_key_values`
        self.cache: Any = None
        self.mask = self.next = torch.empty(0)

    def start(self) -> None:
        """Prefill the prompt (untimed) and pick the first token."""
        with torch.inference_mode():
            out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        self.cache, self.mask = compat.output_cache(out), self.inputs["attention_mask"]
        self.next = out.logits[:, -1:].argmax(-1)

    def step(self) -> float:
        """One decoding step: the seconds it took."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model(
                input_ids=self.next,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_name: self.cache},
            )
        self._sync()
        seconds = time.perf_counter() - start
        self.cache, self.mask, self.next = compat.output_cache(out), mask, out.logits[:, -1:].argmax(-1)
        return seconds

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Pair:
    """tokenprune (``context`` installed on one copy over each generation) against a reference, step by step.

    ``inputs`` is the prompt of the tokenprune side, ``reference`` the other side's. The two sides swap
    model copies every generation, so whatever differs between the copies (where their weights sit in
    memory) falls on both sides alike.
    """

    name: str
    inputs: dict[str, Any]
    reference: dict[str, Any]
    context: Callable[[Any], contextlib.AbstractContextManager[Any]]
    runs: list[Any] = field(default_factory=list)  # the tokenprune handles of the timed generations


def paired_steps(
    pair: Pair, copies: tuple[Any, Any], steps: int, generations: int, cuda: bool
) -> tuple[PairedRatio, Timing, Timing]:
    """``generations`` timed generations (after a warm-up one) of ``steps`` alternating single steps."""
    a_times: list[float] = []
    b_times: list[float] = []
    for g in range(1 + generations):
        hooked, other = copies[g % 2], copies[1 - g % 2]
        a, b = Decoder(hooked, pair.inputs, cuda), Decoder(other, pair.reference, cuda)
        with pair.context(hooked) as run:
            a.start()
            b.start()
            for i in range(steps):
                first, second = (a, b) if i % 2 == 0 else (b, a)
                t = {first: first.step(), second: second.step()}
                if g:
                    a_times.append(t[a])
                    b_times.append(t[b])
        if g and run is not None:
            pair.runs.append(run)
    ratio = PairedRatio.of([x / y for x, y in zip(a_times, b_times, strict=True)])
    return ratio, Timing(tuple(a_times)), Timing(tuple(b_times))


def own_per_step(pair: Pair, a: Timing) -> Timing | None:
    """tokenprune's own time as a share of each timed step of copy A (its decoding forwards, in order)."""
    if not pair.runs:
        return None
    engine = [f.engine_seconds for run in pair.runs for f in run.stats.forwards if f.phase == "decode"]
    return Timing(tuple(e / s for e, s in zip(engine, a.samples, strict=True)))


def reference_inputs(model: Any, inputs: dict[str, Any], kept_visual: list[int]) -> dict[str, Any]:
    """The prompt with only the kept image tokens, their (stock) features scattered into ``inputs_embeds``."""
    ids = inputs["input_ids"]
    visual = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    keep = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device)
    keep[visual] = False
    keep[visual[torch.tensor(kept_visual, device=ids.device)]] = True
    short = ids[:, keep]
    with torch.inference_mode():
        feats = image_features(model, inputs)[torch.tensor(kept_visual, device=ids.device)]
        embeds = model.get_input_embeddings()(short)
        embeds = embeds.masked_scatter((short == IMAGE_TOKEN).unsqueeze(-1), feats.to(embeds.dtype))
    return {"inputs_embeds": embeds, "attention_mask": torch.ones_like(short)}


@contextlib.contextmanager
def no_op_hooks(model: Any) -> Iterator[Any]:
    """Forward hooks that do nothing, on the modules the engine hooks for a post-projector stage."""
    vlm, lm = model.model, model.model.language_model
    hooks = HookSet()
    pre, post = (lambda m, a, k: None), (lambda m, a, k, o: None)
    hooks.pre(model, pre)
    hooks.post(model, post, always=True)
    hooks.pre(vlm, pre)
    hooks.post(vlm, post)
    hooks.pre(lm, pre)
    try:
        yield None
    finally:
        hooks.remove()


@contextlib.contextmanager
def applied(model: Any, keep: float, manager: Any) -> Iterator[Any]:
    """Random keep ``keep`` after the projector installed on ``model``; yields the handle."""
    pipeline = {"stages": [{"at": "post_projector", "reducer": "random", "keep": keep}]}
    with tp.apply(model, pipeline, plugins=manager) as run:
        yield run


def measure(args: argparse.Namespace, model: Any, inputs: dict[str, Any]) -> tuple[list[tuple[str, Any]], int]:
    """The three pairs, timed one after the other; returns ``(pair, (ratio, a, b, own))`` and the kept tokens."""
    manager, cuda = tp.get_plugin_manager(), args.device.startswith("cuda")
    copies = (model, copy.deepcopy(model))  # the same weights; the sides swap copies every generation
    with applied(model, 0.25, manager) as run, torch.inference_mode():
        model(**inputs, use_cache=False, logits_to_keep=1)
    kept = run.stats.last_prefill.stages[0].kept[0]
    short = reference_inputs(model, inputs, kept)
    pairs = [
        Pair("keep-all", inputs, inputs, lambda m: applied(m, 1.0, manager)),
        Pair("cut 25%", inputs, short, lambda m: applied(m, 0.25, manager)),
        Pair("hooks only", inputs, inputs, no_op_hooks),
        Pair("copies", inputs, inputs, lambda m: contextlib.nullcontext()),
    ]
    out = []
    for pair in pairs:
        ratio, a, b = paired_steps(pair, copies, args.tokens, args.repeats, cuda)
        out.append((pair.name, (ratio, a, b, own_per_step(pair, a))))
    return out, len(kept)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy size, 2 rounds, 8 tokens: seconds")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument(
        "--generations",
        "--repeats",
        dest="repeats",
        type=int,
        default=6,
        help="timed generations per pair (after a warm-up one); the sides swap model copies each generation",
    )
    parser.add_argument("--tokens", type=int, default=32, help="decoding steps per generation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write", type=Path, help="update this markdown file between the section's markers")
    parser.add_argument(
        "--section", default="decode", help="markers <!-- benchmarks:SECTION:begin/end --> (default: decode)"
    )
    parser.add_argument(
        "--max-interval",
        type=float,
        default=0.015,
        help="refuse --write when a guarded ratio's 95%% interval reaches further from its median (0.015 = +-1.5%%)",
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.tokens = "quick", min(args.repeats, 2), min(args.tokens, 6)
    if args.repeats < 1 or args.tokens < 2:
        parser.error("--repeats must be at least 1 and --tokens at least 2")
    return args


TARGETS = {"keep-all": 1.01, "cut 25%": 1.03}
LABELS = {
    "keep-all": ("tokenprune, random keep 100% after the projector", "stock model, full prompt"),
    "cut 25%": ("tokenprune, random keep 25% after the projector", "reference: stock model, {kept} visual tokens"),
    "hooks only": ("stock model with no-op hooks where tokenprune hooks (PyTorch's dispatch)", "stock model"),
    "copies": ("stock model (the pairing's null check: both sides the same)", "stock model"),
}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, getattr(torch, args.dtype), args.device)
    inputs = make_inputs(model, [(2 * size.tile, 2 * size.tile)], size)
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    before = load()
    results, kept = measure(args, model, inputs)
    width = widest([r[0] for name, r in results if name in TARGETS])
    lines = [
        f"Machine: {machine(args.device, args.dtype)}; load average (1/5/15 min) {before} before, {load()} after.",
        f"Model: size `{args.size}`, LLM hidden {size.hidden}, {size.layers} layers; prompt {visual} visual + "
        f"{inputs['input_ids'].shape[1] - visual} text tokens.",
        f"Command: `{command('decode.py')}`; per row {args.repeats} generations (after a warm-up one) of "
        f"{args.tokens} single decoding steps alternating between two copies of the model (the sides swap copies "
        "every generation): the median of the "
        "per-pair ratios and its bootstrap 95% interval; a verdict only where the whole interval lies on one side "
        f"of the target. Widest guarded interval (the noise guard's statistic): +-{width:.1%} of the median, limit "
        f"+-{args.max_interval:.1%}.",
        "",
        "| configuration (side A) | ms per step | against (side B) | ms per step | A / B: median [95% interval] "
        "| target | tokenprune's own time per step, % of the step (range) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (ratio, a, b, own) in results:
        label, against = LABELS[name]
        target = TARGETS.get(name)
        verdict = "" if target is None else _verdict(ratio, target)
        lines.append(
            f"| {label} | {1000 * a.median:.3f} | {against.format(kept=kept)} | {1000 * b.median:.3f} | "
            f"{ratio.cell()} | {verdict} | {share_cell(own) if own is not None else ''} |"
        )
    text = "\n".join(lines)
    print(text)
    write_or_refuse(args.write, text, markers(args.section), width, args.max_interval)


def _verdict(ratio: PairedRatio, target: float) -> str:
    if ratio.high <= target:
        return f"at most {target:.2f}: met"
    return f"at most {target:.2f}: {'missed' if ratio.low > target else 'undecided'}"


if __name__ == "__main__":
    sys.exit(main())
