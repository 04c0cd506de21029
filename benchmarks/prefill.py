"""Prefill time of every built-in reducer against the stock model at equal sequence lengths.

The model (see ``_bench.py``) is a random-weight LLaVA-NeXT; one 672x672 image gives 2928 visual tokens
at the ``full`` size, then text. For each built-in reducer at keep 50% and 25%, after the projector and
at layer 2, the script times tokenprune's prefill (reducer included) and the **equal-length reference**:
the stock model, without tokenprune, doing the same work on sequences of the same lengths per layer.

* post-projector stage: the vision tower and projector run as usual, the kept visual features (the same
  indices the reducer kept) are scattered into the embeddings of the prompt with only that many image
  tokens, and the stock model runs on those ``inputs_embeds``, with the kept tokens' original positions;
* stage at layer k: vision tower, projector and embeddings as usual, then the stock decoder layers
  called in plain PyTorch: layers 0..k-1 on the full sequence, a gather of the kept columns, layers k..
  on those (original positions, causal sdpa), final norm and the head on the last token. The same loop
  without a cut is timed against the stock model, to show what the construction itself costs.

``tokenprune / reference`` is what tokenprune adds over the stock model's own work at those lengths.
Also: keep-all pipelines against the stock model, the speed-up the analytic FLOPs predict, FastV's
sdpa probe against eager attention, the vision probe's cost (FasterVLM against random at the same
kept count), a ragged batch of 8 images against 8 single runs at 1 and 2 threads, and KV-cache bytes
against the kept tokens.

Noise: every ratio of the main tables comes from ``--pairs`` adjacent pairs of single prefill calls,
alternating which runs first (``_bench.paired_calls``): the median of the pair ratios and its
bootstrap 95% interval; a verdict against a target only where the whole interval lies on one side of
it. ``--write`` refuses (exit 3) when a guarded ratio's interval (keep-all and ``random`` rows) reaches
further than ``--max-interval`` from its median. The FastV, vision-probe and batch tables are timed
round-robin over as many rounds.

Run:  python benchmarks/prefill.py --threads 1 --write docs/benchmarks.md   (full size: about an hour on one core)
      python benchmarks/prefill.py --quick                                  (a toy model, seconds)
      benchmarks/gpu.sh                                                      (7B size, bfloat16, on CUDA)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
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
    own_share,
    paired_calls,
    share_cell,
    widest,
    write_or_refuse,
)

import tokenprune as tp
from tokenprune.cost.analytic import DecoderShape, language_model_macs
from tokenprune.cost.counters import flops_to_macs, torch_flops
from tokenprune.cost.measure import Case, Timing, interleaved, kv_cache_bytes, paired_ratio
from tokenprune.engine import compat

REDUCERS = [
    "random",
    "l2norm",
    "downsample",
    "gprune",
    "tome",
    "divprune",
    "cdpruner",
    "fastv",
    "dart",
    "pdrop",
    "sparsevlm",
    "fastervlm",
    "vispruner",
    "visionzip",
]  # not atp: its scorer needs weights trained for the model, and these models have random weights
LAYER = 2


@dataclass
class Bench:
    """The model, its one-image input and what every section needs."""

    model: Any
    inputs: dict[str, Any]
    shape: DecoderShape
    manager: Any
    device: str
    rounds: int
    vision_macs: int
    lines: list[str] = field(default_factory=list)

    def time(self, cases: list[Case]) -> dict[str, Timing]:
        return interleaved(cases, rounds=self.rounds, warmup_rounds=1, device=self.device)

    def case(self, row: Row) -> Case:
        """A prefill call with ``row``'s pipeline installed around it (its statistics go to ``row.sink``)."""
        return Case(row.name, lambda: prefill(self.model, self.inputs), lambda: applied(self, row.pipeline, row.sink))


@dataclass
class Row:
    """One reducer configuration of the main table and what its runs recorded."""

    reducer: str
    at: str
    keep: float
    sink: list[Any] = field(default_factory=list)
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.reducer}@{self.at}@{self.keep}"

    @property
    def pipeline(self) -> dict[str, Any]:
        where: Any = "post_projector" if self.at == "post_projector" else {"layer": LAYER}
        return {"stages": [{"at": where, "reducer": self.reducer, "keep": self.keep}]}


