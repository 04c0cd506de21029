"""Llama 4: no ``.model`` submodule, complex ``freqs_cis`` RoPE, chunked local attention, tiled images.

Modules: ``Llama4ForConditionalGeneration`` is its own multimodal base model (it receives ``input_ids``, calls
``get_image_features`` and merges the features); its ``language_model`` is a ``Llama4ForCausalLM`` whose
``model`` (a ``Llama4TextModel``) receives the merged ``inputs_embeds`` and holds the decoder layers.

Rotary embeddings: the text model hands every decoder layer one complex ``freqs_cis`` tensor ``(B or 1, L, d/2)``
as ``position_embeddings`` (not a ``(cos, sin)`` tuple); after a layer cut its kept columns are gathered (under
``compact`` positions it is recomputed for the renumbered positions), declared in :meth:`Llama4Adapter.layer_args`.

Attention (iRoPE): RoPE layers attend within chunks of ``attention_chunk_size`` tokens (8192 in the released
checkpoints); every fourth layer has no RoPE (NoPE) and full causal attention. As for Gemma3's sliding windows, a
pruned prefill slices the chunked mask the model built for the *unpruned* sequence (chunks count original
positions), while in decoding steps a pruned layer's mask is rebuilt causal over its own cache: after a layer cut
the engine is exact (cached decoding equals a recompute) while the prompt plus the generated tokens fit in one chunk,
and a decoding step whose chunked mask no longer covers the layer's cache is refused, naming the model and the
layer. A ``post_projector`` cut alone shortens the sequence before the model builds its masks (the model chunks the
kept tokens): cached decoding equals a recompute for any length. The NoPE layers'
attention temperature tuning scales queries by ``log1p(floor((i + 1) / floor_scale))`` of the token's index ``i`` in
the layer's (pruned) sequence, not its original position; it is ``1`` while that index is below ``floor_scale``
(8192).

Layout: the processor splits an image into ``h x w`` tiles plus a global (downscaled) view when ``h * w > 1``
(else the global view alone); each tile gives a square grid of tokens (24 x 24 patches pixel-shuffled to 12 x 12
in the released checkpoints, row-major), written as one run of ``<|patch|>`` placeholders. The tile separators,
``<|image|>`` and the image start and end markers are text tokens and are never pruned. ``get_image_features``
receives every tile of the batch as one ``pixel_values`` tensor without the aspect ratios, so the adapter reads
each image's tile grid from the separators that :meth:`Llama4Adapter.visual_mask` sees in ``input_ids``
(:func:`tile_grids`): the local tiles are stitched into one ``12h x 12w`` grid (view 1, ``crop`` the tile in
raster order), the global view follows (view 0). Where the prompt's runs do not follow the processor's pattern
(hand-written prompts), each tile is laid out as its own square grid numbered as an image.

Vision attention: the tower (``vision_model.model.layers``) runs each tile as one sequence whose *last* position is
its CLS token, so it is described without one (``attention: mean``); the features come from its last layer, and
each token gets the mean of the ``2 x 2`` patches its pixel shuffle concatenates. Not served: ``pre_projector`` and
``vision_layer`` stages (the projector's input is the vision adapter's pixel-shuffled output, not one tower patch
per row).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.adapters.vision import block_means
from tokenprune.errors import UnsupportedModelError
from tokenprune.layout import TokenLayout

if TYPE_CHECKING:
    from tokenprune.engine.layer_args import LayerArg, LayerCut


class Llama4Adapter(ModelAdapter):
    """Llama 4: the top model is the multimodal base model; per image its tiles stitched into one grid, then the
    global view; complex ``freqs_cis`` RoPE."""

    name = "llama4"
    model_types = ("llama4",)
    notes = (
        "tiles stitched per image from the separators, then the global view; after a layer cut, decoding is exact "
        "while prompt + output fit in one attention chunk (8192) and refused past it"
    )
    pre_projector_refusal = (
        "its projector's input is the vision adapter's output, pixel-shuffled (each row built from 2x2 tower "
        "patches), not one tower patch per row; pre_projector stages are not served for llama4"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._images: list[tuple[int, int]] = []  # per image of the last prefill: (local tiles, tiles per row)

    def vlm(self) -> nn.Module:
        """The top-level model: it receives ``input_ids`` and calls ``get_image_features`` itself."""
        return self.model

    def language_model(self) -> nn.Module:
        """``language_model.model``: the ``Llama4TextModel`` inside the ``Llama4ForCausalLM``."""
        lm = getattr(self.model, "language_model", None)
        text = getattr(lm, "model", None)
        if not isinstance(text, nn.Module) or not hasattr(text, "layers"):
            raise UnsupportedModelError(
                f"model_type 'llama4': {type(self.model).__name__} has no `language_model.model` with decoder "
                "layers; the llama4 adapter serves transformers' Llama4ForConditionalGeneration"
            )
        return text

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """The ``<|patch|>`` placeholders; also remembers each image's tile grid, read from the separators."""
        mask = super().visual_mask(input_ids)
        self._images = tile_grids(input_ids, mask, int(self.model.config.eoi_token_index))
        return mask

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per image: its local tiles stitched into one grid (view 1, ``crop`` the tile), then the global view
        (view 0); each tile a square grid. Where the prompt's tile runs do not match the features, one square
        grid per tile, each numbered as an image."""
        feats = call.features()
        if not feats:
            return []
        sizes = {int(f.shape[0]) for f in feats}
        side = math.isqrt(next(iter(sizes))) if len(sizes) == 1 else 0
        if side * side not in sizes:
            raise UnsupportedModelError(
                f"model_type 'llama4': tiles gave {sorted(sizes)} visual tokens each, not one square grid size; the "
                "llama4 adapter lays each tile out as a square grid"
            )
        if sum(n + 1 for n, _ in self._images) != len(feats):
            return [_tile(side, image=i, view=0, tile=(0, 0, -1)) for i in range(len(feats))]
        layouts = []
        for i, (n, per_row) in enumerate(self._images):
            parts = [_tile(side, image=i, view=1, tile=(t // per_row, t % per_row, t)) for t in range(n)]
            layouts.append(TokenLayout.cat([*parts, _tile(side, image=i, view=0, tile=(0, 0, -1))]))
        return layouts

    def vision_tower(self) -> VisionTower | None:
        """The encoder layers (``vision_model.model.layers``); the features are the last layer's output. Each tile's
        sequence ends with its CLS token (not position 0), so the tower is described without one (``mean``)."""
        layers = tuple(self.model.vision_model.model.layers)
        return VisionTower(
            name=type(self.model.vision_model).__name__,
            layers=layers,
            feature_layer=len(layers) - 1,
            has_cls=False,
            notes="the CLS token is the last position of each tile's sequence; rank by attention: mean",
        )

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per tile: the last position (CLS) dropped, then each token the mean of the
        ``s x s`` patches the pixel shuffle concatenates (``s = 1 / pixel_shuffle_ratio``, row-major); one tensor
        per tile, in ``pixel_values`` order."""
        s = round(1 / self.model.config.vision_config.pixel_shuffle_ratio)
        out = []
        for v in values:
            patches = v[:-1]
            side = math.isqrt(patches.shape[0])
            if side * side != patches.shape[0] or side % s:
                return None
            out.append(block_means(patches.reshape(side, side, patches.shape[-1]), s))
        return out

    def rotary(self, hidden: Tensor, positions: Tensor, layer_index: int) -> Tensor:  # type: ignore[override]
        """The complex ``freqs_cis`` ``(B, L, d/2)`` of ``positions[0]``, as the text model computes it."""
        return self.language_model().rotary_emb(hidden, positions[0])

    def layer_args(self) -> Mapping[str, LayerArg]:
        """``position_embeddings`` is one complex tensor: gathered, or recomputed under ``compact`` positions."""
        from tokenprune.engine.layer_args import LayerArg

        return {"position_embeddings": LayerArg("recompute", recompute=_follow_freqs_cis)}


