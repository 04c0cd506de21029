"""The ``tokenprune`` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from tokenprune import __version__
from tokenprune.bench.records import Summary
from tokenprune.cli.check import check as check_command
from tokenprune.cli.report import WIDTH as REPORT_WIDTH
from tokenprune.cli.report import report as report_command
from tokenprune.cli.report import summary_table
from tokenprune.cli.run import run as run_command
from tokenprune.errors import PluginLoadWarning, TokenpruneError
from tokenprune.pipeline import load_pipeline, pipeline_json_schema
from tokenprune.plugins import AdapterRegistry, Collision, PluginManager, ReducerRegistry, get_plugin_manager
from tokenprune.synth.cli import app as synth_app


class _FlagsReadAsFlags(TyperGroup):
    """The root command group: every boolean flag of every command reads as a flag in ``--help``.

    typer 0.29's rich help panel (``rich_utils._print_options_panel``) prints each option's type,
    flags included (``--quiet <bool>``, ``--help <bool>``), where its plain help leaves flags bare.
    An empty metavar makes the panel print nothing there. The group fixes its own options and, as
    a command is looked up (to run it or show its help), that command's and its subcommands' options,
    so commands that plugins add (``tokenprune_add_commands``) read the same.
    """

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        return _bare_flags(super().get_params(ctx))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _bare_flags_everywhere(command, ctx)
        return command


def _bare_flags(params: list[click.Parameter]) -> list[click.Parameter]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _bare_flags_everywhere(command: click.Command, ctx: click.Context) -> None:
    """:func:`_bare_flags` on ``command``'s options (``--help`` included) and on its subcommands'."""
    _bare_flags(command.get_params(ctx))
    for sub in getattr(command, "commands", {}).values():
        _bare_flags_everywhere(sub, ctx)


app = typer.Typer(
    name="tokenprune",
    cls=_FlagsReadAsFlags,
    help="Reduce the visual tokens of vision-language models, and compare the strategies fairly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
EXIT_INVALID = 2
app.command("run")(run_command)
app.command("report")(report_command)
app.command("check")(check_command)
app.add_typer(synth_app, name="synth", help="SynthVQA and the bundled mini VLM: generate, train, evaluate.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tokenprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Reduce the visual tokens of vision-language models, and compare the strategies fairly."""


def _manager() -> PluginManager:
    # Load failures are reported by the commands themselves, not as raw warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        return get_plugin_manager()


def plugins_report(manager: PluginManager) -> dict[str, Any]:
    """What ``tokenprune plugins --json`` prints: every plugin with its reducers and adapters.

    A name that several plugins registered (a collision) is listed under each of them, with
    ``"collision": true`` on reducers, and described under ``collisions`` with every claim.
    """
    reducers, adapters, tasks = manager.reducers, manager.adapters, manager.tasks
    collided = {(c.kind, c.name) for c in manager.collisions}
    plugins = []
    for info in manager.plugins:
        entries = []
        for name in reducers.provided_by(info.name):
            cls = reducers.registered_by(name, info.name)
            entries.append(
                {
                    "name": name,
                    "class": f"{cls.__module__}.{cls.__qualname__}",
                    "summary": (cls.__doc__ or "").strip().split("\n")[0],
                    "capabilities": cls.capabilities.as_dict(),
                    "params": cls.Params.model_json_schema(),
                    "collision": (reducers.kind, name) in collided,
                }
            )
        plugins.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "module": info.module,
                "reducers": entries,
                "adapters": adapters.provided_by(info.name),
                "adapter_notes": {
                    t: adapters.registered_by(t, info.name).notes for t in adapters.provided_by(info.name)
                },
                "tasks": tasks.provided_by(info.name),
                "pipelines": manager.pipelines.provided_by(info.name),
            }
        )
    failures = [
        {"name": f.name, "distribution": f.distribution, "version": f.version, "error": f.error}
        for f in manager.failures
    ]
    collisions = [_collision_report(c) for c in manager.collisions]
    from tokenprune.engine import compat

    transformers = {
        "version": compat.transformers_version(),
        "supported": compat.supported_range(),
        "in_range": compat.is_supported(),
    }
    return {
        "plugins": plugins,
        "presets": _presets_report(manager),
        "failures": failures,
        "collisions": collisions,
        "transformers": transformers,
    }


