"""The plugin contract: the hooks a tokenprune plugin may implement.

A plugin is a module (or any object) with functions marked by :data:`tokenprune.hookimpl` whose
names match the specifications below, exposed through the ``tokenprune`` entry-point group::

    # pyproject.toml of a plugin distribution
    [project.entry-points.tokenprune]
    my_reducers = "my_package.plugin"

    # my_package/plugin.py
    import tokenprune

    @tokenprune.hookimpl
    def tokenprune_register_reducers(registry):
        registry.add(MyReducer)

The built-in reducers and adapters are registered through this same group by tokenprune's own
``pyproject.toml``. An implementation may accept a subset of a hook's arguments (pluggy's rule), so
hooks can gain arguments without breaking plugins. See https://pluggy.readthedocs.io.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from tokenprune.plugins import AdapterRegistry, PipelineRegistry, ReducerRegistry, SignalRegistry, TaskRegistry

PROJECT_NAME = "tokenprune"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def tokenprune_register_reducers(registry: ReducerRegistry) -> None:
    """Register :class:`~tokenprune.TokenReducer` classes.

    Called once per plugin manager, when its reducer registry is first built.

    :param registry: Call ``registry.add(ReducerClass)`` for each reducer the plugin provides. The
        reducer's ``name`` is its key in pipelines; a name already registered by another plugin is an
        error that names both distributions.
    """


@hookspec
def tokenprune_register_adapters(registry: AdapterRegistry) -> None:
    """Register :class:`~tokenprune.adapters.ModelAdapter` classes for new model architectures.

    Called once per plugin manager, when its adapter registry is first built.

    :param registry: Call ``registry.add(AdapterClass)``; the adapter is used for every model whose
        ``config.model_type`` is in ``AdapterClass.model_types``. A ``model_type`` already claimed by
        another plugin is an error that names both distributions.
    """


@hookspec
def tokenprune_register_tasks(registry: TaskRegistry) -> None:
    """Register evaluation tasks for ``tokenprune compare`` (:class:`~tokenprune.bench.tasks.Task` classes).

    Called once per plugin manager, when its task registry is first built.

    :param registry: Call ``registry.add(TaskClass)``; the task is then usable in a comparison
        config as ``tasks: [{name: <TaskClass.name>, ...params}]``. A name already registered by
        another plugin is an error that names both distributions.
    """


@hookspec
def tokenprune_register_pipelines(registry: PipelineRegistry) -> None:
    """Register named pipelines (presets), e.g. the configurations of a paper's main tables.

    Called once per plugin manager, when its preset registry is first built. A preset is then usable
    as a pipeline file holding ``preset: NAME`` (optionally with ``name:``), as ``- preset: NAME`` in
    a comparison config's ``pipelines``, and as ``tokenprune compare --preset NAME``; ``tokenprune
    plugins`` lists it with its paper and table.

    :param registry: Call ``registry.add(name, definition, paper=..., table=..., description=...)``;
        ``definition`` is the pipeline as a YAML document holds it (``stages``, ``positions``, ...).
        Its stages are validated against the installed reducers when the preset is used, so a
        preset may use another plugin's reducers. A name already registered by another plugin is
        listed as a collision and cannot be used until one is disabled.
    """


@hookspec
def tokenprune_register_signals(registry: SignalRegistry) -> None:
    """Register signal channels: per-column signals that reducers read as ``ctx.signals[name]``.

    Called once per plugin manager, when its signal registry is first built. A channel
    (:class:`tokenprune.channels.SignalChannel`) names its producer, the decoder layer whose input it
    is computed from, its shape per column and what a merged token holds (its root's value or its
    group's mean); the engine computes it once per prefill when a stage reads it and carries it
    through every cut with the tokens (see docs/engine.md, "Adding a signal").

    :param registry: Call ``registry.add(SignalChannel(name, produce, layer=0, shape=(), merge="root"))``.
    """


@hookspec
def tokenprune_add_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``tokenprune`` command line.

    Called once when the command line starts (:func:`tokenprune.cli.get_app`), after the built-in
    commands exist.

    :param app: The root ``typer.Typer``; e.g. ``app.command("train-atp")(train_atp)``. A command
        name that already exists is an error that names the plugin.
    """
