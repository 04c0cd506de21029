"""Per-token decode time with tokenprune against the stock model, at keep-all and after a 25% cut.

The model and its one-image prompt are those of ``prefill.py`` (see ``_bench.py``). Each measurement is
one greedy ``generate`` of ``--tokens`` new tokens; a stopping criterion stamps the clock after every
step (synchronising the GPU first), and the sample is the mean time of the steps after the first
(the first step is the prefill). Configurations:

* ``stock``: the stock model on the full prompt;
* ``keep-all``: tokenprune with a post-projector stage that keeps every visual token (the engine maps
  every decoding step's mask and positions, nothing is dropped): against ``stock``, target 2%;
* ``cut 25%``: tokenprune, random keep 25% after the projector;
* ``reference``: the stock model with that many visual tokens (the same kept features) fed as
  ``inputs_embeds``: the equal-length reference of ``cut 25%``, target 3%;
* ``hooks only``: the stock model with no-op forward hooks on the modules tokenprune hooks for a
  post-projector stage (the top model, the multimodal model, the language model; no decoder layer):
  what PyTorch's hook dispatch costs, which tokenprune's own time does not include.

Round-robin over the configurations, medians over the rounds, spreads ``(max - min) / median``, load
averages before and after; ``--write`` refuses (exit 3) when an unpruned configuration spreads more
than ``--max-spread`` (from 5 rounds on, by its interquartile range over the median; see ``_bench.py``).

Run:  python benchmarks/decode.py --threads 1 --repeats 7 --write docs/benchmarks.md   (full size: 5 min on one core)
      python benchmarks/decode.py --quick                                  (a toy model, seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _bench import (
    IMAGE_TOKEN,
    SIZES,
    build_model,
    command,
    guard_name,
    image_features,
    load,
    machine,
    make_inputs,
    markers,
    own_share,
    share_cell,
    unpruned_spread,
    write_or_refuse,
)
from transformers import StoppingCriteria, StoppingCriteriaList

import tokenprune as tp
from tokenprune.cost.measure import Case, Timing, interleaved, paired_ratio
from tokenprune.engine.hooks import HookSet


class StepClock(StoppingCriteria):
    """Stamps the clock after every generation step; never stops generation."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def per_token(model: Any, inputs: dict[str, Any], tokens: int, cuda: bool) -> Callable[[], float]:
    """A call that generates ``tokens`` tokens greedily and returns the mean seconds per decoding step."""

    def call() -> float:
        clock = StepClock(cuda)
        with torch.inference_mode():
            model.generate(
                **inputs,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        s = clock.stamps
        if len(s) < 2:
            raise RuntimeError(f"generate stopped after {len(s)} step(s); --tokens must be at least 2")
        return (s[-1] - s[0]) / (len(s) - 1)

    return call


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
def no_op_hooks(model: Any) -> Iterator[None]:
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
        yield
    finally:
        hooks.remove()


@contextlib.contextmanager
def applied(model: Any, keep: float, manager: Any, sink: list[Any] | None = None) -> Iterator[None]:
    """Install random keep ``keep`` after the projector for one call; record its forwards' statistics in ``sink``."""
    pipeline = {"stages": [{"at": "post_projector", "reducer": "random", "keep": keep}]}
    with tp.apply(model, pipeline, plugins=manager) as run:
        yield
        if sink is not None:
            sink.append(list(run.stats.forwards))


def step_engine_seconds(forwards: list[Any]) -> float:
    """tokenprune's own time per decoding step of one ``generate``, over the steps :class:`StepClock` times.

    The per-token sample spans the forwards after the second (the first stamp follows the first decoding
    step), so those are averaged.
    """
    steps = [f.engine_seconds for f in forwards if f.phase == "decode"][1:]
    return sum(steps) / len(steps) if steps else 0.0


def measure(
    args: argparse.Namespace, model: Any, inputs: dict[str, Any]
) -> tuple[dict[str, Timing], dict[str, Timing], int]:
    """Time the five configurations round-robin; returns the timings, tokenprune's own share of each
    pruned configuration's decoding steps, and the kept visual tokens."""
    sinks: dict[str, list[list[Any]]] = {"keep-all": [], "cut 25%": []}
    manager, cuda = tp.get_plugin_manager(), args.device.startswith("cuda")
    learn: list[Any] = []
    with applied(model, 0.25, manager, learn), torch.inference_mode():
        model(**inputs, use_cache=False, logits_to_keep=1)
    kept = learn[0][0].stages[0].kept[0]
    short = reference_inputs(model, inputs, kept)
    call = per_token(model, inputs, args.tokens, cuda)
    cases = [
        Case("stock", call, self_timed=True),
        Case("keep-all", call, lambda: applied(model, 1.0, manager, sinks["keep-all"]), True),
        Case("cut 25%", call, lambda: applied(model, 0.25, manager, sinks["cut 25%"]), True),
        Case("reference", per_token(model, short, args.tokens, cuda), self_timed=True),
        Case("hooks only", call, lambda: no_op_hooks(model), True),
    ]
    timings = interleaved(cases, rounds=args.repeats, warmup_rounds=1, device=args.device)
    own = {name: own_share(timings[name], [step_engine_seconds(f) for f in sink]) for name, sink in sinks.items()}
    return timings, own, len(kept)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy size, 2 rounds, 8 tokens: seconds")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generate call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--write", type=Path, help="update this markdown file between the section's markers")
    parser.add_argument(
        "--section", default="decode", help="markers <!-- benchmarks:SECTION:begin/end --> (default: decode)"
    )
    parser.add_argument(
        "--max-spread", type=float, default=0.05, help="refuse --write when an unpruned run spreads more (0.05 = 5%%)"
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.tokens = "quick", min(args.repeats, 2), min(args.tokens, 8)
    if args.repeats < 1 or args.tokens < 2:
        parser.error("--repeats must be at least 1 and --tokens at least 2")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, getattr(torch, args.dtype), args.device)
    inputs = make_inputs(model, [(2 * size.tile, 2 * size.tile)], size)
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    before = load()
    t, own, kept = measure(args, model, inputs)
    spread = unpruned_spread([t["stock"], t["keep-all"]])
    rows = [
        ("stock model, full prompt", "stock", "stock", None),
        ("tokenprune, random keep 100% after the projector", "keep-all", "stock", 1.02),
        ("tokenprune, random keep 25% after the projector", "cut 25%", "reference", 1.03),
        (f"reference: stock model, {kept} visual tokens as inputs_embeds", "reference", "stock", None),
        ("stock model with no-op hooks where tokenprune hooks (PyTorch's dispatch)", "hooks only", "stock", None),
    ]
    lines = [
        f"Machine: {machine(args.device, args.dtype)}; load average (1/5/15 min) {before} before, {load()} after.",
        f"Model: size `{args.size}`, LLM hidden {size.hidden}, {size.layers} layers; prompt {visual} visual + "
        f"{inputs['input_ids'].shape[1] - visual} text tokens; {args.tokens} new tokens per generate call.",
        f"Command: `{command('decode.py')}`; {args.repeats} timed rounds, round-robin after a warm-up round; "
        f"medians; the spread column is (max - min) / median. Largest unpruned spread ({guard_name(args.repeats)}, "
        f"the noise guard's statistic): {spread:.1%}, limit {args.max_spread:.1%}.",
        "",
        "| configuration | ms per token | spread | against | ratio (median of per-round ratios) | target "
        "| tokenprune's own time per step, % of the step (range) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, name, against, target in rows:
        ratio = paired_ratio(t[name], t[against]).median
        verdict = "" if target is None else f"at most {target:.2f}: {'met' if ratio <= target else 'missed'}"
        share = share_cell(own[name]) if name in own else ""
        lines.append(
            f"| {label} | {1000 * t[name].median:.3f} | {t[name].relative_spread:.1%} | {against} | {ratio:.4f} | "
            f"{verdict} | {share} |"
        )
    text = "\n".join(lines)
    print(text)
    write_or_refuse(args.write, text, markers(args.section), spread, args.max_spread, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
