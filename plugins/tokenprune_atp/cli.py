"""``tokenprune train-atp``: train ATP-LLaVA threshold heads for a VLM (https://arxiv.org/abs/2412.00447).

:func:`train_atp` is a plain typer-annotated function; the plugin adds it to the main command line as the
``train-atp`` command. It can also run alone: ``python -m tokenprune_atp.cli --help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_atp(
    model: Annotated[str, typer.Option("--model", help="VLM directory or hub id; 'bundled' = the shipped mini VLM.")],
    target_tokens: Annotated[
        float, typer.Option("--target-tokens", help="Target average visual-token count over all decoder layers.")
    ],
    task: Annotated[str, typer.Option("--task", help="Training data: synthvqa.")] = "synthvqa",
    layers: Annotated[
        list[int] | None,
        typer.Option("--layers", help="Module layer k (repeatable); default: three layers spread like 4/14/24 of 32."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Run directory: state.pt, log.jsonl, then atp.safetensors + atp.json.")
    ] = Path("runs/atp"),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 600,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate of the ATP heads.")] = 3e-3,
    alpha: Annotated[float, typer.Option(help="Weight of the per-module kept-fraction penalty.")] = 0.05,
    beta: Annotated[float, typer.Option(help="Weight of the relative distance to --target-tokens.")] = 2.0,
    train_llm: Annotated[bool, typer.Option(help="Fine-tune the language model too (default: frozen).")] = False,
    llm_lr: Annotated[float, typer.Option(help="Learning rate of the language model with --train-llm.")] = 2e-5,
    calibration_images: Annotated[
        int, typer.Option(help="Unseen images used to shift θ_r onto the target after training (0: skip).")
    ] = 128,
    seed: Annotated[int, typer.Option(help="Seed of the heads and of the batches.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/state.pt when it exists.")] = True,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train ATP modules on a frozen VLM with soft masks; writes OUT/atp.safetensors and OUT/atp.json.

    Use the result in a pipeline with one stage per module layer:
    ``{at: {layer: k}, reducer: atp, keep: 1.0, params: {weights: OUT/atp.safetensors}}``.
    """
    from tokenprune_atp.trainer import ATPTrainConfig
    from tokenprune_atp.trainer import train_atp as run

    try:
        cfg = ATPTrainConfig(
            model=model,
            target_tokens=target_tokens,
            task=task,
            layers=list(layers) if layers else None,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            alpha=alpha,
            beta=beta,
            train_llm=train_llm,
            llm_lr=llm_lr,
            calibration_images=calibration_images,
            seed=seed,
            threads=threads,
        )
        path = run(cfg, out, resume=resume, progress=progress)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if path is not None:
        from tokenprune_atp.weights import ATPWeights

        module_layers = ATPWeights.load(path).config.layers
        typer.echo(f"wrote {path} and {path.with_name('atp.json')}; modules at layers {module_layers}")


if __name__ == "__main__":
    typer.run(train_atp)