def prefill(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    with torch.inference_mode():
        return model(**inputs, use_cache=False, logits_to_keep=1)


@contextlib.contextmanager
def applied(b: Bench, pipeline: dict[str, Any], sink: list[Any] | None = None) -> Iterator[None]:
    """Install ``pipeline`` for one call; record its prefill's statistics in ``sink``."""
    with tp.apply(b.model, pipeline, plugins=b.manager) as run:
        yield
        if sink is not None:
            sink.append(run.stats.last_prefill)


def kept_columns(b: Bench, kept_visual: list[int]) -> torch.Tensor:
    """Columns of the one-sample prompt that stay: every text token and the kept visual ones."""
    ids = b.inputs["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten()
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[visual] = False
    keep[visual[torch.tensor(kept_visual, device=ids.device)]] = True
    return keep.nonzero().flatten()


def post_projector_reference(b: Bench, kept_visual: list[int]) -> Callable[[], Any]:
    """The stock model on the prompt with only the kept image tokens, their features as ``inputs_embeds``."""
    cols = kept_columns(b, kept_visual)
    ids = b.inputs["input_ids"][:, cols]
    positions, mask = cols.unsqueeze(0), torch.ones_like(ids)
    index = torch.tensor(kept_visual, device=ids.device)
    model = b.model

    def call() -> Any:
        with torch.inference_mode():
            feats = image_features(model, b.inputs)[index]
            embeds = model.get_input_embeddings()(ids)
            embeds = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1), feats.to(embeds.dtype))
            return model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
            )

    return call


def layer_reference(b: Bench, k: int, kept_visual: list[int] | None) -> Callable[[], Any]:
    """Stock decoder layers in plain PyTorch: 0..k-1 on the full sequence, k.. on the kept columns."""
    ids = b.inputs["input_ids"]
    cols = kept_columns(b, kept_visual) if kept_visual is not None else None
    model = b.model
    lm = model.model.language_model

    def run(h: torch.Tensor, pos: torch.Tensor, layers: Any) -> torch.Tensor:
        pe = lm.rotary_emb(h, pos)
        for layer in layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def call() -> Any:
        with torch.inference_mode():
            feats = image_features(model, b.inputs)
            embeds = model.get_input_embeddings()(ids)
            h = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1), feats.to(embeds.dtype))
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            h = run(h, pos, lm.layers[:k])
            if cols is not None:
                h, pos = h[:, cols], pos[:, cols]
                h = run(h, pos, lm.layers[k:])
            return model.lm_head(lm.norm(h[:, -1:]))

    return call


def lm_macs(b: Bench, layer_tokens: list[int]) -> int:
    return language_model_macs(b.shape, layer_tokens, logits_positions=1).total


def main_rows(b: Bench, names: list[str]) -> list[Row]:
    """The reducer configurations that this install offers, each run once to learn what it keeps."""
    registry = b.manager.reducers
    rows = []
    for name in names:
        if name not in registry:
            b.lines += [f"_{name}: not installed._", ""]
            continue
        points = registry.get(name).capabilities.insertion_points
        for at in ("post_projector", "layer"):
            for keep in (0.5, 0.25) if at in points else ():
                row = Row(name, at, keep)
                try:
                    with applied(b, row.pipeline, row.sink):
                        prefill(b.model, b.inputs)
                except Exception as exc:
                    row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
    return rows


def refs_case(b: Bench, row: Row, refs: dict[tuple[Any, ...], Case]) -> Case:
    """The equal-length reference case of ``row`` (shared by rows with equal lengths)."""
    stage = row.sink[0].stages[0]
    key = (row.at, tuple(stage.leaving))
    if key not in refs:
        name = f"reference {row.at} {stage.leaving[0]}"
        if row.at == "post_projector":
            refs[key] = Case(name, post_projector_reference(b, stage.kept[0]))
        else:
            refs[key] = Case(name, layer_reference(b, LAYER, stage.kept[0]))
    return refs[key]


KEEP_ALL_TARGET = 1.01
CUT_TARGET = 1.02


def verdict(ratio: PairedRatio, target: float) -> str:
    """``met`` / ``missed`` when the whole interval lies on one side of ``target``, else ``undecided``."""
    if ratio.high <= target:
        return f"at most {target:.2f}: met"
    if ratio.low > target:
        return f"at most {target:.2f}: missed"
    return f"at most {target:.2f}: undecided"