def _presets_report(manager: PluginManager) -> list[dict[str, Any]]:
    """Every pipeline preset (a colliding name once per plugin), with its paper, table and definition."""
    presets = manager.pipelines
    out = []
    for name in presets:
        claims = presets.claims(name)
        for claim in claims:
            preset = claim.value
            out.append(
                {
                    "name": name,
                    "plugin": claim.origin.name if claim.origin else None,
                    "distribution": claim.origin.distribution if claim.origin else None,
                    "paper": preset.paper,
                    "table": preset.table,
                    "description": preset.description,
                    "definition": preset.definition,
                    "collision": len(claims) > 1,
                }
            )
    return out


def _class_name(value: Any) -> str:
    """``module.Class`` of a registered class, or of a registered object's type (a preset)."""
    kind = value if isinstance(value, type) else type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _collision_report(collision: Collision) -> dict[str, Any]:
    """One entry of ``collisions`` in ``tokenprune plugins --json``: every claim, and the error's text."""
    claims = [
        {
            "plugin": claim.origin.name if claim.origin else None,
            "distribution": claim.origin.distribution if claim.origin else None,
            "version": claim.origin.version if claim.origin else None,
            "class": _class_name(claim.value),
        }
        for claim in collision.claims
    ]
    return {"kind": collision.kind, "name": collision.name, "claims": claims, "message": str(collision.error())}


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    models: Annotated[
        bool,
        typer.Option(
            "--models",
            help="Also list every image-text-to-text model type of the installed transformers: served by a "
            "registered adapter, by the generic one, or refused (and why). Builds each on the meta device.",
        ),
    ] = False,
) -> None:
    """List the installed plugins with their reducers (and capabilities), adapters, tasks and pipeline presets.

    Plugins named in TOKENPRUNE_DISABLE_PLUGINS (comma-separated) are not loaded. A name that two
    plugins register is listed under both and marked as a collision; pipelines that use it fail
    until one of the plugins is disabled, the others work.
    """
    try:
        report = plugins_report(_manager())
    except TokenpruneError as exc:
        _fail(str(exc))
    if models:
        from tokenprune.testing.census import resolve_types

        report["models"] = [dataclasses.asdict(r) for r in resolve_types(manager=_manager())]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    if models:
        console.print(_models_table(report["models"]))
    console.print(_plugins_table(report))
    console.print(_reducers_table(report))
    if report["presets"]:
        console.print(_presets_table(report))
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    for f in report["failures"]:
        dist = f"{f['distribution']} {f['version']}" if f["distribution"] else "no distribution"
        errors.print(f"[red]plugin {f['name']!r} ({dist}) failed to load:[/red] {f['error']}")
    for c in report["collisions"]:
        errors.print("collision: " + c["message"], style="yellow", markup=False)


def _models_table(rows: list[dict[str, Any]]) -> Table:
    """Every image-text-to-text model type of the installed transformers and who serves it."""
    table = Table(title="model types (installed transformers)")
    for column in ("model_type", "served by", "why not"):
        table.add_column(column, overflow="fold")
    for r in rows:
        served = r["adapter"] if r["status"] in ("registered", "generic") else r["status"]
        table.add_row(r["model_type"], served, r["detail"])
    return table


def _collided(report: dict[str, Any], kind: str) -> set[str]:
    return {c["name"] for c in report["collisions"] if c["kind"] == kind}


def _plugins_table(report: dict[str, Any]) -> Table:
    """The plugins, each with its distribution and what it registered; collisions are marked."""
    reducers, adapters = _collided(report, ReducerRegistry.kind), _collided(report, AdapterRegistry.kind)
    mark = lambda name, collided: f"{name} (collision)" if name in collided else name  # noqa: E731
    table = Table(title="tokenprune plugins")
    for column in ("plugin", "distribution", "reducers", "adapters (model_type)"):
        table.add_column(column)
    for p in report["plugins"]:
        dist = f"{p['distribution']} {p['version']}" if p["distribution"] else "(registered directly)"
        table.add_row(
            p["name"],
            dist,
            ", ".join(mark(r["name"], reducers) for r in p["reducers"]) or "-",
            ", ".join(mark(t, adapters) for t in p["adapters"]) or "-",
        )
    return table


