"""The Qwen2.5-Omni and Qwen3-Omni thinkers: the generic adapter plus their vision towers.

Everything else about the thinkers stays the generic adapter's (:mod:`tokenprune.adapters.generic`): TMRoPE positions
from the model's ``get_rope_index`` (audio positions left as they are), merged ``image_grid_thw`` grids, video layouts,
Qwen3-Omni's DeepStack residuals, and the thinker as its own base model before transformers 5.21
(:func:`~tokenprune.adapters.shape.base_model_of`). Audio tokens are text to the engine (never pruned). The two
thinkers' vision towers are the packed towers of Qwen2.5-VL and Qwen3-VL, block for block, so the adapters reuse what
:class:`~tokenprune.adapters.qwen2_vl.Qwen2VLTower` and :class:`~tokenprune.adapters.qwen3_vl.Qwen3VLTower` say
about them:

* **Qwen2.5-Omni** (:class:`Qwen25OmniThinkerAdapter`): Qwen2.5-VL's windowed tower (``visual``: window attention
  except ``fullatt_block_indexes``, the merge units held in window order, the PatchMerger's output put back in raster
  order). Vision attention at the last full-attention block, each token the mean of its 2x2 unit's patches, read at
  the place the window order moved the unit to; ``pre_projector`` and ``vision_layer: k`` stages on whole merge units
  (:mod:`tokenprune.adapters.packed`, windows recomputed from the kept units), as for Qwen2.5-VL.
* **Qwen3-Omni** (:class:`Qwen3OmniThinkerAdapter`): Qwen3-VL's tower (learned position embeddings interpolated per
  patch, no windows) with DeepStack mergers. Vision attention at the last block, each token the mean of its unit's
  patches; ``pre_projector`` and ``vision_layer`` stages are refused as for Qwen3-VL (the DeepStack mergers read
  intermediate blocks of every unit).

Both towers dispatch their attention through ``ALL_ATTENTION_FUNCTIONS`` with ``config._attn_implementation``, one call
per frame (per window in Qwen2.5-Omni's windowed blocks), which the vision probe intercepts. No CLS token:
``attention: mean`` only. Videos run through ``get_video_features``, which calls the same tower on
``video_grid_thw``, one sequence per temporal patch (Qwen2.5-Omni's in window order per frame); the probe watches
that call too and the towers' ``map_vision_video_patches`` map its sequences to the video tokens, so a
vision-attention stage reduces images and videos alike (``tokens: all``, ranked together). The stages before the
merger reduce the images of such a prompt and leave its videos' tower call alone.
"""

from __future__ import annotations

from tokenprune.adapters.generic import GenericAdapter, GenericDeepStackAdapter
from tokenprune.adapters.qwen2_vl import Qwen2VLTower
from tokenprune.adapters.qwen3_vl import Qwen3VLTower


class Qwen25OmniThinkerAdapter(Qwen2VLTower, GenericAdapter):
    """Qwen2.5-Omni's thinker: the generic adapter plus Qwen2.5-VL's windowed packed tower (``visual``), described
    by :class:`~tokenprune.adapters.qwen2_vl.Qwen2VLTower`: vision attention at the last full-attention block
    (``fullatt_block_indexes[-1]``), each token the mean of its 2x2 unit's patches taken from the place
    ``get_window_index`` moved the unit to; ``pre_projector`` and ``vision_layer`` stages on whole units."""

    name = "qwen2_5_omni_thinker"
    model_types = ("qwen2_5_omni_thinker",)
    notes = (
        "generic adapter + Qwen2.5-VL's windowed tower (vision attention at the last full-attention block, "
        "pre_projector and vision_layer on whole 2x2 units)"
    )


class Qwen3OmniThinkerAdapter(Qwen3VLTower, GenericDeepStackAdapter):
    """Qwen3-Omni-MoE's thinker: the generic adapter with DeepStack residuals plus Qwen3-VL's packed tower
    (``visual``), described by :class:`~tokenprune.adapters.qwen3_vl.Qwen3VLTower`: vision attention at its last
    block, each token the mean of its unit's ``m * m`` consecutive patches; the stages before the merger refused."""

    name = "qwen3_omni_moe_thinker"
    model_types = ("qwen3_omni_moe_thinker",)
    notes = (
        GenericDeepStackAdapter.notes + "; Qwen3-VL's tower: vision attention at its last block (pre_projector and "
        "vision_layer refused: DeepStack)"
    )