def _follow_freqs_cis(value: Any, cut: LayerCut) -> Any:
    """The kept tokens' ``freqs_cis``: ``(B or 1, L, d/2)`` gathered to ``(B, L', d/2)``, or recomputed."""
    if cut.compact:
        return cut.adapter.rotary(cut.hidden, cut.sequence.positions, cut.layer)
    if not isinstance(value, Tensor):
        return value
    from tokenprune.engine.sequence import gather_tokens

    return gather_tokens(value, cut.sequence.lm_column)


def _tile(side: int, *, image: int, view: int, tile: tuple[int, int, int]) -> TokenLayout:
    """A ``(1, side^2)`` layout of one tile at grid place ``tile = (tile row, tile column, crop)``, row-major (the
    model's pixel shuffle keeps the patches' raster order)."""
    ty, tx, crop = tile
    r = torch.arange(side).repeat_interleave(side)
    c = torch.arange(side).repeat(side)
    return TokenLayout(
        image=torch.full((1, side * side), image),
        view=torch.full((1, side * side), view),
        row=(ty * side + r)[None],
        col=(tx * side + c)[None],
        newline=torch.zeros(1, side * side, dtype=torch.bool),
        crop=torch.full((1, side * side), crop),
    )


def tile_grids(input_ids: Tensor, mask: Tensor, end_id: int) -> list[tuple[int, int]]:
    """``(local tiles, tiles per row)`` of every image of ``(B, L)`` ``input_ids``, in batch order.

    The processor writes an image as ``<|image_start|>``, the local tiles' placeholder runs row by row (a
    ``<|tile_x_separator|>`` after each tile but a row's last, a ``<|tile_y_separator|>`` after each row), then
    ``<|image|>``, the global view's run and ``<|image_end|>`` (``end_id``); an image of one tile has only the
    global view. The token after the last local run is the row separator, so a row ends at the first local run
    it follows. Returns ``[]`` where the runs do not follow that pattern (a run not closed by the image's end).
    """
    nxt = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
    ends = mask & ~nxt  # each run's last token
    samples = ends.nonzero()[:, 0].tolist()
    following = input_ids.roll(-1, 1)[ends].tolist()  # the token after each run, row-major
    images: list[tuple[int, int]] = []
    local: list[int] = []
    sample = -1
    for b, token in zip(samples, following, strict=True):
        if b != sample and local:
            return []
        sample = b
        if token != end_id:
            local.append(token)
            continue
        per_row = local.index(local[-1]) + 1 if local else 1
        if local and len(local) % per_row:
            return []
        images.append((len(local), per_row))
        local = []
    return [] if local else images
