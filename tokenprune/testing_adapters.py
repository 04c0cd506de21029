"""Deprecated: the adapter test kit's first import path; use :mod:`tokenprune.testing.adapters`.

Every name of :mod:`tokenprune.testing.adapters` is still served here, with a ``DeprecationWarning`` on
first use of each access (nothing happens at import).
"""

from __future__ import annotations

import warnings
from typing import Any

from tokenprune.testing import adapters as _adapters

__all__ = list(_adapters.__all__)


def __getattr__(name: str) -> Any:
    if name not in _adapters.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"tokenprune.testing_adapters is deprecated; import {name} from tokenprune.testing.adapters",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_adapters, name)
