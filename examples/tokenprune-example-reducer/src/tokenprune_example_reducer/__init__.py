"""An example tokenprune reducer plugin."""

from tokenprune_example_reducer.reducer import CentroidDistance

__all__ = ["CentroidDistance"]
