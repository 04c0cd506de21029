"""``tokenprune run``: answer one prompt about an image or a video with a pipeline applied, and show what it kept.

The command loads a model and its processor with ``from_pretrained`` (a local folder, or a hub id on
a machine that can reach the hub), applies the pipeline with :func:`tokenprune.apply`, generates
greedily, and prints the answer and the token counts per stage and per layer. ``--heatmap OUT.png``
draws the image once per view (LLaVA-NeXT: the base view and the high-resolution grid) with the
visual tokens that survived every stage shown bright and the dropped ones dark; a video is drawn frame
by frame. A decode stage's per-step selections are printed after the prefill's counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from PIL import Image

from tokenprune.adapters.loading import build_inputs, load_frames, load_model
from tokenprune.bench.heatmap import draw_heatmap, surviving_tokens
from tokenprune.engine.run_stats import ForwardStats
from tokenprune.errors import PluginLoadWarning, TokenpruneError


def run(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder or hub id (a supported VLM).")],
    pipeline: Annotated[Path, typer.Option("--pipeline", "-p", help="Pipeline YAML file.", dir_okay=False)],
    prompt: Annotated[str, typer.Option("--prompt", help="The question; an image placeholder is added if missing.")],
    image: Annotated[Path | None, typer.Option("--image", "-i", help="Image file.", dir_okay=False)] = None,
    video: Annotated[
        Path | None,
        typer.Option("--video", help="Video: a folder of frame images, or a GIF / animated WebP / multi-page TIFF."),
    ] = None,
    heatmap: Annotated[
        Path | None,
        typer.Option("--heatmap", help="Draw the kept visual tokens over the image (each video frame) into this PNG."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.", min=1)] = 32,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Answer PROMPT about an IMAGE and/or a VIDEO with the pipeline applied; print the answer and the token counts."""
    import tokenprune as tp
    from tokenprune.plugins import get_plugin_manager

    _check_arguments(dtype, pipeline, image, video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        manager = get_plugin_manager()
    try:
        pipe = tp.prepare(pipeline, plugins=manager)
        frames = load_frames(video) if video is not None else None
        vlm, processor = load_model(model, dtype, device)
        picture = _open(image)
        inputs = build_inputs(processor, picture, prompt, device=device, dtype=getattr(torch, dtype), video=frames)
        with tp.apply(vlm, pipe, plugins=manager) as handle, torch.no_grad():
            out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    except TokenpruneError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    new = out[:, inputs["input_ids"].shape[1] :]
    answer = processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    typer.echo(f"answer: {answer}")
    prefill = handle.stats.last_prefill
    if prefill is None:
        return
    typer.echo(token_report(prefill, int(inputs["input_ids"].shape[1])))
    decode = decode_report(handle.stats.forwards)
    if decode:
        typer.echo(decode)
    if heatmap is not None:
        kept = surviving_tokens(prefill)
        if kept is None:
            typer.echo("heatmap: the pipeline ran no prefill stage on this input (no visual tokens?)", err=True)
            return
        layout, mask = kept
        draw_heatmap(picture, layout, mask, heatmap, frames=[frames] if frames else ())
        typer.echo(f"heatmap: {heatmap}")


def _check_arguments(dtype: str, pipeline: Path, image: Path | None, video: Path | None) -> None:
    """Refuse a bad ``--dtype``, no visual input, or a pipeline or image file that does not exist (exit 2)."""
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if image is None and video is None:
        typer.echo("error: give --image, --video or both", err=True)
        raise typer.Exit(2)
    for path, what in ((pipeline, "pipeline"), (image, "image")):
        if path is not None and not path.is_file():
            typer.echo(f"error: {what} file {str(path)!r} does not exist", err=True)
            raise typer.Exit(2)


def _open(image: Path | None) -> Image.Image | None:
    if image is None:
        return None
    with Image.open(image) as picture:
        return picture.convert("RGB")


def token_report(prefill: ForwardStats, prompt_tokens: int) -> str:
    """Token counts of a prefill: per stage (visual tokens in and out) and per layer."""
    lines = [f"prompt tokens: {prompt_tokens}"]
    for s in prefill.stages:
        lines.append(
            f"stage {s.stage} {s.reducer} at {s.at}: visual tokens {_one(s.entering)} -> {_one(s.leaving)} "
            f"({s.seconds * 1000:.1f} ms)"
        )
    per_layer = ", ".join(_one(t) for t in prefill.layer_tokens)
    lines.append(f"tokens per decoder layer: [{per_layer}]")
    return "\n".join(lines)


def decode_report(forwards: list[ForwardStats]) -> str:
    """A decode stage's visual tokens attended at each decoding step (empty without one)."""
    steps = [s for f in forwards if f.phase == "decode" for s in f.stages]
    if not steps:
        return ""
    first = steps[0]
    attended = ", ".join(_one(s.leaving) for s in steps)
    where = f"stage {first.stage} {first.reducer} at {first.at}"
    return f"{where}: of {_one(first.entering)} visual tokens, attended per step: [{attended}]"


def _one(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else str(values)


__all__ = ["decode_report", "run", "token_report"]
