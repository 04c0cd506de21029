"""Counting host reads of tensor data (host syncs on a GPU) during a forward, on any device.

On a GPU every read of a tensor's values by the host (``.item()``, ``.tolist()``, ``bool(t)``,
``int(t)``, ``.cpu()``, ``.numpy()``) and every operation whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, indexing by a boolean mask, ``repeat_interleave`` by a
tensor) waits for every kernel queued before it. On a CPU they cost nothing, which is why they have to
be *counted*: :class:`SyncCounter` records each one during a block of code, with where it happened.

* **What counts** (:attr:`Sync.kind`): at PyTorch's dispatcher, ``_local_scalar_dense`` (what
  ``item``, ``__bool__``, ``__int__``, ``__float__`` and ``__index__`` of a tensor come down to) as
  ``item``; every operator tagged ``data_dependent_output`` (``equal``, ...) or
  ``dynamic_output_shape`` (``nonzero``, ``masked_select``, ``unique``, ...) under its own name, an
  ``index``/``index_put`` only when an index is a boolean mask (integer indices keep their shape); at
  the Python level, ``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu`` (on a CPU run ``.cpu()`` is
  a no-op, but the same line reads device memory on a GPU). A call counted at the Python level is not
  counted again by the operators it runs.
* **Where** (:class:`Sync`): the forward call of ``model`` it fell in (``forward``, counted from 0
  inside the block) and that call's ``phase`` (``prefill``: its KV cache was empty or absent;
  ``decode``: a later cached step); the decoder ``layer`` running (from that layer's first forward
  pre-hook to the next layer's, or the end of the language model: a layer stage, which runs in a
  forward hook of layer ``k - 1``, falls in layer ``k - 1``; a ``post_projector`` stage in no
  layer); its ``owner``: ``tokenprune`` when the innermost frame of tokenprune's or transformers'
  code on the Python stack is tokenprune's (the engine, a built-in or installed reducer plugin; this
  module excluded), ``model`` when it is transformers' (the stock model's own reads, also where the
  engine wraps a stock method); ``where``: tokenprune's frames on the stack, innermost last.

Enter the counter **inside** :func:`tokenprune.apply` (its hooks then run before the engine's
pre-hooks and after its post-hooks)::

    with tp.apply(model, pipeline), SyncCounter(model) as syncs:
        model.generate(**inputs, max_new_tokens=4)
    assert syncs.count(owner="tokenprune", phase="decode") == 0, syncs.report()
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

PYTHON_READS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.__array__: "numpy",
}
"""Tensor methods that read values into host memory without an operator the dispatcher sees on a CPU."""

_INDEXING = ("index", "index_put", "_index_put_impl", "_unsafe_index", "_unsafe_index_put")
_OWN_FILE = __name__
PASS_THROUGH = frozenset(
    {
        ("tokenprune.engine.hooks", "wrapper"),
        ("tokenprune.engine.stopwatch", "wrapper"),
        ("tokenprune.engine.probe", "probe_attention"),
        ("tokenprune.engine.vision_probe", "vision_probe_attention"),
    }
)
"""tokenprune's frames that call a stock function the model calls anyway (a wrapped feature method, the
stock attention behind a probe): what runs below them is the model's own."""


@dataclass(frozen=True)
class Sync:
    """One host read of tensor data.

    Attributes:
        kind: What read it (``item``, ``tolist``, ``numpy``, ``cpu``, ``nonzero``, ``bool index``, ...).
        forward: The forward call of the model it fell in, from 0 (``-1``: outside any).
        phase: ``prefill``, ``decode`` or ``outside`` (no forward call of the model running).
        layer: The decoder layer running (``None``: none).
        owner: ``tokenprune`` or ``model`` (see the module docstring).
        where: tokenprune's frames on the Python stack, innermost last (``module:line function``).
    """

    kind: str
    forward: int
    phase: str
    layer: int | None
    owner: str
    where: tuple[str, ...]

    def __str__(self) -> str:
        at = f"layer {self.layer}" if self.layer is not None else "no layer"
        trail = " <- ".join(reversed(self.where[-4:])) or "(no tokenprune frame)"
        return f"{self.kind} [{self.owner}, forward {self.forward} ({self.phase}), {at}] at {trail}"


