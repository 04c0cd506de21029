"""The public handle: :func:`apply` installs a (prepared) pipeline on a model, :class:`PruningRun` takes it away.

The hooks themselves are :class:`tokenprune.engine.forward.ForwardHooks`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine import compat
from tokenprune.engine.forward import ForwardHooks
from tokenprune.engine.prepare import PreparedPipeline, prepare
from tokenprune.engine.run_stats import RunStats
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline
from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.reducer import TokenReducer

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningRun] = weakref.WeakKeyDictionary()


def apply(
    model: nn.Module,
    pipeline: PreparedPipeline | Pipeline | Mapping[str, Any] | str | Path,
    *,
    plugins: PluginManager | None = None,
) -> PruningRun:
    """Install ``pipeline`` on ``model``; returns the handle (also a context manager).

    A :class:`~tokenprune.engine.prepare.PreparedPipeline` (from :func:`tokenprune.prepare`) is only
    bound and installed: it is not validated again and its reducers are not rebuilt. Anything else is
    prepared on the way (validated once, reducers built).

    Args:
        model: A supported transformers VLM, as loaded (``...ForConditionalGeneration``).
        pipeline: A prepared pipeline, a :class:`~tokenprune.Pipeline`, a mapping, a YAML string or a path.
        plugins: The plugin manager providing reducers, presets and adapters (default: the prepared
            pipeline's, else a fresh one).

    Raises:
        UnsupportedTransformersError: the installed transformers release is outside the tested range
            (set ``TOKENPRUNE_ALLOW_UNSUPPORTED_TRANSFORMERS=1`` to get a warning instead).
        UnsupportedModelError: no adapter is registered for ``model.config.model_type`` and the generic
            adapter cannot serve the model (the message names the type, the reason, the registered types
            and the docs on adding an adapter; see :func:`tokenprune.adapters.generic.adapter_for`).
        PipelineError: the pipeline is invalid, or a stage's layer does not exist in this model.
        TokenpruneError: the model already has a pipeline applied, or its attention implementation
            cannot be probed.

    Example::

        with tp.apply(model, "pipeline.yaml") as run:
            out = model.generate(**inputs, max_new_tokens=32)
        print(run.stats.summary())
    """
    compat.check_transformers_version()
    if not isinstance(pipeline, PreparedPipeline):
        pipeline = prepare(pipeline, plugins=plugins if plugins is not None else get_plugin_manager())
    manager = plugins if plugins is not None else pipeline.plugins
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(f"tokenprune.apply needs a transformers model with a config, got {type(model).__name__}")
    adapter = adapter_for(model, manager)
    if model in _ACTIVE:
        raise TokenpruneError(
            "this model already has a tokenprune pipeline applied; call .remove() on that handle (or leave its "
            "`with` block) before applying another"
        )
    run = PruningRun(model, pipeline, adapter)
    try:
        run._forwards.install()
    except BaseException:
        run.remove()
        raise
    _ACTIVE[model] = run
    return run


class PruningRun:
    """The handle returned by :func:`apply`: remove the hooks, read the statistics.

    Attributes:
        model: The model the pipeline is applied to.
        pipeline: The validated pipeline.
        prepared: The prepared pipeline it was installed from.
        adapter: The model family's adapter.
        stats: Per-forward statistics (:class:`tokenprune.engine.run_stats.RunStats`).
    """

    def __init__(self, model: nn.Module, prepared: PreparedPipeline, adapter: ModelAdapter) -> None:
        self.model = model
        self.prepared = prepared
        self.pipeline = prepared.pipeline
        self.adapter = adapter
        self.stats = RunStats()
        self._plans = list(prepared.plans)
        self._forwards = ForwardHooks(model, self.pipeline, adapter, self._plans, self.stats, prepared.channels)
        self._removed = False

    # --- public -------------------------------------------------------------------------------

    @property
    def reducers(self) -> list[TokenReducer]:
        """The reducer instance of each stage, in pipeline order."""
        return [p.reducer for p in self._plans]

    def remove(self) -> None:
        """Take every hook away and restore the model; safe to call twice."""
        self._forwards.remove()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._removed = True

    def __enter__(self) -> PruningRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        stages = ", ".join(f"{p.stage.reducer}@{p.stage.point}" for p in self._plans) or "no stages"
        state = "removed" if self._removed else "active"
        return f"PruningRun({self.adapter.name}: {stages}; {state})"
