"""Model adapters: one model family's facts and glue, registered by ``model_type``."""

from tokenprune.adapters.base import ImageCall, ModelAdapter

__all__ = ["ImageCall", "ModelAdapter"]
