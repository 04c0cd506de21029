"""The ``visionzip`` reducer (work in progress: registers nothing yet)."""

from __future__ import annotations

import tokenprune


@tokenprune.hookimpl
def tokenprune_register_reducers(registry: tokenprune.plugins.ReducerRegistry) -> None:
    """Nothing registered yet."""
