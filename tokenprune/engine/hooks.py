"""Installing and removing the engine's hooks and instance-attribute wrappers, all or nothing."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenprune.engine.stopwatch import Stopwatch


class HookSet:
    """The hooks and attribute wrappers one :class:`~tokenprune.engine.PruningRun` installed.

    :meth:`remove` takes them all away in reverse order, leaving each module exactly as it was
    (an instance attribute that did not exist before is deleted, not set to a saved value).
    Every hook and wrapper it installs is timed by :attr:`stopwatch` (a wrapped method's own body is not).
    """

    def __init__(self, stopwatch: Stopwatch | None = None) -> None:
        self.stopwatch = stopwatch if stopwatch is not None else Stopwatch()
        self._handles: list[RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, str, Any, bool]] = []

    def pre(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        """A forward pre-hook that sees (and may replace) the keyword arguments."""
        self._handles.append(module.register_forward_pre_hook(self.stopwatch.timed(hook), with_kwargs=True))

    def post(self, module: nn.Module, hook: Callable[..., Any], *, always: bool = False) -> None:
        """A forward hook; with ``always`` it also runs when the forward raised (then ``output`` is ``None``)."""
        timed = self.stopwatch.timed(hook)
        self._handles.append(module.register_forward_hook(timed, with_kwargs=True, always_call=always))

    def wrap_method(
        self,
        module: nn.Module,
        name: str,
        after: Callable[[tuple[Any, ...], dict[str, Any], Any], None],
        before: Callable[[], None] | None = None,
    ) -> None:
        """Shadow ``module.name`` by an instance attribute that calls ``before()``, the method, then
        ``after(args, kwargs, output)``."""
        original = getattr(module, name)
        had = name in module.__dict__
        previous = module.__dict__.get(name)
        running = self.stopwatch.running

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                with running():
                    before()
            out = original(*args, **kwargs)
            with running():
                after(args, kwargs, out)
            return out

        module.__dict__[name] = wrapper
        self._wrapped.append((module, name, previous, had))

    def remove(self) -> None:
        """Take everything away; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, name, previous, had in reversed(self._wrapped):
            if had:
                module.__dict__[name] = previous
            else:
                module.__dict__.pop(name, None)
        self._wrapped.clear()


def bind_arguments(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a call of ``fn`` as keywords (a ``**kwargs`` catch-all flattened), for a pre-hook
    that returns them as ``((), kwargs)``.

    Raises:
        TypeError: ``fn`` takes a ``*args`` catch-all (positional arguments could not be named).
    """
    if not args:
        return dict(kwargs)
    func = getattr(fn, "__func__", None)  # a bound method: its function's signature, cached, and its self
    sig, lead = (_signature(func), (fn.__self__,)) if func is not None else (_signature(fn), ())
    bound = sig.bind_partial(*lead, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[len(lead) :]:
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{fn!r}: positional catch-all arguments are not supported")
        else:
            out[name] = value
    return out


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, computed once per plain function (it costs tens of microseconds a call);
    other callables (a per-instance ``partial``) are not cached, so the cache holds no model alive."""
    return _function_signature(fn) if inspect.isfunction(fn) else inspect.signature(fn)


@functools.lru_cache(maxsize=512)
def _function_signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)
