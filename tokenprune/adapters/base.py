"""The adapter contract: what tokenprune must know about a model family to prune inside it.

An adapter is registered for one or more transformers ``model_type`` values (``config.model_type``
of the top-level model) through the ``tokenprune_register_adapters`` hook, so a new architecture is
a plugin like a new reducer. The engine-facing methods (locating the visual tokens, the projector
and the decoder layers, the token layout, the position scheme) are specified with the engine.
"""

from __future__ import annotations

from typing import ClassVar


class ModelAdapter:
    """Base class of model adapters.

    Attributes:
        name: A short name for listings, e.g. ``"llava_next"``.
        model_types: The ``config.model_type`` values this adapter handles.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
