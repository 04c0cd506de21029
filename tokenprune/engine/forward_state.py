"""Per-forward state: one call of the model (:class:`ForwardState`), and what one prefill leaves for the decoding
steps that follow it (:class:`PrefillState`).

What does not change from forward to forward is the install-time plan (:mod:`tokenprune.engine.install`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from tokenprune.engine.run_stats import ForwardStats
from tokenprune.engine.sequence import TokenSequence


@dataclass
class ForwardState:
    """One call of the model, from its first hook to its last; the engine replaces it as a whole at both ends
    (a forward that raised leaves nothing behind).

    Attributes:
        started: The engine's stopwatch when the forward's first hook began.
        labels: The caller's ``labels``, taken out of the call (the loss is computed on the kept tokens).
        stats: This forward's statistics; ``None`` until the multimodal model's pre-hook knows the phase.
        real_tokens: Real tokens per sample of the caller's input (prefill).
        input_width: The multimodal model's input length in this forward.
        layer_kwargs: The last decoder layer's keyword arguments, unsliced (a prefill whose stage reads a
            layer's own attention: the dry call reuses them).
    """

    started: float = 0.0
    labels: Tensor | None = None
    stats: ForwardStats | None = None
    real_tokens: list[int] = field(default_factory=list)
    input_width: int = 0
    layer_kwargs: dict[str, Any] | None = None

    @property
    def phase(self) -> str | None:
        """``"prefill"``, ``"decode"`` (a decoding step), or ``None`` before the phase is known."""
        return self.stats.phase if self.stats is not None else None


@dataclass
class PrefillState:
    """What the engine knows about the current prefill, kept for the decoding steps after it.

    Attributes:
        visual: ``(B, L)`` visual tokens (image and video) of the caller's ``input_ids``.
        input_mask: ``(B, L)`` the caller's 2-D attention mask (all ones if none was given).
        input_length: ``L``, the caller's prefill length.
        lm_length: The language model's input length after the post_projector stages.
        lm_mask: ``(B, lm_length)`` the 2-D mask of that input.
        lm_pruned: Post_projector stages shortened the language model's input.
        lm_freed_positions: ``(R, B)`` positions freed there (``compact`` policy).
        current: The sequence entering the next decoder layer (prefill only).
        lm_sequence: The sequence at the language model's input.
        final: The sequence after the last stage (its logits are the model's output).
        segments: First decoder layer -> the sequence every layer from there on holds.
        in_prefill: The prefill forward is still running.
        decoded: Tokens decoded since the prefill (before the current step).
        decode_steps: Decoding forwards since the prefill (before the current one).
        step_length: Tokens in the current decoding step.
        step_positions: ``(R, B, step_length)`` positions of the current step, at the language model.
        stages_run: Indices of the stages that ran in this prefill.
        lm_embeds: ``(B, lm_length, D)`` the language model's input embeddings, kept during the prefill
            only when a layer stage reads them (the ``input_embeddings`` signal).
        video: ``(B, L)`` the video tokens among ``visual`` (``None``: none).
    """

    visual: Tensor
    input_mask: Tensor
    input_length: int
    lm_length: int = 0
    lm_mask: Tensor | None = None
    lm_pruned: bool = False
    lm_freed_positions: Tensor | None = None
    current: TokenSequence | None = None
    lm_sequence: TokenSequence | None = None
    final: TokenSequence | None = None
    segments: dict[int, TokenSequence] = field(default_factory=dict)
    in_prefill: bool = True
    decoded: int = 0
    decode_steps: int = 0
    step_length: int = 0
    step_positions: Tensor | None = None
    stages_run: set[int] = field(default_factory=set)
    lm_embeds: Tensor | None = None
    video: Tensor | None = None
    _reads: dict[int, tuple[TokenSequence, list[int], bool]] = field(default_factory=dict, repr=False)
    sliced: tuple[Any, dict[bool, Any]] | None = field(default=None, repr=False)
    """The segment last cut, and per layer form (recurrent or not) its last pruned layer's inputs as the model
    gave them and as the engine sliced them (prefill only)."""
    shared_columns: dict[tuple[int, int], tuple[TokenSequence, Tensor]] = field(default_factory=dict, repr=False)
    """KV sharing: per (source layer, shared layer's segment) the shared layer's tokens' columns in the source's
    prefill keys (:func:`tokenprune.engine.kv_sharing.shared_keys_call`)."""

    def real_tokens(self, seq: TokenSequence) -> list[int]:
        """Real tokens per sample of ``seq``; read from the device once per sequence, not once per layer."""
        return self._read(seq)[1]

    def all_valid(self, seq: TokenSequence) -> bool:
        """``seq`` has no padding token (``seq.valid.all()``), read once per sequence."""
        return self._read(seq)[2]

    def _read(self, seq: TokenSequence) -> tuple[TokenSequence, list[int], bool]:
        hit = self._reads.get(id(seq))
        if hit is None or hit[0] is not seq:
            counts = seq.valid.sum(1).tolist()  # one host read gives both answers
            hit = self._reads[id(seq)] = (seq, counts, all(c == seq.valid.shape[1] for c in counts))
        return hit

    def segment(self, layer: int) -> TokenSequence | None:
        """The sequence decoder layer ``layer`` holds, if a layer stage at or before it changed it."""
        starts = [k for k in self.segments if k <= layer]
        return self.segments[max(starts)] if starts else None

    @property
    def keys_so_far(self) -> int:
        """Keys of the unpruned sequence up to and including the current decoding step."""
        return self.input_length + self.decoded + self.step_length


def record_layer_tokens(
    fs: ForwardStats,
    st: PrefillState | None,
    seg: TokenSequence | None,
    batch: int,
    width: int,
    real_tokens: list[int],
    layers: int = 1,
) -> None:
    """Append the real tokens each sample has at a decoder layer, and the layer's width, to ``fs``, for
    ``layers`` consecutive layers that hold the same sequence (``batch`` x ``width``).

    In a pruned prefill: the layer's kept tokens; in an unpruned prefill: the caller's real tokens; in a
    decoding step: the step's tokens.
    """
    if st is not None and st.in_prefill and st.lm_sequence is not None:
        tokens = st.real_tokens(seg if seg is not None else st.lm_sequence)
    elif fs.phase == "prefill" and len(real_tokens) == batch:
        tokens = [int(r) for r in real_tokens]
    else:
        tokens = [width] * batch
    fs.layer_tokens.extend(list(tokens) for _ in range(layers))
    fs.layer_width.extend([width] * layers)
