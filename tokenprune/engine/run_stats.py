"""What a pruning run did: tokens per stage and per layer, kept indices, time spent in reducers.

``handle.stats`` (see :func:`tokenprune.apply`) is a :class:`RunStats`; it gains one
:class:`ForwardStats` per forward pass of the model (prefill and each decoding step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenprune.layout import TokenLayout


@dataclass
class StageStats:
    """One stage in one prefill forward.

    Attributes:
        stage: Index of the stage in the pipeline.
        at: ``"post_projector"`` or ``"layer k"``.
        reducer: The reducer's registry name.
        entering: Visual tokens entering the stage, per sample (of the kind its ``tokens`` names:
            all, image or video tokens).
        leaving: Those of them leaving it, per sample.
        kept: Per sample, the kept indices relative to the visual tokens at the stage's input
            (``0 .. entering - 1``), in the order of :attr:`layout`.
        layout: Layout of the tokens entering the stage (``(B, N)``), when the adapter knows it.
        seconds: Wall time spent in the reducer (``reduce`` plus result checking).
        overhead_macs: Multiply-accumulates the reducer declared for this call
            (:meth:`tokenprune.TokenReducer.overhead_macs`), for the whole batch.
    """

    stage: int
    at: str
    reducer: str
    entering: list[int]
    leaving: list[int]
    kept: list[list[int]]
    layout: TokenLayout | None
    seconds: float
    overhead_macs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "at": self.at,
            "reducer": self.reducer,
            "entering": self.entering,
            "leaving": self.leaving,
            "kept": self.kept,
            "seconds": self.seconds,
            "overhead_macs": self.overhead_macs,
        }


@dataclass
class ForwardStats:
    """One forward pass of the model.

    Attributes:
        phase: ``"prefill"`` (stages ran) or ``"decode"`` (a cached step).
        batch_size: Samples in the batch.
        stages: The stages that ran (empty when decoding or when the batch had no visual tokens).
        layer_tokens: ``layer_tokens[i][b]``: tokens of sample ``b`` (real tokens, not padding) that
            decoder layer ``i`` processed.
        layer_width: ``layer_width[i]``: the padded sequence length that layer ``i`` processed.
        engine_seconds: Wall time spent in tokenprune's own code during this forward: the engine's
            hooks (stages, reducers and result checks, gathers, masks, positions) and the attention
            probes' extra work, not the stock layers and attention they call; the top model's
            post-hook, which records it, is left out (:mod:`tokenprune.engine.stopwatch`; on a GPU
            the host's time). Divided by the call's wall time, it is tokenprune's share of the call.
    """

    phase: str
    batch_size: int
    stages: list[StageStats] = field(default_factory=list)
    layer_tokens: list[list[int]] = field(default_factory=list)
    layer_width: list[int] = field(default_factory=list)
    engine_seconds: float = 0.0

    @property
    def reducer_seconds(self) -> float:
        """Time spent inside reducers in this forward."""
        return sum(s.seconds for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "batch_size": self.batch_size,
            "stages": [s.as_dict() for s in self.stages],
            "layer_tokens": self.layer_tokens,
            "layer_width": self.layer_width,
            "reducer_seconds": self.reducer_seconds,
            "engine_seconds": self.engine_seconds,
        }


@dataclass
class RunStats:
    """Every forward pass since :func:`tokenprune.apply` (or the last :meth:`clear`)."""

    forwards: list[ForwardStats] = field(default_factory=list)

    @property
    def prefills(self) -> list[ForwardStats]:
        """The forwards in which the pipeline ran."""
        return [f for f in self.forwards if f.phase == "prefill"]

    @property
    def last_prefill(self) -> ForwardStats | None:
        """The most recent prefill, or None."""
        prefills = self.prefills
        return prefills[-1] if prefills else None

    @property
    def reducer_seconds(self) -> float:
        """Total time spent inside reducers."""
        return sum(f.reducer_seconds for f in self.forwards)

    @property
    def engine_seconds(self) -> float:
        """Total time spent in tokenprune's own code (:attr:`ForwardStats.engine_seconds`)."""
        return sum(f.engine_seconds for f in self.forwards)

    def clear(self) -> None:
        """Forget the recorded forwards."""
        self.forwards.clear()

    def summary(self) -> str:
        """A short human-readable account of the last prefill."""
        last = self.last_prefill
        if last is None:
            return "no prefill recorded"
        lines = []
        for s in last.stages:
            lines.append(f"stage {s.stage} ({s.reducer} at {s.at}): visual tokens {s.entering} -> {s.leaving}")
        tokens = ", ".join(f"L{i}: {t}" for i, t in enumerate(last.layer_tokens))
        lines.append(f"tokens per layer (per sample): {tokens}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "forwards": [f.as_dict() for f in self.forwards],
            "reducer_seconds": self.reducer_seconds,
            "engine_seconds": self.engine_seconds,
        }
