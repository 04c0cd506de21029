"""Deprecated: the first import path of a run's statistics; use :mod:`tokenprune.engine.run_stats`.

``RunStats``, ``ForwardStats`` and ``StageStats`` (documented in the API reference under this path until
the engine's modules were renamed after their concepts) are still served here, with a ``DeprecationWarning``
on each access (nothing happens at import).
"""

from __future__ import annotations

from tokenprune._moved import moved_names
from tokenprune.engine import run_stats as _run_stats

__getattr__ = moved_names(__name__, _run_stats, ("ForwardStats", "RunStats", "StageStats"))
