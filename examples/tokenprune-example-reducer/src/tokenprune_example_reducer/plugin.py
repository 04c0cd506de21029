"""The plugin module named by the ``tokenprune`` entry point: it registers the reducer."""

from __future__ import annotations

import tokenprune
from tokenprune.plugins import ReducerRegistry
from tokenprune_example_reducer.reducer import CentroidDistance


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: ReducerRegistry) -> None:
    registry.add(CentroidDistance)
