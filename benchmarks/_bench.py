"""What the benchmark scripts share: model sizes, the random-weight LLaVA-NeXT, inputs, the machine line,
paired timing with its bootstrap interval, the guard on that interval and writing tables between markers.

The model is a stock ``LlavaNextForConditionalGeneration`` with random weights and a Llama-style language
model. One image of twice the tile size in both directions gives LLaVA-NeXT's full anyres layout (base
view plus a 2x2 high-resolution grid with one newline per row: 2928 visual tokens at tile 336 / patch
14). Sizes:

* ``quick``: a toy (hidden 64), seconds: for the test suite;
* ``small``: hidden 256, 4 layers, tile 112 (336 visual tokens): the CPU run of ``gpu.sh``;
* ``full``: hidden 1024, 8 layers, FFN 2816, a one-layer CLIP of hidden 64 (the vision tower costs
  almost nothing): the CPU benchmark size of docs/benchmarks.md;
* ``7b``: LLaVA-NeXT-7B's language model (hidden 4096, 32 layers, 32 heads, FFN 11008) and its
  CLIP ViT-L/14-336 tower (hidden 1024, 24 layers): for a GPU, in bfloat16.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from tokenprune.cost.measure import Case, Timing, time_call

IMAGE_TOKEN = 32000 - 1


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    ffn: int
    tile: int
    text_tokens: int
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    vision_ffn: int = 128
    patch: int = 14
    vocab: int = 32000


SIZES = {
    "quick": Size(hidden=64, layers=4, heads=4, ffn=128, tile=56, text_tokens=12),
    "small": Size(hidden=256, layers=4, heads=4, ffn=704, tile=112, text_tokens=24),
    "full": Size(hidden=1024, layers=8, heads=16, ffn=2816, tile=336, text_tokens=60),
    "7b": Size(
        hidden=4096,
        layers=32,
        heads=32,
        ffn=11008,
        tile=336,
        text_tokens=60,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_ffn=4096,
    ),
}


def build_model(size: Size, dtype: torch.dtype, device: str = "cpu") -> LlavaNextForConditionalGeneration:
    """A random-weight LLaVA-NeXT of the given size, created in ``dtype`` on ``device`` (sdpa, eval mode)."""
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
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_ffn,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
            image_size=t,
            patch_size=size.patch,
        ),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[t, 2 * t], [2 * t, t], [2 * t, 2 * t], [3 * t, t], [t, 3 * t]],
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in place: a 7B model in float32 first would double the memory
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(
    model: LlavaNextForConditionalGeneration, sizes: Sequence[tuple[int, int]], size: Size
) -> dict[str, Any]:
    """A left-padded batch, one image per sample of the given pixel sizes, then ``text_tokens`` words."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    t, device = size.tile, model.device
    cfg = model.config
    views = [image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, t) for h, w in sizes]
    pixel_values = torch.randn(len(sizes), max(views), 3, t, t, generator=torch.Generator().manual_seed(1))
    pixel_values = pixel_values.to(device=device, dtype=model.dtype)
    image_sizes = torch.tensor(sizes, device=device)
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    counts = [f.shape[0] for f in feats.pooler_output]
    rows = [[1] + [IMAGE_TOKEN] * c + [10 + (j % 1000) for j in range(size.text_tokens)] for c in counts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
    }


def image_features(model: LlavaNextForConditionalGeneration, inputs: dict[str, Any]) -> torch.Tensor:
    """The stock vision tower, projector and anyres packing: ``(visual tokens of the batch, hidden)``."""
    out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return torch.cat(list(out.pooler_output), dim=0)


def load() -> str:
    """The 1-, 5- and 15-minute load averages (``n/a`` where the platform has none)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device: str, dtype: str) -> str:
    """The machine line of a table: device name, cores, torch threads, versions, dtype."""
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {platform.processor() or platform.machine()}"
    return (
        f"{where}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, {dtype}"
    )


def command(script: str) -> str:
    """The command line that reproduces the run (``--write`` and its path left out)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--write":
            skip = not skip
            continue
        if not a.startswith("--write="):
            args.append(a)
    return " ".join(["python", f"benchmarks/{script}", *args])


def markers(section: str) -> tuple[str, str]:
    """The begin and end markers of a section of the benchmarks page."""
    return f"<!-- benchmarks:{section}:begin -->", f"<!-- benchmarks:{section}:end -->"


