"""Adding up the wall time of tokenprune's own code inside a model's forward.

The engine times its hooks, wrappers and the attention probes' extra work (not the stock attention
they call) with one :class:`Stopwatch`; each forward's share lands in
:attr:`tokenprune.engine.stats.ForwardStats.engine_seconds`. Measured inside the call it belongs to,
the share moves with the machine's speed the way the call does, so it survives noise that a
difference of two separately timed calls does not. On a GPU it is the host's time (launching
kernels, and waiting where tokenprune's code synchronises), not the kernels' time.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any


class Stopwatch:
    """Accumulates the wall time spent inside :meth:`running` blocks; a nested block is not counted twice."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count the time spent in the block (only the outermost block of a nesting counts)."""
        self._depth += 1
        if self._depth == 1:
            self._start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with every call counted."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.running():
                return fn(*args, **kwargs)

        return wrapper