def main_table(b: Bench, names: list[str]) -> list[PairedRatio]:
    """Keep-all against the stock model and every reducer row against its equal-length reference, each
    pair of configurations timed in adjacent pairs of calls; returns the guarded ratios."""
    stock = Case("stock", lambda: prefill(b.model, b.inputs))
    keep_all = {at: Row("random", at, 1.0) for at in ("post_projector", "layer")}  # nothing dropped
    loop = Case("plain-loop reference, no cut", layer_reference(b, b.shape.num_layers, None))
    rows = main_rows(b, names)
    refs: dict[tuple[Any, ...], Case] = {}
    head = [
        ("tokenprune, random keep 100% after the projector", keep_all["post_projector"]),
        (f"tokenprune, random keep 100% at layer {LAYER}", keep_all["layer"]),
    ]
    b.lines += [
        "| stock model, or tokenprune keeping everything | prefill s | / stock: median [95% interval] | target "
        "| tokenprune's own time, % of the call (range) |",
        "|---|---|---|---|---|",
    ]
    guarded, base = [], None
    for label, row in head:
        ratio, t, base = paired_calls(b.case(row), stock, b.rounds, b.device)
        guarded.append(ratio)
        own = share_cell(own_share(t, [f.engine_seconds for f in row.sink]))
        b.lines.append(f"| {label} | {t.median:.4f} | {ratio.cell()} | {verdict(ratio, KEEP_ALL_TARGET)} | {own} |")
    ratio, t, _ = paired_calls(loop, stock, b.rounds, b.device)
    b.lines.append(
        f"| plain-loop reference without a cut (the layer-stage construction) | {t.median:.4f} | {ratio.cell()} | | |"
    )
    b.lines.append(f"| stock model | {base.median:.4f} | 1 | | |")
    b.lines += ["", *reducer_table(b, rows, refs, base, guarded)]
    return guarded


