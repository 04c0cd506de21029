"""Deprecated: the first import path of a run's statistics; use :mod:`tokenprune.engine.run_stats`.

``RunStats``, ``ForwardStats`` and ``StageStats`` (documented in the API reference under this path until
the engine's modules were renamed after their concepts) are still served here, with a ``DeprecationWarning``
on each access (nothing happens at import).
"""

from __future__ import annotations

import warnings
from typing import Any

from tokenprune.engine import run_stats as _run_stats

_NAMES = ("ForwardStats", "RunStats", "StageStats")


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tokenprune.engine.stats is deprecated; import {name} from tokenprune.engine.run_stats",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_run_stats, name)
