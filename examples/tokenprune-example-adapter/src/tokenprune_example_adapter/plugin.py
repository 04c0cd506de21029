"""The plugin module named by the ``tokenprune`` entry point: it registers the adapter."""

from __future__ import annotations

import tokenprune
from tokenprune.plugins import AdapterRegistry
from tokenprune_example_adapter.adapter import Mistral3Adapter


@tokenprune.hookimpl
def tokenprune_register_adapters(registry: AdapterRegistry) -> None:
    registry.add(Mistral3Adapter)
