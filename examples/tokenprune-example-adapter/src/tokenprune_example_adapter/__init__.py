"""An example tokenprune adapter plugin: Mistral3 (Mistral Small 3.1 and later vision models)."""

from tokenprune_example_adapter.adapter import Mistral3Adapter

__all__ = ["Mistral3Adapter"]
