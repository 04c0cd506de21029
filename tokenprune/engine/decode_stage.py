"""The ``decode`` stage: at every decoding step, which cached visual tokens layers ``k`` onwards attend to.

After the prefill, the KV cache holds the visual tokens the prefill stages kept. At each decoding step
the attention probe records layer ``k - 1``'s attention of the step's last query row and that layer's
cached keys; :func:`run_decode_stage` hands the visual part of both to the stage's reducer, and the
tokens it does not keep are *left out of the attention* of every layer from ``k`` on, for this step
only: :class:`KeySubset` gathers the kept columns of each layer's keys, values and mask inside the
attention call. The cache itself is not changed, so a token left out at one step can be attended
again at the next (DyCoke's dynamic pruning, https://arxiv.org/abs/2411.15024).

Columns are followed through the layer stages by their language-model column (``lm_column``), so a
layer whose cache a layer stage shortened leaves out the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from tokenprune.engine.forward_state import PrefillState
from tokenprune.engine.masks import causal_mask, slice_mask
from tokenprune.engine.run_stats import StageStats
from tokenprune.engine.sequence import TokenSequence, right_aligned_columns
from tokenprune.engine.stage import StagePlan, StageSignals, selection_stats, stage_context
from tokenprune.errors import ReducerOutputError, TokenpruneError
from tokenprune.reducer import Merge
from tokenprune.validation import check_reduction


@dataclass(frozen=True)
class KeySubset:
    """The cache columns one layer attends to in this step.

    Attributes:
        columns: ``(B, K)`` long, ascending cache columns per sample, right-aligned (``-1`` on the left
            where a sample keeps fewer), so the step's own tokens are the last ``q`` of every row.
    """

    columns: Tensor

    def apply(
        self, key: Tensor, value: Tensor, mask: Tensor | None, q: int, *, boolean: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``key``/``value`` ``(B, Hkv, Lk, hd)`` and the attention mask, restricted to :attr:`columns`.

        The model's mask is sliced (:func:`~tokenprune.engine.masks.slice_mask`); with none (sdpa's
        implicit causal attention) a causal one is built only when it is needed: several query rows, or
        samples that keep different numbers of tokens.
        """
        b, hkv, _, hd = key.shape
        valid = self.columns >= 0
        index = self.columns.clamp(min=0)[:, None, :, None].expand(b, hkv, -1, hd)
        key, value = key.gather(2, index), value.gather(2, index)
        if mask is None:
            if q == 1 and bool(valid.all()):
                return key, value, None
            return key, value, causal_mask(valid, q, boolean=boolean, dtype=key.dtype)
        rows = torch.arange(q, device=key.device).expand(b, q)  # the mask's rows are this step's queries
        return key, value, slice_mask(mask, rows, self.columns, valid, boolean=boolean, dtype=key.dtype)


def run_decode_stage(
    plan: StagePlan,
    seq: TokenSequence,
    scores: Tensor,
    keys: Tensor,
    step: int,
    lm_length: int,
    *,
    protect_newlines: bool,
) -> tuple[Tensor, StageStats]:
    """Run the decode stage's reducer on the visual tokens of layer ``k - 1``'s cache.

    Args:
        plan: The decode stage.
        seq: The prefill columns of layer ``k - 1``'s cache.
        scores: ``(B, Lk)`` float32, the step's last query row's head-averaged attention at layer ``k - 1``.
        keys: ``(B, Lk, Dk)`` that layer's cached keys (heads concatenated), the reducer's tokens.
        step: Decoding steps since the prefill (``ctx.step``).
        lm_length: The language model's prefill length (after the post_projector stages).
        protect_newlines: Layout newline tokens are kept.

    Returns:
        ``(B, lm_length)`` bool, the language-model columns left out of this step's attention from layer
        ``k`` on, and the stage's statistics.

    Raises:
        ReducerOutputError: the reducer returned a merge, or an invalid selection.
    """
    width = int(seq.valid.shape[1])
    attention = {"last": scores[:, :width]}
    tokens, ctx, vis_idx = stage_context(plan, keys[:, :width], seq, attention, protect_newlines, StageSignals())
    ctx = replace(ctx, step=step)
    valid, layout = ctx.valid, ctx.layout
    start = time.perf_counter()
    result = plan.reducer.reduce(tokens, ctx)
    if isinstance(result, Merge):
        raise ReducerOutputError(f"{plan.who} returned a Merge at {plan.stage.point}; a decode stage can only select")
    selection = check_reduction(result, tokens, ctx, who=plan.who, capabilities=type(plan.reducer).capabilities)
    seconds = time.perf_counter() - start
    left_out = valid & ~selection.to_mask(int(vis_idx.shape[1]))
    stats = selection_stats(plan, selection, valid, layout, seconds, 0)
    return _lm_columns(seq, vis_idx, left_out, lm_length), stats