def own_share(call: Timing, engine_seconds: Sequence[float]) -> Timing:
    """tokenprune's own time as a share of each timed call, round by round.

    ``engine_seconds`` holds one :attr:`~tokenprune.engine.run_stats.ForwardStats.engine_seconds` per call
    of the case (warm-up and earlier calls first); its last ``len(call.samples)`` entries belong to the
    timed rounds. Measured inside the call it divides, the share moves with the machine's speed the way
    the call does, so it holds where a difference of two separately timed calls drowns in noise.

    Raises:
        ValueError: fewer entries than timed rounds.
    """
    rounds = len(call.samples)
    if len(engine_seconds) < rounds:
        raise ValueError(f"{len(engine_seconds)} engine times for {rounds} timed rounds")
    own = engine_seconds[len(engine_seconds) - rounds :]
    return Timing(tuple(e / c for e, c in zip(own, call.samples, strict=True)))


def share_cell(share: Timing) -> str:
    """``median% (min-max%)`` of a per-round share."""
    return f"{share.median:.2%} ({min(share.samples):.2%}-{max(share.samples):.2%})"


@dataclass(frozen=True)
class PairedRatio:
    """The ratio of two configurations timed in adjacent pairs: the median of the per-pair ratios and a
    bootstrap 95% interval of that median.

    Each pair's two calls run next to each other (in alternating order), so a drift of the machine's
    speed between pairs cancels in the ratio; the interval says how well the pairs pin the median down.
    """

    ratios: tuple[float, ...]
    low: float
    high: float

    @classmethod
    def of(cls, ratios: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> PairedRatio:
        """The median of ``ratios`` with its percentile-bootstrap 95% interval (a fixed seed: reproducible).

        Raises:
            ValueError: no ratio.
        """
        if not ratios:
            raise ValueError("a paired ratio needs at least one pair")
        values = torch.tensor(list(ratios), dtype=torch.float64)
        draws = torch.randint(len(ratios), (resamples, len(ratios)), generator=torch.Generator().manual_seed(seed))
        medians = values[draws].quantile(0.5, dim=1)
        low, high = torch.quantile(medians, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return cls(tuple(ratios), low, high)

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def half_width(self) -> float:
        """The interval's larger distance from the median, relative to it (``0.015``: +-1.5%)."""
        m = self.median
        return max(m - self.low, self.high - m) / m

    def cell(self) -> str:
        """``median [low, high]``."""
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def paired_calls(
    first: Case, second: Case, pairs: int, device: str = "cpu", warmup: int = 1
) -> tuple[PairedRatio, Timing, Timing]:
    """Time ``first`` and ``second`` in ``pairs`` adjacent pairs, alternating which runs first (AB, BA, ...).

    Each case's context is entered around its own call (outside the timing); returns the paired ratio
    ``first / second`` and both cases' timings (pair ``i`` of each comes from the same pair).
    """
    a: list[float] = []
    b: list[float] = []
    for i in range(warmup + pairs):
        order = [(first, a), (second, b)] if i % 2 == 0 else [(second, b), (first, a)]
        for case, out in order:
            with case.context():
                seconds = case.call() if case.self_timed else time_call(case.call, warmup=0, repeats=1, device=device)
            if i >= warmup:
                out.append(float(seconds if case.self_timed else seconds.samples[0]))
    ratio = PairedRatio.of([x / y for x, y in zip(a, b, strict=True)])
    return ratio, Timing(tuple(a)), Timing(tuple(b))


def widest(ratios: Sequence[PairedRatio]) -> float:
    """The widest relative half-width among ``ratios``, the statistic the guard reads (0 without any)."""
    return max((r.half_width for r in ratios), default=0.0)


def write_or_refuse(path: Path | None, text: str, markers: tuple[str, str], width: float, max_width: float) -> None:
    """Write ``text`` between ``markers`` in ``path``, unless a guarded ratio's interval is too wide (exit 3).

    The guard reads the paired ratios' bootstrap intervals, not the spread of absolute times: a drift
    of the machine's speed moves both calls of a pair and cancels in their ratio.
    """
    if path is None:
        return
    if width > max_width:
        print(
            f"refusing to write {path}: a guarded ratio's 95% interval reaches +-{width:.1%} of its median, more "
            f"than --max-interval {max_width:.1%} (load now {load()}). Rerun with more pairs (--pairs, or "
            "--generations for decoding), on a quieter machine, or accept a wider interval with a larger "
            "--max-interval.",
            file=sys.stderr,
        )
        raise SystemExit(3)
    write_between_markers(path, text, markers, stamp=time.strftime("%Y-%m-%d"))


def write_between_markers(path: Path, text: str, markers: tuple[str, str], stamp: str) -> None:
    """Replace what lies between the two markers in ``path`` (a file or a section missing is added at the end).

    Raises:
        SystemExit: only one of the two markers is in the file.
    """
    begin, end = markers
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if (begin in old) != (end in old):
        raise SystemExit(f"{path} has only one of the markers {begin} / {end}; restore the other")
    if begin not in old:
        print(f"{path}: adding the section {begin} at the end", file=sys.stderr)
        old = f"{old.rstrip()}\n\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n_Measured {stamp}._\n\n{text}\n{end}{tail}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
