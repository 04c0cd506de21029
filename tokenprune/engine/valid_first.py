"""A tower stage's rows with their valid tokens first, as the reducer contract promises.

``ReduceContext.valid`` says that each sample's tokens come first, padding only at the end of a row. A stage before
the language model after an earlier one (two ``pre_projector`` stages, a ``vision_layer`` stage on a packed tower and
then another, or a ``pre_projector`` stage after it) sees rows whose removed tokens are still in place (the projector
or the merger needs every row whole), so its valid tokens are not a prefix. :class:`ValidFirst` reorders a stage's
tokens and context so that they are, and maps the reducer's selection back to the row's own columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from tokenprune.reducer import ReduceContext, Selection


@dataclass(frozen=True)
class ValidFirst:
    """The order that puts each row's valid tokens first.

    Attributes:
        order: ``(R, P)`` long: column ``j`` of the reordered rows is column ``order[r, j]`` of row ``r``; the valid
            columns first, in their order, then the others.
    """

    order: Tensor

    @classmethod
    def of(cls, valid: Tensor) -> ValidFirst:
        """The order of a ``(R, P)`` bool validity mask (a stable sort: no host read)."""
        return cls(torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices)

    def rows(self, x: Tensor) -> Tensor:
        """``(R, P, ...)`` values reordered along the token axis."""
        index = self.order.reshape(*self.order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, index)

    def context(self, ctx: ReduceContext) -> ReduceContext:
        """``ctx`` with its per-token fields reordered (a tower stage's: no text, no language-model signals)."""

        def rows(value: Tensor | None) -> Tensor | None:
            return None if value is None else self.rows(value.to(self.order.device))

        return replace(
            ctx,
            valid=self.rows(ctx.valid),
            protected=self.rows(ctx.protected),
            sizes=self.rows(ctx.sizes),
            layout=None if ctx.layout is None else ctx.layout.gather(self.order),
            columns=rows(ctx.columns),
            vision_attention=rows(ctx.vision_attention),
            vision_valid=rows(ctx.vision_valid),
            vision_features=rows(ctx.vision_features),
            vision_keys=rows(ctx.vision_keys),
            vision_attention_at={k: self.rows(v) for k, v in ctx.vision_attention_at.items()},
        )

    def selection(self, selection: Selection) -> Selection:
        """A selection of the reordered tokens as the rows' own columns (still increasing: the order keeps the
        valid columns in their order)."""
        kept = selection.indices >= 0
        columns = self.order.gather(1, selection.indices.clamp(min=0))
        return Selection(indices=torch.where(kept, columns, selection.indices), counts=selection.counts)
