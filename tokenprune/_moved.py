"""Old import paths that keep working: a module ``__getattr__`` serving names that moved to another module."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any


def moved_names(old: str, new: ModuleType, names: Iterable[str]) -> Callable[[str], Any]:
    """The module-level ``__getattr__`` of the deprecated module ``old``: it serves ``names`` from ``new``.

    Each access warns (a ``DeprecationWarning`` naming the new import path) and returns ``new``'s
    attribute; any other name raises ``AttributeError`` as a module does. Nothing happens at import.

    Use in the old module: ``__getattr__ = moved_names(__name__, new_module, ("A", "B"))``.
    """
    served = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name not in served:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old} is deprecated; import {name} from {new.__name__}", DeprecationWarning, stacklevel=2)
        return getattr(new, name)

    return __getattr__
