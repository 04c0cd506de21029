"""Prepare once, install many times: :func:`prepare` validates a pipeline and builds its reducers, once.

:func:`tokenprune.apply` then only binds the prepared stages to a model and installs the hooks, so a
caller that applies the same pipeline many times (the comparison harness, its cost pass, ``flops``,
the lmms-eval bridge) validates it once, builds each reducer once (a trained reducer reads its
weights once) and resolves ``preset:`` documents against the plugin manager it was given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenprune.channels import SignalChannel
from tokenprune.engine.stage import StagePlan
from tokenprune.errors import PipelineError, PluginError
from tokenprune.pipeline import Pipeline, Problem, Stage, _format, load_pipeline
from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.reducer import TokenReducer

PipelineSource = Pipeline | Mapping[str, Any] | str | os.PathLike[str]


@dataclass(frozen=True)
class PreparedPipeline:
    """A validated pipeline with its reducers built, ready for :func:`tokenprune.apply` (any number of times).

    The reducer instances are shared by every :func:`~tokenprune.apply` of this object; a reducer that
    keeps state between calls (DyCoke's decode stage remembers the previous step) should not serve
    two models generating interleaved in the same thread.

    Attributes:
        pipeline: The validated pipeline.
        plans: One :class:`~tokenprune.engine.stage.StagePlan` per stage (index, stage, reducer, who), in order.
        plugins: The plugin manager the pipeline was validated against; ``apply`` takes the adapter from it.
        channels: The signal channels (:mod:`tokenprune.channels`) that some stage reads, from ``plugins``.
    """

    pipeline: Pipeline
    plans: tuple[StagePlan, ...]
    plugins: PluginManager
    channels: tuple[SignalChannel, ...] = ()

    @property
    def name(self) -> str | None:
        """The pipeline's name."""
        return self.pipeline.name

    @property
    def stages(self) -> list[Stage]:
        """The pipeline's stages."""
        return self.pipeline.stages

    @property
    def reducers(self) -> list[TokenReducer]:
        """The reducer instance of each stage, in pipeline order."""
        return [p.reducer for p in self.plans]

    def __repr__(self) -> str:
        stages = ", ".join(f"{p.stage.reducer}@{p.stage.point}" for p in self.plans) or "no stages"
        return f"PreparedPipeline({self.name or 'unnamed'}: {stages})"


def prepare(
    pipeline: PipelineSource | PreparedPipeline,
    *,
    plugins: PluginManager | None = None,
    check: bool = True,
) -> PreparedPipeline:
    """Validate ``pipeline`` once, resolve its ``preset:`` against ``plugins`` and build its reducers.

    Args:
        pipeline: A :class:`~tokenprune.Pipeline`, a mapping, a YAML string or a path (a
            :class:`PreparedPipeline` is returned as it is when ``plugins`` is None or its own manager).
        plugins: The plugin manager providing reducers and presets (default: a fresh one).
        check: Validate the stages against the reducers; False only for a :class:`~tokenprune.Pipeline`
            already validated against ``plugins`` (as :func:`tokenprune.bench.config.resolve_pipelines`
            returns them), so that it is validated once. Each reducer still validates its own params.

    Raises:
        PipelineError: the pipeline is invalid (every problem listed), or a stage reads a signal channel
            that is not registered or is produced after the stage.

    Example::

        prepared = tp.prepare("pipeline.yaml", plugins=manager)
        for model in models:
            with tp.apply(model, prepared) as run:
                model.generate(**inputs)
    """
    if isinstance(pipeline, PreparedPipeline):
        if plugins is None or plugins is pipeline.plugins:
            return pipeline
        pipeline = pipeline.pipeline
    manager = plugins if plugins is not None else get_plugin_manager()
    pipe = load_pipeline(pipeline, plugins=manager, check=check)
    registry = manager.reducers
    plans = tuple(
        StagePlan(i, stage, registry.get(stage.reducer)(stage.params), registry.describe(stage.reducer))
        for i, stage in enumerate(pipe.stages)
    )
    return PreparedPipeline(pipe, plans, manager, _channels(plans, manager))


def _channels(plans: tuple[StagePlan, ...], manager: PluginManager) -> tuple[SignalChannel, ...]:
    """The registered signal channels the stages read, each checked to exist before its readers."""
    found: dict[str, SignalChannel] = {}
    problems: list[Problem] = []
    for p in plans:
        point = p.stage.point
        latest = int(point.layer) if point.kind == "layer" and point.layer is not None else 0
        for name in sorted(p.needs.channels):
            try:
                channel = manager.signals.get(name)
            except PluginError as exc:
                problems.append(Problem("reducer", f"reads the signal {name!r}: {exc}", p.index, p.stage.reducer))
                continue
            if point.kind == "decode" or channel.layer > latest:
                where = "the language model's input" if channel.layer == 0 else f"the input of layer {channel.layer}"
                message = f"reads the signal {name!r}, produced at {where}, later than this stage ({point})"
                problems.append(Problem("at", message, p.index, p.stage.reducer))
            found[name] = channel
    if problems:
        raise PipelineError(_format(problems, "pipeline"), problems)
    return tuple(found.values())