def _reducers_table(report: dict[str, Any]) -> Table:
    """Every reducer with its capabilities (a colliding name has a row per plugin)."""
    caps = Table(title="reducers")
    for column in ("reducer", "insertion points", "attention", "text", "trainable", "fixed count", "merges", "summary"):
        caps.add_column(column)
    yes = lambda v: "yes" if v else "-"  # noqa: E731
    for p in report["plugins"]:
        for r in p["reducers"]:
            c = r["capabilities"]
            caps.add_row(
                f"{r['name']} (collision: plugin {p['name']})" if r["collision"] else r["name"],
                ", ".join(c["insertion_points"]),
                ", ".join(c["attention"]) or "-",
                yes(c["needs_text"]),
                yes(c["trainable"]),
                yes(c["deterministic_count"]),
                yes(c["merges"]),
                r["summary"],
            )
    return caps


def _presets_table(report: dict[str, Any]) -> Table:
    """Every pipeline preset with the plugin that ships it and the paper and table it reproduces."""
    table = Table(title="pipeline presets (preset: NAME, tokenprune compare --preset NAME)")
    for column in ("preset", "plugin", "stages", "paper", "reproduces"):
        table.add_column(column)
    for p in report["presets"]:
        stages = ", ".join(f"{s['reducer']}@{_at(s['at'])}" for s in p["definition"]["stages"])
        name = f"{p['name']} (collision)" if p["collision"] else p["name"]
        table.add_row(name, p["plugin"] or "-", stages, p["paper"], p["table"])
    return table


def _at(at: Any) -> str:
    if not isinstance(at, dict):
        return str(at)
    ((kind, k),) = at.items()
    return f"layer {k}" if kind == "layer" else f"decode layer {k}"


@app.command()
def validate(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.", dir_okay=False)],
) -> None:
    """Check a pipeline file against the installed reducers (exit 0 if valid, 2 if not).

    An empty file is reported rather than accepted as a no-op (write ``stages: []`` for one on purpose).
    """
    try:
        if pipeline.is_file() and _blank_yaml(pipeline.read_text(encoding="utf-8")):
            _fail(
                f"{pipeline}: the file is empty (no pipeline in it); a pipeline needs a `stages:` list, e.g.\n"
                "stages:\n  - {at: post_projector, reducer: random, keep: 0.5}\n"
                "(write `stages: []` for a pipeline that prunes nothing on purpose)"
            )
        pipe = load_pipeline(pipeline, plugins=_manager())
    except (TokenpruneError, FileNotFoundError) as exc:
        _fail(str(exc))
    stages = "; ".join(f"{s.reducer} at {s.point} keep {s.keep}" for s in pipe.stages) or "no stages (a no-op)"
    typer.echo(f"{pipeline}: valid pipeline ({len(pipe.stages)} stage{'s' if len(pipe.stages) != 1 else ''}: {stages})")


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    core_only: Annotated[
        bool, typer.Option("--core-only", help="Leave out the installed reducers' parameter schemas.")
    ] = False,
) -> None:
    """Print the JSON schema of pipeline files (with each installed reducer's params).

    A reducer name that several plugins registered is left out (and reported), since no pipeline can use it.
    """
    registry = None
    if not core_only:
        registry = _manager().reducers
        for collision in registry.collisions:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"left out of the schema: {collision.error()}", style="yellow", markup=False
            )
        registry = registry.unambiguous()
    text = json.dumps(pipeline_json_schema(registry), indent=2)
    if output is None:
        typer.echo(text)
    else:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(output)


@app.command()
def compare(
    config: Annotated[
        Path | None, typer.Argument(help="Comparison config (YAML). Default: the bundled mini VLM on SynthVQA.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (overrides the config's).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; print only the summary.")] = False,
    preset: Annotated[
        list[str] | None,
        typer.Option(
            "--preset",
            help="Run these pipeline presets (a name or a pattern such as 'sparsevlm-*'; repeatable) instead "
            "of the config's pipelines. `tokenprune plugins` lists them.",
        ),
    ] = None,
) -> None:
    """Compare pipelines on tasks: accuracy and fidelity against FLOPs, latency, memory, KV cache.

    Results are appended to OUTPUT/results.jsonl as they come, so an interrupted run resumes where it
    stopped; OUTPUT also gets summary.csv, summary.json, report.md and pareto.png. Under torchrun or
    accelerate launch, the examples are sharded over the processes.
    """
    from tokenprune.bench.config import load_config

    try:
        cfg = load_config(config)
        if output is not None:
            cfg = cfg.model_copy(update={"output": output})
        if preset:
            cfg = _with_presets(cfg, preset)
        outcome = _run_comparison(cfg, _manager(), quiet)
    except (TokenpruneError, FileNotFoundError) as exc:
        _fail(str(exc))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    Console(width=max(REPORT_WIDTH, Console().width)).print(_summary_table(outcome.summary, outcome))
    typer.echo(f"report: {outcome.folder / 'report.md'}")