def reducer_table(
    b: Bench, rows: list[Row], refs: dict[tuple[Any, ...], Case], base: Timing, guarded: list[PairedRatio]
) -> list[str]:
    """The main table: one line per reducer configuration, timed in pairs with its equal-length reference
    (``random``'s rows join the guarded ratios: they carry the 1.02 target)."""
    length = b.inputs["input_ids"].shape[1]
    base_macs = b.vision_macs + lm_macs(b, [length] * b.shape.num_layers)
    lines = [
        "| reducer | at | keep | visual kept | prefill s | speed-up | FLOPs speed-up | realized / FLOPs "
        "| reducer % of unpruned | reference s | tokenprune / reference: median [95% interval] | target "
        "| tokenprune's own time, % of the call (range) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = "post_projector" if r.at == "post_projector" else f"layer {LAYER}"
        if r.error:
            lines.append(f"| {r.reducer} | {where} | {r.keep:.0%} | failed: {r.error} | | | | | | | | | |")
            continue
        ratio, t, ref = paired_calls(b.case(r), refs_case(b, r, refs), b.rounds, b.device)
        if r.reducer == "random":
            guarded.append(ratio)
        last = r.sink[-1]
        macs = b.vision_macs + lm_macs(b, [row[0] for row in last.layer_tokens])
        macs += sum(s.overhead_macs for s in last.stages)
        speed, ideal = base.median / t.median, base_macs / macs
        reducer_s = statistics.median(f.reducer_seconds for f in r.sink)
        target = CUT_TARGET if r.reducer == "random" else 1.03
        lines.append(
            f"| {r.reducer} | {where} | {r.keep:.0%} | {last.stages[0].leaving[0]} | {t.median:.4f} | "
            f"{speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} | {100 * reducer_s / base.median:.2f}% | "
            f"{ref.median:.4f} | {ratio.cell()} | {verdict(ratio, target)} | "
            f"{share_cell(own_share(t, [f.engine_seconds for f in r.sink]))} |"
        )
    return lines


@contextlib.contextmanager
def eager(b: Bench, pipeline: dict[str, Any]) -> Iterator[None]:
    b.model.set_attn_implementation("eager")
    try:
        with applied(b, pipeline):
            yield
    finally:
        b.model.set_attn_implementation("sdpa")


def fastv_table(b: Bench) -> None:
    """FastV with tokenprune's sdpa probe against FastV with eager attention on the whole model."""
    if "fastv" not in b.manager.reducers:
        return
    pipe = Row("fastv", "layer", 0.25).pipeline
    call = lambda: prefill(b.model, b.inputs)  # noqa: E731
    t = b.time([Case("probe", call, lambda: applied(b, pipe)), Case("eager", call, lambda: eager(b, pipe))])
    b.lines += [
        "",
        f"| FastV at layer {LAYER}, keep 25% | prefill s | spread |",
        "|---|---|---|",
        f"| sdpa with tokenprune's attention probe | {t['probe'].median:.4f} | {t['probe'].relative_spread:.1%} |",
        f"| eager attention on the whole model (the usual way) | {t['eager'].median:.4f} | "
        f"{t['eager'].relative_spread:.1%} |",
        f"| probe advantage (median of per-round ratios) | {paired_ratio(t['eager'], t['probe']).median:.2f}x | |",
    ]


def vision_probe_table(b: Bench) -> None:
    """The vision probe's cost: FasterVLM ([CLS] attention from the probe) against random at the same kept count.

    Both keep 50% after the projector, so the language model does the same work; the difference, less
    the two reducers' own time, is the probe, as a share of the stock prefill.
    """
    if "fastervlm" not in b.manager.reducers:
        return
    rows = {name: Row(name, "post_projector", 0.5) for name in ("random", "fastervlm")}
    call = lambda: prefill(b.model, b.inputs)  # noqa: E731
    t = b.time(
        [Case("stock", call)] + [Case(n, call, lambda r=r: applied(b, r.pipeline, r.sink)) for n, r in rows.items()]
    )
    stock, probe, plain = t["stock"], t["fastervlm"], t["random"]
    own = {n: statistics.median(f.reducer_seconds for f in r.sink) for n, r in rows.items()}
    difference = statistics.median(p - q for p, q in zip(probe.samples, plain.samples, strict=True))
    extra = difference - (own["fastervlm"] - own["random"])  # what is left once the two rankings are taken out
    b.lines += [
        "",
        "| vision probe, keep 50% after the projector | prefill s | spread |",
        "|---|---|---|",
        f"| random (no probe) | {plain.median:.4f} | {plain.relative_spread:.1%} |",
        f"| fastervlm ([CLS] attention from the vision probe) | {probe.median:.4f} | {probe.relative_spread:.1%} |",
        f"| probe cost: the median per-round difference less the two rankings' own time, % of the stock "
        f"prefill (target at most 3%) | {100 * extra / stock.median:.2f}% | |",
        f"| fastervlm's own ranking, % of the stock prefill | {100 * own['fastervlm'] / stock.median:.2f}% | |",
    ]


@contextlib.contextmanager
def threads(n: int | None, inner: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        with inner():
            yield
    finally:
        torch.set_num_threads(previous)


def batch_table(b: Bench, size: Any) -> None:
    """A ragged batch of 8 images of 6 sizes against 8 single runs, random keep 25% after the projector."""
    t = size.tile
    sizes = [(2 * t, 2 * t), (t, 3 * t), (3 * t, t), (2 * t, t), (t, 2 * t), (t, t), (2 * t, 2 * t), (t, 2 * t)]
    batch = make_inputs(b.model, sizes, size)
    singles = [make_inputs(b.model, [s], size) for s in sizes]
    pipe, sink = Row("random", "post_projector", 0.25).pipeline, []
    counts = [1, 2] if b.device == "cpu" else [None]
    cases = []
    for n in counts:
        cases.append(
            Case(f"batch {n}", lambda: prefill(b.model, batch), lambda n=n: threads(n, lambda: applied(b, pipe, sink)))
        )
        cases.append(
            Case(
                f"singles {n}",
                lambda: [prefill(b.model, s) for s in singles],
                lambda n=n: threads(n, lambda: applied(b, pipe)),
            )
        )
    timings = b.time(cases)
    last = sink[-1]
    b.lines += [
        "",
        f"Kept tokens per sample: {', '.join(map(str, last.stages[0].leaving))} (padded width "
        f"{batch['input_ids'].shape[1]} before the cut, {last.layer_width[0]} after it).",
        "",
        "| 8 images of 6 sizes, random keep 25% after the projector | threads | batch s | 8 singles s | batch gain |",
        "|---|---|---|---|---|",
    ]
    for n in counts:
        bt, st = timings[f"batch {n}"], timings[f"singles {n}"]
        b.lines.append(
            f"| one batch of 8 against 8 single runs | {n or torch.get_num_threads()} | {bt.median:.4f} "
            f"({bt.relative_spread:.0%}) | {st.median:.4f} ({st.relative_spread:.0%}) | "
            f"{paired_ratio(st, bt).median:.2f}x |"
        )


def cache_table(b: Bench) -> None:
    """KV-cache bytes after prefill must follow the kept tokens, layer by layer (the script fails otherwise)."""

    def cache_bytes(pipe: Any) -> tuple[list[int], list[int]]:
        with tp.apply(b.model, pipe, plugins=b.manager) as run, torch.inference_mode():
            out = b.model(**b.inputs, use_cache=True, logits_to_keep=1)
            tokens = [row[0] for row in run.stats.last_prefill.layer_tokens]
        return kv_cache_bytes(compat.output_cache(out)), tokens

    full_bytes, full_tokens = cache_bytes({"stages": []})
    b.lines += [
        "",
        "| pipeline | KV bytes after prefill (all layers) | / unpruned | tokens kept / unpruned (per layer) |",
        "|---|---|---|---|",
    ]
    for label, pipe in [
        ("unpruned", {"stages": []}),
        ("random 25% post_projector", Row("random", "post_projector", 0.25).pipeline),
        (f"random 25% at layer {LAYER}", Row("random", "layer", 0.25).pipeline),
    ]:
        got, tokens = cache_bytes(pipe)
        per_layer = [g / f for g, f in zip(got, full_bytes, strict=True)]
        token_ratio = [n / m for n, m in zip(tokens, full_tokens, strict=True)]
        if any(abs(x - y) > 1e-12 for x, y in zip(per_layer, token_ratio, strict=True)):
            raise SystemExit(f"KV-cache bytes do not follow the kept tokens: {per_layer} vs {token_ratio}")
        ratios = ", ".join(f"{r:.3f}" for r in token_ratio)
        b.lines.append(f"| {label} | {sum(got):,} | {sum(got) / sum(full_bytes):.3f} | {ratios} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy size and 2 rounds: a smoke run in seconds")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument(
        "--pairs",
        "--repeats",
        dest="repeats",
        type=int,
        default=9,
        help="timed pairs of calls per ratio (after one warm-up pair); rounds of the other tables",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--reducers", default=",".join(REDUCERS), help="comma-separated reducer names")
    parser.add_argument(
        "--main-only",
        action="store_true",
        help="only the keep-all and reducer tables (no FastV, vision-probe, batch and KV-cache tables)",
    )
    parser.add_argument("--write", type=Path, help="update this markdown file between the section's markers")
    parser.add_argument(
        "--section", default="prefill", help="markers <!-- benchmarks:SECTION:begin/end --> (default: prefill)"
    )
    parser.add_argument(
        "--max-interval",
        type=float,
        default=0.015,
        help="refuse --write when a guarded ratio's 95%% interval reaches further from its median (0.015 = +-1.5%%)",
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = "quick", min(args.repeats, 2)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def setup(args: argparse.Namespace) -> tuple[Bench, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    model = build_model(size, getattr(torch, args.dtype), args.device)
    t = size.tile
    inputs = make_inputs(model, [(2 * t, 2 * t)], size)
    vision, _ = torch_flops(lambda: image_features(model, inputs))
    b = Bench(model, inputs, DecoderShape.from_model(model), tp.get_plugin_manager(), args.device, args.repeats, 0)
    b.vision_macs = flops_to_macs(vision.flops)
    return b, size


def main() -> None:
    args = parse_args()
    b, size = setup(args)
    before = load()
    ids = b.inputs["input_ids"]
    visual = int((ids == IMAGE_TOKEN).sum())
    guarded = main_table(b, [n.strip() for n in args.reducers.split(",") if n.strip()])
    if not args.main_only:
        fastv_table(b)
        vision_probe_table(b)
        batch_table(b, size)
        cache_table(b)
    width = widest(guarded)
    head = [
        f"Machine: {machine(args.device, args.dtype)}; load average (1/5/15 min) {before} before, {load()} after.",
        f"Model: size `{args.size}`, LLM hidden {size.hidden}, {size.layers} layers, FFN {size.ffn}; {visual} visual + "
        f"{ids.shape[1] - visual} text tokens.",
        f"Command: `{command('prefill.py')}`; each ratio from {args.repeats} adjacent pairs of single prefill calls "
        "(alternating which runs first, after a warm-up pair): the median of the pair ratios and its bootstrap 95% "
        "interval; a verdict only where the whole interval lies on one side of the target. Widest guarded interval "
        f"(keep-all and random rows; the noise guard's statistic): +-{width:.1%} of the median, limit "
        f"+-{args.max_interval:.1%}."
        + ("" if args.main_only else f" The FastV, vision-probe and batch tables: {args.repeats} rounds, round-robin."),
        "",
    ]
    text = "\n".join(head + b.lines)
    print(text)
    write_or_refuse(args.write, text, markers(args.section), width, args.max_interval)


if __name__ == "__main__":
    sys.exit(main())
