"""Turn a stage's ``keep`` into a per-sample token budget."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def tokens_to_keep(keep: float | int, present: int) -> int:
    """How many of ``present`` tokens a stage keeps.

    ``keep`` as a float in ``(0, 1]`` is a fraction, rounded down but at least 1 token (when any is
    present); as an int ``>= 1`` it is a count, capped at ``present``.

    >>> tokens_to_keep(0.25, 10), tokens_to_keep(0.01, 10), tokens_to_keep(64, 10), tokens_to_keep(1.0, 7)
    (2, 1, 10, 7)
    """
    if present <= 0:
        return 0
    if isinstance(keep, bool):
        raise TypeError("keep must be a float fraction or an int count, not a bool")
    if isinstance(keep, int):
        return min(keep, present)
    # 1e-9 absorbs binary representation error (0.29 * 100 == 28.999999999999996).
    return min(present, max(1, math.floor(keep * present + 1e-9)))


def budget_per_sample(keep: float | int, valid: Tensor, protected: Tensor) -> Tensor:
    """``(B,)`` long budget for ``(B, N)`` ``valid`` and ``protected`` masks.

    The budget counts protected tokens; a sample whose protected tokens exceed ``keep`` keeps all of
    them (and nothing else).
    """
    present = valid.sum(1).tolist()
    floor = (protected & valid).sum(1)
    wanted = torch.tensor([tokens_to_keep(keep, int(p)) for p in present], dtype=torch.long, device=valid.device)
    return torch.maximum(wanted, floor)
