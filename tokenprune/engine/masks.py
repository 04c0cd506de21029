"""Attention masks of a pruned sequence: slices of the model's own masks, or causal masks built anew."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tokenprune.adapters.base import ModelAdapter
from tokenprune.engine.sequence import TokenSequence
from tokenprune.errors import TokenpruneError


def slice_mask(mask: Any, q_idx: Tensor, k_idx: Tensor, valid: Tensor, *, boolean: bool, dtype: torch.dtype) -> Tensor:
    """The 4-D mask of a pruned sequence: rows ``q_idx`` and columns ``k_idx`` of ``mask``.

    Args:
        mask: The model's ``(B or 1, H or 1, L, L)`` mask, or ``None`` (causal, built here).
        q_idx: ``(B, L')`` query columns (``-1``: padding slot).
        k_idx: ``(B, L')`` key columns (``-1``: padding slot, masked out).
        valid: ``(B, L')`` real tokens (used when ``mask`` is ``None``).
        boolean: Build a boolean mask (sdpa) rather than an additive one (eager).
        dtype: The additive mask's dtype.

    Raises:
        TokenpruneError: ``mask`` is neither ``None`` nor a 4-D tensor.
    """
    if mask is None:
        return causal_mask(valid, q=valid.shape[1], boolean=boolean, dtype=dtype)
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        shape = f" of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else ""
        raise TokenpruneError(
            f"unsupported attention mask at a pruned layer ({type(mask).__name__}{shape}); tokenprune handles "
            "the 4-D masks of the sdpa and eager attention implementations"
        )
    batch = q_idx.shape[0]
    m = mask.expand(batch, -1, -1, -1)
    heads, lq, lk = m.shape[1], q_idx.shape[1], k_idx.shape[1]
    m = m.gather(2, q_idx.clamp(min=0)[:, None, :, None].expand(batch, heads, lq, m.shape[3]))
    m = m.gather(3, k_idx.clamp(min=0)[:, None, None, :].expand(batch, heads, lq, lk))
    return m.masked_fill((k_idx < 0)[:, None, None, :], _masked_value(m))


def causal_mask(key_valid: Tensor, q: int, *, boolean: bool, dtype: torch.dtype) -> Tensor:
    """Causal ``(B, 1, q, Lk)`` mask over ``key_valid`` keys, the queries being the last ``q`` keys."""
    lk = key_valid.shape[1]
    q_pos = torch.arange(lk - q, lk, device=key_valid.device)
    causal = torch.arange(lk, device=key_valid.device)[None, :] <= q_pos[:, None]
    allowed = causal[None, None] & key_valid[:, None, None, :]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _masked_value(m: Tensor) -> Any:
    return False if m.dtype == torch.bool else torch.finfo(m.dtype).min


def pruned_input_mask(mask: Any, seq: TokenSequence, *, boolean: bool, dtype: torch.dtype) -> Any:
    """The language model's input mask after post_projector stages, in the form the caller gave it.

    A 2-D mask (or none) becomes the kept tokens' 2-D mask; a 4-D mask, or a dict of them (one per
    attention type, Gemma3), is sliced on both axes.
    """
    if mask is None or (isinstance(mask, Tensor) and mask.dim() == 2):
        return seq.valid.to(mask.dtype if isinstance(mask, Tensor) else torch.long)
    cols = seq.input_column
    if isinstance(mask, dict):
        return {name: slice_mask(m, cols, cols, seq.valid, boolean=boolean, dtype=dtype) for name, m in mask.items()}
    return slice_mask(mask, cols, cols, seq.valid, boolean=boolean, dtype=dtype)


def mask_kind(adapter: ModelAdapter, boolean: bool) -> dict[str, Any]:
    """How the engine builds masks for this model: boolean (sdpa) or additive in the language model's dtype."""
    return {"boolean": boolean, "dtype": getattr(adapter.language_model(), "dtype", torch.float32)}