def _run_comparison(cfg: Any, manager: PluginManager, quiet: bool) -> Any:
    """Run ``cfg`` with progress bars on a terminal, plain lines elsewhere, nothing if quiet (or not rank 0)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tokenprune.bench.runner import compare as run_compare

    if quiet or int(os.environ.get("RANK", "0")) != 0:
        return run_compare(cfg, plugins=manager)
    if not Console().is_terminal:  # a log file or a pipe: plain lines instead of bars
        return run_compare(cfg, plugins=manager, progress=_PlainProgress(_pass_count(cfg, manager)))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        bars: dict[str, Any] = {}

        def progress(description: str, done: int, total: int) -> None:
            if description not in bars:
                bars[description] = bar.add_task(description, total=total)
            bar.update(bars[description], completed=done, total=total)

        return run_compare(cfg, plugins=manager, progress=progress)


def _summary_table(summary: Summary | dict[str, Any], outcome: Any) -> Table:
    """The ranked pipelines of a comparison's ``summary.json``, as the command prints them."""
    return summary_table(summary, f"tokenprune compare ({outcome.computed} computed, {outcome.reused} reused)")


@app.command()
def flops(
    model: Annotated[str, typer.Option("--model", help="'bundled', a local model folder, or a hub id.")] = "bundled",
    pipeline: Annotated[
        Path | None, typer.Option("--pipeline", help="Pipeline YAML (default: none, unpruned).")
    ] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Image file (default: a SynthVQA scene).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt text; the image placeholder is added if missing.")] = (
        "what colour is the background ?"
    ),
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    no_fvcore: Annotated[bool, typer.Option("--no-fvcore", help="Skip the fvcore counter (faster).")] = False,
) -> None:
    """Count the FLOPs of one prefill, unpruned and under a pipeline, with three counters side by side.

    Rows: the vision tower and projector, each decoder layer with the tokens it processed, the
    reducers' own overhead and the attention probe, the LM head (logits of every position: a
    plain forward), the total, and the reduction against the unpruned model. Units: MACs
    (FLOPs = 2 x MACs).
    """
    from PIL import Image

    from tokenprune.adapters.loading import floats_to, load_model
    from tokenprune.cost.flops import count_flops
    from tokenprune.engine import prepare as tp_prepare

    try:
        vlm, processor = load_model(model, dtype, "cpu")
        if image is None:
            from tokenprune.synth.questions import heldout_split
            from tokenprune.synth.scenes import render

            picture = Image.fromarray(render(heldout_split(1)[0].scene)[0])
        else:
            picture = Image.open(image).convert("RGB")
        token = getattr(processor, "image_token", "<image>")
        text = prompt if token in prompt else f"{token} {prompt}"
        inputs = processor(images=[picture], text=[text], return_tensors="pt")
        floats_to(inputs, vlm.dtype)
        manager = _manager()
        prepared = tp_prepare(pipeline, plugins=manager) if pipeline else None
        base = count_flops(vlm, dict(inputs), None, use_fvcore=not no_fvcore, plugins=manager)
        pruned = (
            count_flops(vlm, dict(inputs), prepared, use_fvcore=not no_fvcore, plugins=manager) if prepared else None
        )
    except (TokenpruneError, FileNotFoundError, OSError) as exc:
        _fail(str(exc))
    reports = {"unpruned": base} if pruned is None else {"unpruned": base, "pipeline": pruned}
    if as_json:
        data = {k: r.as_dict() for k, r in reports.items()}
        if pruned is not None:
            data["reduction"] = pruned.reduction(base)
        typer.echo(json.dumps(data, indent=2))
        return
    console = Console(width=max(120, Console().width))
    for label, report in reports.items():
        console.print(_flops_table(label, report))
        for note in report.fvcore_notes:
            console.print(f"fvcore: {note}", markup=False)
    if pruned is not None:
        console.print(f"reduction against unpruned: {100 * pruned.reduction(base):.1f}% of MACs")


