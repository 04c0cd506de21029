"""Prefill speed of every built-in reducer at a LLaVA-NeXT-like size, against the FLOPs it saves.

The model is a stock ``LlavaNextForConditionalGeneration`` with random weights: a language model of
hidden 1024, 8 layers, 16 heads, FFN 2816, vocabulary 32000 (Llama-style), and a deliberately tiny
CLIP vision tower (hidden 64, 1 layer) at 336 px / patch 14, so that one 672x672 image gives
LLaVA-NeXT's full anyres layout (base view 24x24, high-resolution grid 48x48 with one newline per
row: 2928 visual tokens) while the vision tower costs almost nothing. 60 text tokens follow.

Measured, for each built-in reducer at keep 50% and 25%, after the projector and at layer 2:

* realized prefill speed-up over the unpruned model divided by the speed-up the analytic FLOPs
  predict (1.0 means the time saved is exactly the FLOPs saved);
* the reducer's own time as a percentage of the unpruned prefill;
* FastV with the sdpa attention probe against FastV with the whole model on eager attention;
* a batch of 8 differently sized images (so the samples keep different counts) against 8 single runs;
* KV-cache bytes after prefill against the unpruned cache, layer by layer.

Run:  python benchmarks/prefill.py --write docs/benchmarks.md     (about 10 minutes on 2 CPU cores)
      python benchmarks/prefill.py --quick                       (a tiny model, seconds: a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

import tokenprune as tp
from tokenprune.cost.analytic import DecoderShape, language_model_macs
from tokenprune.cost.counters import flops_to_macs, torch_flops
from tokenprune.cost.measure import kv_cache_bytes, time_call
from tokenprune.engine import compat

IMAGE_TOKEN = 32000 - 1
BEGIN, END = "<!-- benchmarks:prefill:begin -->", "<!-- benchmarks:prefill:end -->"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    tile: int
    patch: int
    text_tokens: int


FULL = Size(hidden=1024, layers=8, heads=16, ffn=2816, vocab=32000, tile=336, patch=14, text_tokens=60)
QUICK = Size(hidden=64, layers=4, heads=4, ffn=128, vocab=32000, tile=56, patch=14, text_tokens=12)


def build_model(size: Size, dtype: torch.dtype) -> LlavaNextForConditionalGeneration:
    """A random-weight LLaVA-NeXT of the given size (sdpa attention, eval mode)."""
    torch.manual_seed(0)
    t = size.tile
    config = LlavaNextConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=size.hidden,
            intermediate_size=size.ffn,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            vocab_size=size.vocab,
            max_position_embeddings=8192,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=t,
            patch_size=size.patch,
        ),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]],
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    return LlavaNextForConditionalGeneration(config).to(dtype).eval()


def make_inputs(model: LlavaNextForConditionalGeneration, sizes: list[tuple[int, int]], size: Size) -> dict[str, Any]:
    """A left-padded batch, one image per sample of the given pixel sizes, then ``text_tokens`` words."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    t = size.tile
    cfg = model.config
    views = [image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, t) for h, w in sizes]
    pixel_values = torch.randn(len(sizes), max(views), 3, t, t, generator=torch.Generator().manual_seed(1))
    image_sizes = torch.tensor(sizes)
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=pixel_values.to(model.dtype), image_sizes=image_sizes)
    counts = [f.shape[0] for f in feats.pooler_output]
    rows = [[1] + [IMAGE_TOKEN] * c + [10 + (j % 1000) for j in range(size.text_tokens)] for c in counts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixel_values.to(model.dtype),
        "image_sizes": image_sizes,
    }


