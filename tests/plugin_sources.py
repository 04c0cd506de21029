"""Source code of throwaway plugin modules, for discovery tests."""

from __future__ import annotations

REDUCER_PLUGIN = '''
import torch
import tokenprune
from tokenprune import Capabilities, ScoringReducer


class {cls}(ScoringReducer):
    """{doc}"""

    name = "{name}"
    capabilities = Capabilities(insertion_points=frozenset({points}))

    def score(self, tokens, ctx):
        return tokens.float().norm(dim=-1)


@tokenprune.hookimpl
def tokenprune_register_reducers(registry):
    registry.add({cls})
'''


def reducer_plugin_source(
    name: str, cls: str = "Plugged", points: str = "{'post_projector', 'layer'}", doc: str = "A test reducer."
) -> str:
    """Source of a plugin module registering one norm-scoring reducer called ``name``."""
    return REDUCER_PLUGIN.format(name=name, cls=cls, points=points, doc=doc)