class SyncCounter:
    """Records every host read of tensor data in a ``with`` block (see the module docstring).

    Args:
        model: The top-level model whose forward calls and decoder layers locate each read (``None``:
            only kinds, owners and stacks are recorded).
        layers: Its decoder layers, in order (default: the ones its tokenprune adapter names).
    """

    def __init__(self, model: nn.Module | None = None, layers: Sequence[nn.Module] | None = None) -> None:
        self.model = model
        self.layers = list(layers) if layers is not None else _decoder_layers(model)
        self.syncs: list[Sync] = []
        self.phases: list[str] = []  # the phase of each forward call of the model, in order
        self._forward, self._phase, self._layer = -1, "outside", None
        self._depth = 0  # > 0 while a call counted at the Python level (or the counter's own hook) runs
        self._handles: list[RemovableHandle] = []
        self._modes = (_FunctionMode(self), _DispatchMode(self))

    def __enter__(self) -> SyncCounter:
        self._install_hooks()
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- queries ------------------------------------------------------------------------------

    def select(self, **match: Any) -> list[Sync]:
        """The reads whose attributes equal ``match`` (e.g. ``owner="tokenprune", phase="decode"``)."""
        return [s for s in self.syncs if all(getattr(s, k) == v for k, v in match.items())]

    def count(self, **match: Any) -> int:
        """How many reads :meth:`select` finds."""
        return len(self.select(**match))

    def per_layer(self, **match: Any) -> Counter[int | None]:
        """Decoder layer -> reads there (``None``: outside every layer), among :meth:`select`'s."""
        return Counter(s.layer for s in self.select(**match))

    def per_forward(self, **match: Any) -> Counter[int]:
        """Forward call -> reads there, among :meth:`select`'s."""
        return Counter(s.forward for s in self.select(**match))

    def report(self, syncs: Iterable[Sync] | None = None) -> str:
        """One line per read (default: all), for an assertion message."""
        lines = [str(s) for s in (self.syncs if syncs is None else syncs)]
        return "\n".join(lines) if lines else "no host reads"

    # --- recording ----------------------------------------------------------------------------

    def record(self, kind: str) -> None:
        if self._depth:
            return
        owner, where = _owner(sys._getframe(2))
        self.syncs.append(Sync(kind, self._forward, self._phase, self._layer, owner, where))

    def _install_hooks(self) -> None:
        if self.model is None:
            return
        top = self.model
        self._handles.append(top.register_forward_pre_hook(self._quiet(self._top_pre), with_kwargs=True, prepend=True))
        self._handles.append(top.register_forward_hook(self._quiet(self._top_post), always_call=True))
        for i, layer in enumerate(self.layers):
            hook = self._quiet(lambda *a, i=i: self._enter_layer(i))
            self._handles.append(layer.register_forward_pre_hook(hook, prepend=True))
        lm = _language_model(self.model)
        if lm is not None:
            self._handles.append(lm.register_forward_hook(self._quiet(lambda *a: self._enter_layer(None))))

    def _quiet(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def quiet(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            try:
                hook(*args, **kwargs)
            finally:
                self._depth -= 1

        return quiet

    def _top_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from tokenprune.engine import compat

        self._forward += 1
        self._phase = "prefill" if compat.cache_length(compat.cache_from_kwargs(kwargs)) == 0 else "decode"
        self.phases.append(self._phase)
        self._layer = None

    def _top_post(self, *args: Any) -> None:
        self._phase, self._layer = "outside", None

    def _enter_layer(self, layer: int | None) -> None:
        self._layer = layer


class _FunctionMode(TorchFunctionMode):
    """Counts the Python-level reads of :data:`PYTHON_READS`."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = PYTHON_READS.get(func)
        if kind is None:
            return func(*args, **(kwargs or {}))
        self.counter.record(kind)
        self.counter._depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter._depth -= 1


class _DispatchMode(TorchDispatchMode):
    """Counts the operators that read values or whose output shape depends on them."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kind = _sync_kind(func, args)
        if kind is not None:
            self.counter.record(kind)
        return func(*args, **(kwargs or {}))


def _sync_kind(func: Any, args: Sequence[Any]) -> str | None:
    """What ``func`` on ``args`` reads from the device, or ``None`` when its result needs no host read."""
    name = func.overloadpacket.__name__
    if name == "_local_scalar_dense":
        return "item"
    if name.rstrip("_") in _INDEXING:
        indices = args[1] if len(args) > 1 else ()
        boolean = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())
        return "bool index" if boolean else None
    tags = func.tags
    if torch.Tag.data_dependent_output in tags or torch.Tag.dynamic_output_shape in tags:
        return name
    return None


def _owner(frame: FrameType | None) -> tuple[str, tuple[str, ...]]:
    """``(owner, tokenprune's frames innermost last)`` of the stack from ``frame`` outwards.

    The innermost frame that decides: tokenprune's own code (``tokenprune``); one of the wrappers
    through which the engine calls a stock function the model would call anyway (:data:`PASS_THROUGH`:
    ``model``); a transformers function called directly by tokenprune's code (``tokenprune``: a
    helper the engine or an adapter chose to call) or by a module call (``model``).
    """
    owner, where = "", []
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if _tokenprune(module):
            where.append(f"{module}:{frame.f_lineno} {frame.f_code.co_name}")
            if not owner:
                owner = "model" if (module, frame.f_code.co_name) in PASS_THROUGH else "tokenprune"
        elif not owner and module.startswith("transformers") and frame.f_back is not None:
            caller = frame.f_back.f_globals.get("__name__", "")
            if _tokenprune(caller) and (caller, frame.f_back.f_code.co_name) not in PASS_THROUGH:
                owner = "tokenprune"
            elif caller.startswith("torch.nn"):
                owner = "model"
        frame = frame.f_back
    return owner or "model", tuple(reversed(where))


def _tokenprune(module: str) -> bool:
    return module.startswith("tokenprune") and not module.startswith(_OWN_FILE)


def _decoder_layers(model: nn.Module | None) -> list[nn.Module]:
    """The decoder layers tokenprune's adapter for ``model`` names (none without a model or an adapter)."""
    if model is None:
        return []
    from tokenprune.plugins import get_plugin_manager

    config = getattr(model, "config", None)
    adapters = get_plugin_manager().adapters
    model_type = getattr(config, "model_type", None)
    if model_type is None or model_type not in adapters:
        return []
    return list(adapters.get(model_type)(model).decoder_layers())


def _language_model(model: nn.Module) -> nn.Module | None:
    from tokenprune.plugins import get_plugin_manager

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapters = get_plugin_manager().adapters
    if model_type is None or model_type not in adapters:
        return None
    return adapters.get(model_type)(model).language_model()
