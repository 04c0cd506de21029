"""``tokenprune run``: answer one prompt about one image with a pipeline applied, and show what it kept.

The command loads a model and its processor with ``from_pretrained`` (a local folder, or a hub id on
a machine that can reach the hub), applies the pipeline with :func:`tokenprune.apply`, generates
greedily, and prints the answer and the token counts per stage and per layer. ``--heatmap OUT.png``
draws the image once per view (LLaVA-NeXT: the base view and the high-resolution grid) with the
visual tokens that survived every stage shown bright and the dropped ones dark.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from PIL import Image

from tokenprune.adapters.loading import build_inputs, load_model
from tokenprune.bench.heatmap import draw_heatmap, surviving_tokens
from tokenprune.engine.stats import ForwardStats
from tokenprune.errors import PluginLoadWarning, TokenpruneError


def run(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder or hub id (a supported VLM).")],
    pipeline: Annotated[Path, typer.Option("--pipeline", "-p", help="Pipeline YAML file.", dir_okay=False)],
    image: Annotated[Path, typer.Option("--image", "-i", help="Image file.", dir_okay=False)],
    prompt: Annotated[str, typer.Option("--prompt", help="The question; an image placeholder is added if missing.")],
    heatmap: Annotated[
        Path | None, typer.Option("--heatmap", help="Draw the kept visual tokens over the image into this PNG.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.", min=1)] = 32,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, ...")] = "cpu",
) -> None:
    """Answer PROMPT about IMAGE with the pipeline applied; print the answer and the token counts."""
    import tokenprune as tp
    from tokenprune.plugins import get_plugin_manager

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    for path, what in ((pipeline, "pipeline"), (image, "image")):
        if not path.is_file():
            typer.echo(f"error: {what} file {str(path)!r} does not exist", err=True)
            raise typer.Exit(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        manager = get_plugin_manager()
    try:
        pipe = tp.load_pipeline(pipeline, registry=manager.reducers)
        vlm, processor = load_model(model, dtype, device)
        with Image.open(image) as picture:
            inputs = build_inputs(processor, picture.convert("RGB"), prompt, device=device, dtype=getattr(torch, dtype))
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
    if heatmap is not None:
        kept = surviving_tokens(prefill)
        if kept is None:
            typer.echo("heatmap: the pipeline ran no stage on this input (no visual tokens?)", err=True)
            return
        layout, mask = kept
        draw_heatmap(Image.open(image).convert("RGB"), layout, mask, heatmap)
        typer.echo(f"heatmap: {heatmap}")


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


def _one(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else str(values)


__all__ = ["run", "token_report"]
