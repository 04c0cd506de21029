"""``tokenprune synth``: train, evaluate and inspect the SynthVQA mini VLM.

Mounted as ``tokenprune synth ...`` by the main CLI; also runs as ``python -m tokenprune.synth.cli``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="SynthVQA and the bundled mini VLM.", no_args_is_help=True)


@app.command()
def train(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="Run directory: state.pt, log.jsonl, model/.")],
    steps: Annotated[int, typer.Option(help="Optimiser steps (fixes the LR schedule).")] = 1600,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1.5e-3,
    seed: Annotated[int, typer.Option(help="Seed of the weights and of the data stream.")] = 0,
    aux_weight: Annotated[float, typer.Option(help="Weight of the patch-label loss (0 turns it off).")] = 1.0,
    ground_weight: Annotated[float, typer.Option(help="Weight of the grounding (attention) loss; 0: off.")] = 1.0,
    ground_layer: Annotated[int, typer.Option(help="LM layer whose head 0 the grounding loss trains.")] = 1,
    describe_prob: Annotated[float, typer.Option(help="Share of images with a describe target.")] = 0.5,
    ground_absent: Annotated[
        bool, typer.Option(help="Ground 'is there ...' questions answered no on <s> (tried: hurt colour/position).")
    ] = False,
    exists_head: Annotated[
        int | None, typer.Option(help="Ground 'is there ...' questions on this head: the object, or <s> if absent.")
    ] = None,
    question_weight: Annotated[
        float, typer.Option(help="Weight of the question-content loss ('is there <colour> <kind> ?'); 0: off.")
    ] = 0.0,
    extra_exists: Annotated[int, typer.Option(help="More 'is there ...' questions per training image.")] = 0,
    curriculum_fraction: Annotated[
        float, typer.Option("--curriculum", help="Share of steps spent ramping 1 -> 4 shapes.")
    ] = 0.15,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest on a shared CPU).")] = 1,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (fp32 was faster on the development CPU).")] = False,
    eval_every: Annotated[int, typer.Option(help="Validation every N steps (0: never).")] = 250,
    checkpoint_every: Annotated[int, typer.Option(help="Write state.pt every N steps.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue from run_dir/state.pt if present.")] = True,
    new_stage: Annotated[
        bool, typer.Option(help="On resume, allow a changed recipe (loss and question options): a new stage.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    install: Annotated[
        Path | None, typer.Option(help="Also copy the final model to this directory (e.g. the package's).")
    ] = None,
) -> None:
    """Train the mini VLM from scratch (deterministic for a seed, resumable)."""
    from tokenprune.synth.train import MODEL_DIR, TrainConfig
    from tokenprune.synth.train import train as run_training

    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # each option named after its config field
    cfg = TrainConfig(**{name: value for name, value in ctx.params.items() if name in fields})
    trainer = run_training(cfg, run_dir, resume=resume, progress=progress, new_stage=new_stage)
    if install is not None:
        trainer.export(install)
        typer.echo(f"installed {run_dir / MODEL_DIR} -> {install}")


@app.command("eval")
def eval_cmd(
    model_path: Annotated[
        Path | None, typer.Argument(help="A saved mini VLM; default: the bundled checkpoint.")
    ] = None,
    per_type: Annotated[int, typer.Option(help="Held-out items per question type (200: the full split).")] = 200,
    keep: Annotated[
        float | None, typer.Option(help="Keep a random share of the visual tokens (benchmark self-check).")
    ] = None,
    keep_seed: Annotated[int, typer.Option(help="Seed of the random selection.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON.")] = None,
) -> None:
    """Accuracy per question type on the held-out SynthVQA split."""
    import torch

    from tokenprune.synth import load_bundled, load_model
    from tokenprune.synth.evaluate import evaluate
    from tokenprune.synth.questions import heldout_split

    torch.set_num_threads(threads)
    model, processor = load_bundled() if model_path is None else load_model(model_path)
    result = evaluate(model, processor, heldout_split(per_type), keep_fraction=keep, keep_seed=keep_seed)
    typer.echo(result.table())
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "per_type": result.per_type,
                    "overall": result.overall,
                    "n": result.n,
                    "ended_with_eos_within_4": result.ended_with_eos(within=4),
                    "keep": keep,
                    "keep_seed": keep_seed,
                },
                indent=2,
            )
        )


@app.command()
def background(
    reducers: Annotated[str, typer.Option(help="Comma-separated reducers (each at its sweep insertion point).")] = (
        "random,gprune,fastv,tome,divprune"
    ),
    keep: Annotated[list[float], typer.Option(help="Keep fractions (repeat the option).")] = [0.5, 0.25, 0.1],  # noqa: B006
    per_type: Annotated[int, typer.Option(help="Held-out background questions (200: the full split).")] = 200,
    model_path: Annotated[Path | None, typer.Option("--model", help="A saved mini VLM; default: bundled.")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
    graph: Annotated[bool, typer.Option(help="Also: how connected background tokens are in G-Prune's graph.")] = False,
) -> None:
    """What each reducer keeps of the background, per scene layout (a markdown table)."""
    import torch

    import tokenprune as tp
    from tokenprune.bench.config import CompareConfig, resolve_pipelines
    from tokenprune.synth import load_bundled, load_model
    from tokenprune.synth.background import by_layout, coverage, graph_degrees
    from tokenprune.synth.questions import heldout_split

    torch.set_num_threads(threads)
    model, processor = load_bundled() if model_path is None else load_model(model_path)
    samples = heldout_split(per_type, ("background",))
    names = [r.strip() for r in reducers.split(",") if r.strip()]
    sweep = {"sweep": {"reducers": names, "keep": keep, "seeds": 1}}  # kept tokens per layout: one seed is enough
    config = CompareConfig.model_validate({"pipelines": [sweep]})
    typer.echo(
        "| pipeline | layout | n | accuracy | background share of kept tokens | of the image | "
        "kept background tokens | main colour in the majority |"
    )
    typer.echo("|---|---|---|---|---|---|---|---|")
    for name, pipeline in resolve_pipelines(config, tp.get_plugin_manager().reducers):
        for row in by_layout(coverage(model, processor, samples, None if name == "unpruned" else pipeline)):
            typer.echo(
                f"| {name} | {row.layout} | {row.n} | {row.accuracy:.3f} | {row.kept_share:.3f} | "
                f"{row.image_share:.3f} | {row.kept_background:.1f} | {row.main_majority:.3f} |"
            )
    if graph:
        typer.echo(
            "\n| layout | graphs | background token: share of its graph linked | object token | "
            "background score / object score |"
        )
        typer.echo("|---|---|---|---|---|")
        gprune = tp.get_plugin_manager().reducers.get("gprune")()  # the reducer's own graph, found by name
        for g in graph_degrees(model, processor, samples, gprune.token_graph):
            typer.echo(
                f"| {g.layout} | {g.graphs} | {g.background_degree:.3f} | {g.object_degree:.3f} | "
                f"{g.background_score:.3f} |"
            )


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Argument(help="Where to write PNGs and samples.jsonl.")],
    per_type: Annotated[int, typer.Option(help="Held-out items per question type.")] = 5,
) -> None:
    """Dump held-out samples as PNG images plus a JSONL of questions and answers."""
    from PIL import Image

    from tokenprune.synth.questions import heldout_split
    from tokenprune.synth.scenes import render

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "samples.jsonl", "w") as f:
        for s in heldout_split(per_type):
            name = f"{s.sample_id}.png"
            Image.fromarray(render(s.scene)[0]).save(out_dir / name)
            f.write(
                json.dumps(
                    {
                        "id": str(s.sample_id),
                        "image": name,
                        "group": s.qa.qtype,
                        "question": s.qa.question,
                        "answer": s.qa.answer,
                    }
                )
                + "\n"
            )
    typer.echo(f"wrote {per_type * 6} samples to {out_dir}")


if __name__ == "__main__":
    app()
