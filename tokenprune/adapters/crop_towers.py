"""Aya Vision and Command A Vision: the generic adapter plus vision attention on their cropped SigLIP towers.

Both families' processors split an image into fixed-size crops (tiles, then a global thumbnail where there are
several tiles), written as one placeholder run per crop after a text separator. ``get_image_features`` runs every
crop of the batch as one row of ``pixel_values`` through the SigLIP tower (``vision_tower``: one attention
sequence of ``side x side`` patches per crop, no CLS token), then the projector pixel-shuffles each crop's patch
grid by ``downsample_factor`` ``d``: token ``(i, j)`` of a crop, row-major, concatenates the channels of patches
``(d i + a, d j + b)`` (``0 <= a, b < d``), and an MLP (Aya: after a LayerNorm) projects it. Everything else
(each crop laid out as a square grid of its own, numbered as an image; Cohere2's sliding-window and global layers)
is the generic adapter's; :class:`CropTowerAdapter` adds the tower:

* **Vision attention** (:meth:`CropTowerAdapter.vision_tower`): the encoder layers, probed at the layer whose output
  the features come from (Aya: ``vision_feature_layer``, the last layer in the released checkpoints; Command A
  Vision: ``last_hidden_state``, the last layer, before the per-patch ``post_layernorm``). SigLIP has no CLS:
  ``attention: mean`` only. Each token gets the mean of its ``d x d`` block of patches
  (:meth:`CropTowerAdapter.map_vision_patches`), one tensor per crop.
* **Not served**: ``pre_projector`` and ``vision_layer`` stages. The projector's input rows are the tower's
  patches, but it builds each token from a ``d x d`` block of them (the pixel shuffle), so it is not per token.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokenprune.adapters.base import ImageCall, VisionTower
from tokenprune.adapters.generic import GenericAdapter
from tokenprune.adapters.vision import block_means, encoder_tower, square_patches


class CropTowerAdapter(GenericAdapter):
    """The generic adapter plus a SigLIP-like tower run once per fixed-size crop and a pixel-shuffle projector.

    Subclasses name their model types and how the features are selected from the tower's hidden states
    (:attr:`feature_layer_key`, :attr:`strategy_key`).
    """

    name = "crop_tower"
    model_types = ()
    notes = "generic adapter + vision attention (each token the mean of its pixel-shuffled block of patches)"
    pre_projector_refusal = (
        "its projector pixel-shuffles each d x d block of tower patches (downsample_factor) into one token before "
        "its MLP, so it is not a per-token projector: stages before the projector are not served for this family"
    )
    feature_layer_key: ClassVar[str | None] = None
    """The config key (and ``get_image_features`` argument) naming the hidden state the features come from;
    ``None``: the tower's last layer (``last_hidden_state``)."""
    strategy_key: ClassVar[str | None] = None
    """The config key (and argument) whose value ``default`` drops each sequence's position 0; ``None``: never."""

    def vision_tower(self) -> VisionTower | None:
        """The encoder layers, probed at the layer whose output the features come from; no CLS (SigLIP)."""
        index = getattr(self.vlm().config, self.feature_layer_key, -1) if self.feature_layer_key else -1
        notes = "the layer whose output the projector reads; one sequence per crop"
        return encoder_tower(self.tower(), index, notes)

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """One tower sequence per crop, in ``pixel_values`` order: position 0 dropped where the call's strategy is
        ``default`` (Aya), the rest a ``side x side`` grid of patches; token ``(i, j)`` of the crop, row-major, the
        mean of patches ``(d i + a, d j + b)``. Returns one ``(side^2 / d^2, C)`` tensor per crop; ``None`` where a
        sequence is not a square grid divisible by ``d``."""
        d = int(self.vlm().config.downsample_factor)
        strategy = self._strategy(call)
        out = []
        for v in values:
            grid = square_patches(v, strategy)
            if grid is None or grid.shape[0] % d:
                return None
            out.append(block_means(grid, d))
        return out

    def _strategy(self, call: ImageCall) -> str | None:
        """The call's ``vision_feature_select_strategy`` (Aya), else the config's; ``None`` for Command A Vision."""
        if self.strategy_key is None:
            return None
        given = call.argument(self.strategy_key, self.vlm().get_image_features)
        return given if given is not None else getattr(self.vlm().config, self.strategy_key, None)


class AyaVisionAdapter(CropTowerAdapter):
    """Aya Vision: features from ``hidden_states[vision_feature_layer]`` (``-1``: the last layer, before SigLIP's
    ``post_layernorm``), position 0 dropped under the ``default`` strategy (``full`` in the checkpoints); the
    projector pixel-shuffles, then a LayerNorm and a SwiGLU MLP."""

    name = "aya_vision"
    model_types = ("aya_vision",)
    feature_layer_key = "vision_feature_layer"
    strategy_key = "vision_feature_select_strategy"


class Cohere2VisionAdapter(CropTowerAdapter):
    """Command A Vision: features from the tower's ``last_hidden_state`` (its last layer, then ``post_layernorm``);
    the projector pixel-shuffles, then a SwiGLU MLP."""

    name = "cohere2_vision"
    model_types = ("cohere2_vision",)