def _lm_columns(seq: TokenSequence, vis_idx: Tensor, left_out: Tensor, length: int) -> Tensor:
    """``(B, length)`` bool: the language-model columns of the visual tokens ``left_out``."""
    lm = seq.lm_column.gather(1, vis_idx.clamp(min=0))
    out = torch.zeros(lm.shape[0], length + 1, dtype=torch.bool, device=lm.device)
    out.scatter_(1, torch.where(left_out, lm, length), True)
    return out[:, :length]


def key_subset(seq: TokenSequence, left_out_lm: Tensor, key_length: int, decoded: int, layer: int) -> KeySubset:
    """The columns of a layer's cache not left out: the cache is the prefill columns ``seq`` then the
    ``decoded`` tokens of the steps so far (this one included), or the last ``key_length`` of those where a
    sliding-window layer keeps only its window.

    Raises:
        TokenpruneError: the cache holds more keys than the prefill and the decoded tokens.
    """
    width = int(seq.valid.shape[1])
    total = width + decoded
    if key_length > total:
        raise TokenpruneError(
            f"decode stage: layer {layer}'s cache holds {key_length} keys, more than its prefill ({width}) and the "
            f"{decoded} decoded tokens; only caches that append each step's keys (transformers' DynamicCache) are "
            "supported"
        )
    lm = seq.lm_column
    width_lm = int(left_out_lm.shape[1])
    out = left_out_lm.gather(1, lm.clamp(min=0, max=max(width_lm - 1, 0))) & (lm >= 0) & (lm < width_lm)
    keep = torch.cat([~out, out.new_ones(out.shape[0], decoded)], 1)[:, total - key_length :]
    return KeySubset(right_aligned_columns(keep))


def cache_columns(st: PrefillState, layer: int) -> TokenSequence:
    """The prefill columns of ``layer``'s cache.

    Raises:
        TokenpruneError: no prefill sequence was recorded.
    """
    seq = st.segment(layer) or st.lm_sequence
    if seq is None:
        raise TokenpruneError("decode stage: no prefill sequence was recorded for this decoding step")
    return seq


@dataclass
class StepKeys:
    """What the attention probe needs to leave the decode stage's tokens out of one decoding step's attention.

    The engine hands it to the probe (:attr:`~tokenprune.engine.probe.AttentionProbe.step_keys`) once the
    stage ran; the probe asks :meth:`subset` per layer and key length, inside the attention call.

    Attributes:
        left_out: ``(B, lm_length)`` bool, the language-model columns the stage left out this step.
        from_layer: The stage's layer ``k``: layers before it attend to the whole cache.
        prefill: The prefill the cache holds (its columns per layer: :func:`cache_columns`).
        decoded: Tokens decoded so far, this step's included.
    """

    left_out: Tensor
    from_layer: int
    prefill: PrefillState
    decoded: int
    _subsets: dict[tuple[int, int], KeySubset] = field(default_factory=dict, repr=False)

    def subset(self, layer: int, key_length: int) -> KeySubset | None:
        """The cache columns ``layer`` attends to in this step (``None``: all of them)."""
        if layer < self.from_layer:
            return None
        seq = cache_columns(self.prefill, layer)
        key = (id(seq), key_length)  # the layers that hold the same columns share one subset: one host read a step
        if key not in self._subsets:
            self._subsets[key] = key_subset(seq, self.left_out, key_length, self.decoded, layer)
        return self._subsets[key]
