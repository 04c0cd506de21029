"""Adding up the wall time of tokenprune's own code inside a model's forward.

The engine times its hooks, wrappers and the attention probes' extra work (not the stock attention
they call) with one :class:`Stopwatch`; each forward's share lands in
:attr:`tokenprune.engine.run_stats.ForwardStats.engine_seconds`. Measured inside the call it belongs to,
the share moves with the machine's speed the way the call does, so it survives noise that a
difference of two separately timed calls does not. On a GPU it is the host's time (launching
kernels, and waiting where tokenprune's code synchronises), not the kernels' time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any


class Stopwatch:
    """Accumulates the wall time spent inside :meth:`running` blocks; a nested block is not counted twice.

    The stopwatch is its own context manager (no generator per block: the engine enters it several
    times per decoder layer, and what it costs itself falls outside what it counts).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._start = 0.0

    def running(self) -> Stopwatch:
        """A block whose time counts (only the outermost block of a nesting): ``with watch.running(): ...``."""
        return self

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with every call counted."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper
