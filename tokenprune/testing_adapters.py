"""Deprecated: the adapter test kit's first import path; use :mod:`tokenprune.testing.adapters`.

Every name of :mod:`tokenprune.testing.adapters` is still served here, with a ``DeprecationWarning`` on
first use of each access (nothing happens at import).
"""

from __future__ import annotations

from tokenprune._moved import moved_names
from tokenprune.testing import adapters as _adapters

__all__ = list(_adapters.__all__)
__getattr__ = moved_names(__name__, _adapters, __all__)