def _flops_table(label: str, report: Any) -> Table:
    """One :class:`~tokenprune.cost.flops.FlopsReport` as a table: a row per part, a column per counter."""
    table = Table(title=f"{label}: MACs per prefill (FLOPs = 2 x MACs)")
    for column in ("part", "tokens", "analytic", "torch", "fvcore"):
        table.add_column(column, justify="right")

    def n(v: int | None) -> str:
        return "-" if v is None else f"{v:,}"

    table.add_row("vision tower + projector", "", "", n(report.vision), "")
    for row in report.layers:
        table.add_row(
            f"layer {row.index}", ", ".join(map(str, row.tokens)), n(row.analytic), n(row.torch), n(row.fvcore)
        )
    for stage, name, macs in report.reducers:
        table.add_row(f"reducer {name} (stage {stage})", "", n(macs), "", "")
    if report.probe:
        table.add_row("attention probe", "", n(report.probe), "(in its layer)", "")
    table.add_row("lm_head", "", *(n(v) for v in report.lm_head))
    lm = report.language_model
    table.add_row("language model", "", n(lm["analytic"]), n(lm["torch"]), n(lm["fvcore"]))
    table.add_row("total (vision + LM + overheads)", "", n(report.total), "", "")
    return table


def _blank_yaml(text: str) -> bool:
    """A document with no YAML value at all (empty, whitespace, comments); syntax errors are not blank."""
    try:
        return yaml.safe_load(text) is None
    except yaml.YAMLError:
        return False


class _PlainProgress:
    """``tokenprune compare``'s progress as plain lines, for output that is not a terminal.

    One line when a pass (a task under a pipeline) starts, then one per tenth of its batches, with the
    elapsed time and an estimate of what is left of that pass.
    """

    def __init__(self, passes: int) -> None:
        self.passes, self.seen = passes, 0
        self.current: str | None = None
        self.started = self.reported = 0.0

    def __call__(self, description: str, done: int, total: int) -> None:
        now = time.monotonic()
        if description != self.current:
            self.current, self.started, self.reported = description, now, -1.0
            self.seen += 1
        fraction = done / max(1, total)
        if fraction < 1 and fraction - self.reported < 0.1:
            return
        self.reported = fraction
        elapsed = now - self.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else float("nan")
        typer.echo(
            f"[{self.seen}/{self.passes}] {description}: {done}/{total} batches, {elapsed:.0f} s, ETA {eta:.0f} s",
        )


def _with_presets(cfg: Any, patterns: list[str]) -> Any:
    """``cfg`` with its pipelines replaced by ``preset:`` entries (validated when the run resolves them)."""
    from tokenprune.bench.config import PipelineEntry

    return cfg.model_copy(update={"pipelines": [PipelineEntry(preset=p) for p in patterns]})


def _pass_count(cfg: Any, manager: PluginManager) -> int:
    """How many passes a comparison runs: task x pipeline (the reference included), plus one cost pass per task."""
    from tokenprune.bench.config import resolve_pipelines

    return len(cfg.tasks) * (len(resolve_pipelines(cfg, manager)) + 1)


def _fail(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
    raise typer.Exit(EXIT_INVALID)


def get_app() -> typer.Typer:
    """The command line with the installed plugins' commands added (``tokenprune_add_commands``), once."""
    if not getattr(app, "_tokenprune_plugin_commands", False):
        builtin = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None}
        manager = _manager()
        for impl in manager.pluggy.hook.tokenprune_add_commands.get_hookimpls():
            before = len(app.registered_commands)
            impl.function(**{name: app for name in impl.argnames})
            added = [c.name or (c.callback.__name__ if c.callback else "?") for c in app.registered_commands[before:]]
            clash = sorted(set(added) & builtin)
            if clash:
                del app.registered_commands[before:]
                raise TokenpruneError(
                    f"plugin {impl.plugin_name!r} adds commands that already exist: {', '.join(clash)}"
                )
            builtin |= set(added)
        app._tokenprune_plugin_commands = True  # type: ignore[attr-defined]
    return app


def main() -> None:
    """Entry point of the ``tokenprune`` script."""
    get_app()()


if __name__ == "__main__":
    main()