def prefill(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    with torch.inference_mode():
        return model(**inputs, use_cache=False, logits_to_keep=1)


def lm_macs(shape: DecoderShape, layer_tokens: list[int]) -> int:
    return language_model_macs(shape, layer_tokens, logits_positions=1).total


def pipeline(reducer: str, keep: float, at: str) -> dict[str, Any]:
    where: Any = "post_projector" if at == "post_projector" else {"layer": 2}
    return {"stages": [{"at": where, "reducer": reducer, "keep": keep}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run in seconds")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, help="update this markdown file between the benchmark markers")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(size, dtype)
    t = size.tile
    inputs = make_inputs(model, [(2 * t, 2 * t)], size)
    shape = DecoderShape.from_model(model)
    length = inputs["input_ids"].shape[1]
    visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    timing = lambda fn: time_call(fn, warmup=1, repeats=args.repeats)  # noqa: E731

    vision_count, _ = torch_flops(
        lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    )
    vision = flops_to_macs(vision_count.flops)
    base_time = timing(lambda: prefill(model, inputs))
    base_macs = vision + lm_macs(shape, [length] * shape.num_layers)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {args.dtype}.",
        f"Model: LLM hidden {size.hidden}, {size.layers} layers, FFN {size.ffn}; {visual} visual + {length - visual} "
        f"text tokens. Unpruned prefill: {base_time.median:.3f} s (spread {base_time.spread:.3f} s), "
        f"{2 * base_macs / 1e9:.1f} GFLOPs.",
        f"Command: `python benchmarks/prefill.py{' --quick' if args.quick else ''} --dtype {args.dtype} "
        f"--repeats {args.repeats}{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        "| reducer | at | keep | prefill s | speed-up | FLOPs speed-up | realized / FLOPs | reducer % of unpruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    registry = tp.get_plugin_manager().reducers
    for name in ["random", "l2norm", "downsample", "gprune", "tome", "fastv"]:
        if name not in registry:
            lines.append(f"| {name} | - | - | not installed | | | | |")
            continue
        points = registry.get(name).capabilities.insertion_points
        for at in ("post_projector", "layer"):
            if at not in points:
                continue
            for keep in (0.5, 0.25):
                with tp.apply(model, pipeline(name, keep, at)) as run:
                    t_pruned = timing(lambda: prefill(model, inputs))
                    last = run.stats.last_prefill
                    overhead = sum(s.overhead_macs for s in last.stages)
                    macs = vision + lm_macs(shape, [row[0] for row in last.layer_tokens]) + overhead
                    reducer_s = sorted(f.reducer_seconds for f in run.stats.prefills)[len(run.stats.prefills) // 2]
                speed = base_time.median / t_pruned.median
                ideal = base_macs / macs
                lines.append(
                    f"| {name} | {'post_projector' if at == 'post_projector' else 'layer 2'} | {keep:.0%} | "
                    f"{t_pruned.median:.3f} | {speed:.2f}x | {ideal:.2f}x | {speed / ideal:.2f} | "
                    f"{100 * reducer_s / base_time.median:.2f}% |"
                )
                print(lines[-1], file=sys.stderr, flush=True)

    if "fastv" in registry:
        fastv = pipeline("fastv", 0.25, "layer")
        with tp.apply(model, fastv):
            probe_time = timing(lambda: prefill(model, inputs))
        model.set_attn_implementation("eager")
        try:
            with tp.apply(model, fastv):
                eager_time = timing(lambda: prefill(model, inputs))
        finally:
            model.set_attn_implementation("sdpa")
        lines += [
            "",
            "| FastV at layer 2, keep 25% | prefill s |",
            "|---|---|",
            f"| sdpa with tokenprune's attention probe | {probe_time.median:.3f} |",
            f"| eager attention on the whole model (the usual way) | {eager_time.median:.3f} |",
            f"| probe advantage | {eager_time.median / probe_time.median:.2f}x |",
        ]

    sizes = [(2 * t, 2 * t), (t, 3 * t), (3 * t, t), (2 * t, t), (t, 2 * t), (t, t), (2 * t, 2 * t), (t, 2 * t)]
    batch = make_inputs(model, sizes, size)
    singles = [make_inputs(model, [s], size) for s in sizes]
    quarter = pipeline("random", 0.25, "post_projector")
    with tp.apply(model, quarter) as run:
        batch_time = timing(lambda: prefill(model, batch))
        kept = run.stats.last_prefill.stages[0].leaving
        single_time = sum(timing(lambda s=s: prefill(model, s)).median for s in singles)
    lines += [
        "",
        "| 8 images of 6 sizes, random keep 25% after the projector | seconds |",
        "|---|---|",
        f"| one batch of 8 (kept tokens per sample: {', '.join(map(str, kept))}) | {batch_time.median:.3f} |",
        f"| 8 single runs | {single_time:.3f} |",
        f"| batch throughput gain | {single_time / batch_time.median:.2f}x |",
    ]

    def cache_bytes(pipe: Any) -> tuple[list[int], list[int]]:
        with tp.apply(model, pipe) as run, torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            tokens = [row[0] for row in run.stats.last_prefill.layer_tokens]
        return kv_cache_bytes(compat.output_cache(out)), tokens

    full_bytes, full_tokens = cache_bytes({"stages": []})
    lines += [
        "",
        "| pipeline | KV bytes after prefill (all layers) | / unpruned | tokens kept / unpruned (per layer) |",
        "|---|---|---|---|",
    ]
    for label, pipe in [
        ("unpruned", {"stages": []}),
        ("random 25% post_projector", quarter),
        ("random 25% at layer 2", pipeline("random", 0.25, "layer")),
    ]:
        got, tokens = cache_bytes(pipe)
        per_layer = [g / f for g, f in zip(got, full_bytes, strict=True)]
        token_ratio = [n / m for n, m in zip(tokens, full_tokens, strict=True)]
        if any(abs(a - b) > 1e-12 for a, b in zip(per_layer, token_ratio, strict=True)):
            raise SystemExit(f"KV-cache bytes do not follow the kept tokens: {per_layer} vs {token_ratio}")
        ratios = ", ".join(f"{r:.3f}" for r in token_ratio)
        lines.append(f"| {label} | {sum(got):,} | {sum(got) / sum(full_bytes):.3f} | {ratios} |")

    text = "\n".join(lines)
    print(text)
    if args.write:
        _write_between_markers(args.write, text, stamp=time.strftime("%Y-%m-%d"))


def _write_between_markers(path: Path, text: str, stamp: str) -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END}")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n_Measured {stamp}._\n\n{text}\n{END}{tail}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    main()
