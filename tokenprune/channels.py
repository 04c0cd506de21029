"""Signal channels: per-column signals of the token sequence, registered once, carried through every cut.

A signal a reducer reads beside the hidden states (a per-token score, an embedding, an id) is a
:class:`SignalChannel`: a name, a producer, the decoder layer whose input it is computed from, and
its shape per column. A plugin registers it once from its ``tokenprune_register_signals`` hook::

    def norms(inp: ChannelInput) -> Tensor:               # (B, L): one value per column
        return inp.hidden.float().norm(dim=-1)

    @tp.hookimpl
    def tokenprune_register_signals(registry):
        registry.add(SignalChannel("input_norm", norms, layer=0))

A reducer that lists the name in ``capabilities.signals`` reads it as ``ctx.signals["input_norm"]``,
``(B, N, *shape)`` at its visual tokens (``0`` at padding). The engine produces the channel once per
prefill, where it is declared, only when a stage of the applied pipeline reads it, and keeps it
aligned with the tokens through the same gather as the sequence itself: a later cut (any stage,
any insertion point) carries it along, and a merged token keeps its root's value (``merge="root"``)
or gets its group's size-weighted mean, as its hidden state does (``merge="mean"``). Adding a signal
touches its producer and one registration, no engine file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from tokenprune.errors import TokenpruneError

if TYPE_CHECKING:
    from tokenprune.engine.sequence import TokenSequence

SIGNAL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ChannelInput:
    """What a channel's producer receives.

    Attributes:
        hidden: ``(B, L, D)`` the hidden states entering decoder layer ``layer`` (at ``layer`` 0: the
            language model's ``inputs_embeds``, before any ``post_projector`` stage).
        sequence: Where each column came from (:class:`~tokenprune.engine.sequence.TokenSequence`:
            ``input_column`` in the caller's ``input_ids``, ``valid``, ``visual``, ``positions``, ...).
        layer: The decoder layer.
    """

    hidden: Tensor
    sequence: TokenSequence
    layer: int


@dataclass(frozen=True)
class SignalChannel:
    """A per-column signal of the token sequence.

    Attributes:
        name: The name reducers list in ``capabilities.signals`` and read from ``ctx.signals``
            (lower case, digits and ``_``).
        produce: ``produce(ChannelInput) -> (B, L, *shape)`` tensor, one entry per column.
        layer: The decoder layer whose input it is computed from (``0``: the language model's input,
            before the ``post_projector`` stages; ``k``: the hidden states entering layer ``k``, before
            the ``layer: k`` stages). Stages at earlier insertion points cannot read it.
        shape: Its shape per column (``()``: one number per token).
        description: One line saying what it holds.
        merge: What a token merged from a group holds: its root's value (``"root"``, the default: a score, an
            id) or the group's size-weighted mean, as its hidden state (``"mean"``: a feature vector).
    """

    name: str
    produce: Callable[[ChannelInput], Tensor]
    layer: int = 0
    shape: tuple[int, ...] = ()
    description: str = ""
    merge: Literal["root", "mean"] = "root"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SIGNAL_NAME.match(self.name):
            raise ValueError(f"signal channel name {self.name!r}: use lower case letters, digits and '_'")
        if not callable(self.produce):
            raise ValueError(f"signal channel {self.name!r}: `produce` must be callable")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"signal channel {self.name!r}: `layer` must be an integer >= 0, got {self.layer!r}")
        if self.merge not in ("root", "mean"):
            raise ValueError(f"signal channel {self.name!r}: `merge` must be 'root' or 'mean', got {self.merge!r}")


def produce_channels(channels: Iterable[SignalChannel], hidden: Tensor, seq: TokenSequence, layer: int) -> None:
    """Compute every channel of ``channels`` declared at ``layer`` and attach it to ``seq`` (in place).

    Raises:
        TokenpruneError: a producer returned something other than a ``(B, L, *shape)`` tensor.
    """
    for channel in channels:
        if channel.layer != layer:
            continue
        value = channel.produce(ChannelInput(hidden, seq, layer))
        expected = (int(hidden.shape[0]), int(hidden.shape[1]), *channel.shape)
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TokenpruneError(
                f"signal channel {channel.name!r} produced {got} at layer {layer}; expected a tensor of shape "
                f"{expected} (batch, columns, *shape)"
            )
        seq.channels = {**seq.channels, channel.name: value}
        if channel.merge == "mean":
            seq.mean_channels = seq.mean_channels | {channel.name}
