"""The generic adapter: serves any model of the standard transformers-5 VLM shape that no adapter claims.

:func:`adapter_for` resolves a model's adapter: a registered adapter for its ``model_type`` wins; else
:class:`GenericAdapter` serves it when :func:`tokenprune.adapters.shape.refusal` finds the standard shape
(checked by feature, see that module); else :class:`~tokenprune.errors.UnsupportedModelError` names the
model type and the reason.

What the generic adapter reads, all from the model itself:

* **Positions.** 1-D RoPE, or Qwen2-VL's M-RoPE scheme when the base model has ``get_rope_index`` and
  ``rope_deltas`` and the text config an ``mrope_section`` (positions from the model's own
  ``get_rope_index`` on the unpruned ids, sliced by the engine; decoding adds ``rope_deltas``).
  A rotary module that takes the layer type (per-layer-type RoPE) is given it.
* **Layouts** (:meth:`GenericAdapter.image_layouts`), from the arguments of the model's
  ``get_image_features`` call: ``image_grid_thw`` (``t`` frames of a grid merged by the factor that makes
  the counts fit, the spatial merge size), ``image_sizes`` (pixel sizes over the patch size and merge
  factor, Pixtral-like rows) and ``spatial_shapes`` (patch grids over a downsampling factor); per-crop
  feature tensors are one grid each. Otherwise a square grid where the count is a square, else one row:
  a layout the model does not describe is never guessed beyond that.
* **Layouts from arguments passed by place** (:func:`positional_hints`): ``image_position_ids`` (Gemma 4's
  variable-aspect patches, each with its ``(x, y)``: the grid is their extent over the pooling factor) and
  ``target_sizes`` (MiniCPM-V's slices, ``(h, w)`` patches each: one grid per slice over the merge factor);
  ``image_grids`` (Molmo2: a global grid and a high-resolution grid per image,
  :mod:`~tokenprune.adapters.pooled_grids`).
* **Resampled queries.** Where the projector pools the patches into learned queries (a parameter named
  ``query``/``queries``/``latents`` outside the language model: Aria's cross-attention projector, Idefics2's
  perceiver resampler), each image's tokens are one row: the queries have no place in the image, and a square
  count is not a grid.
* **No vision attention**: the generic adapter describes no vision tower, so a stage that reads the
  vision encoder's attention is refused at ``apply``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.adapters.frame_layouts import positioned_video_layouts, unit_video_layouts
from tokenprune.adapters.pooled_grids import molmo2_image_layouts, molmo2_video_layouts
from tokenprune.adapters.qwen2_vl import Qwen2VLAdapter
from tokenprune.adapters.qwen3_vl import DeepStackResiduals
from tokenprune.adapters.shape import base_model_of, language_model_of, refusal, takes_deepstack
from tokenprune.errors import UnsupportedModelError
from tokenprune.layout import TokenLayout

#: Largest factor tried between a layout hint (pixels or patches) and the feature grid.
MAX_FACTOR = 64


class GenericAdapter(ModelAdapter):
    """Any model of the standard transformers-5 VLM shape (see :mod:`tokenprune.adapters.shape`)."""

    name = "generic"
    model_types = ()
    notes = "served by the generic adapter: layouts from the call's grid/size arguments, no vision attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.position_scheme = "mrope" if uses_mrope(model) else "rope"  # type: ignore[misc]
        self.resampled = learned_queries(self.vlm()) is not None
        if type(self).name == GenericAdapter.name:  # a registered subclass keeps its own name
            self.name = f"generic ({getattr(model.config, 'model_type', '?')})"  # type: ignore[misc]

    tower_attribute: ClassVar[str] = "vision_tower"
    """The vision tower's name on the base model, for the subclasses that describe it (:meth:`tower`)."""

    def vlm(self) -> nn.Module:
        """``.model``, or the top-level model where ``.model`` is only its decoder stack
        (:func:`~tokenprune.adapters.shape.base_model_of`: the omni thinkers before transformers 5.21)."""
        vlm = base_model_of(self.model)
        return vlm if vlm is not None else super().vlm()

    def tower(self) -> nn.Module:
        """The base model's vision tower (:attr:`tower_attribute`), which the subclasses that serve vision attention
        describe; the generic adapter itself describes none."""
        return getattr(self.vlm(), self.tower_attribute)

    def language_model(self) -> nn.Module:
        """``language_model``, else ``text_model`` (Idefics2, Granite-Docling), else the top-level model's ``.model``
        where the top-level model is the base model."""
        return language_model_of(self.vlm())  # type: ignore[return-value]

    # --- layouts ---------------------------------------------------------------------------------

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """One grid per image (or crop) from the call's layout arguments, else square or one row."""
        feats = call.features()
        counts = [int(f.shape[0]) for f in feats]
        if self.resampled:
            return [TokenLayout.grid(1, n, image=i) for i, n in enumerate(counts)]
        for name in ("image_grid_thw", "image_sizes", "spatial_shapes"):
            hints = _hints(call.kwargs.get(name))
            if hints is None:
                continue
            grids = grids_from_hints(hints, counts)
            if grids is not None:
                return [_layout(grid, i) for i, grid in enumerate(grids)]
        hints = positional_hints(call, self.vlm().get_image_features)
        grids = grids_from_hints(hints, counts) if hints is not None else None
        if grids is not None:
            return [_layout(grid, i) for i, grid in enumerate(grids)]
        pooled = molmo2_image_layouts(call, self.vlm().get_image_features)
        return pooled if pooled is not None else super().image_layouts(call)

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """Per video, ``t`` frames of a merged grid from ``video_grid_thw`` where the call gives it; ``t / r`` where
        the tower also merges ``r`` temporal patches into one (ERNIE-4.5-VL's ``temporal_merge_size``); frames of
        pooled grids from ``video_position_ids`` and ``num_frames_per_video`` (Gemma 4); one grid per unit of
        ``target_sizes_videos``, frames unknown (MiniCPM-V; both :mod:`tokenprune.adapters.frame_layouts`); frames
        of ``video_grids`` (Molmo2, :mod:`tokenprune.adapters.pooled_grids`)."""
        method = self.vlm().get_video_features
        framed = self._positioned_video_layouts(call)
        for layouts in (unit_video_layouts, molmo2_video_layouts):
            framed = framed if framed is not None else layouts(call, method)
        if framed is not None:
            return framed
        grid = call.arg("video_grid_thw", 1) if self.position_scheme == "mrope" else None
        vision = getattr(self.vlm().config, "vision_config", None)
        r = getattr(vision, "temporal_merge_size", None)
        if grid is not None and isinstance(r, int) and r > 1:
            merge = vision.spatial_merge_size
            return [
                TokenLayout.cat(
                    [TokenLayout.grid(h // merge, w // merge, image=i, frame=f, video=True) for f in range(t // r)]
                )
                for i, (t, h, w) in enumerate(grid.tolist())
            ]
        if grid is not None:
            try:
                return Qwen2VLAdapter.video_layouts(self, call)  # type: ignore[arg-type]
            except AttributeError:
                pass
        return super().video_layouts(call)

    def _positioned_video_layouts(self, call: ImageCall) -> list[TokenLayout] | None:
        """Gemma 4's frames, pooled by the tower's kernel; Gemma 4 Unified's (no tower: one token per patch)."""
        vision = getattr(self.vlm().config, "vision_config", None)
        pooling = getattr(vision, "pooling_kernel_size", None)
        for k in dict.fromkeys((pooling if isinstance(pooling, int) else 1, 1)):
            layouts = positioned_video_layouts(call, self.vlm().get_video_features, k)
            if layouts is not None:
                return layouts
        return None

    # --- positions -------------------------------------------------------------------------------

    def rotary(self, hidden: Tensor, positions: Tensor, layer_index: int) -> tuple[Tensor, Tensor]:
        lm = self.language_model()
        rows = positions
        if self.position_scheme == "mrope":
            rows = positions[-3:] if positions.shape[0] >= 3 else positions.expand(3, -1, -1)
        else:
            rows = positions[0]
        if "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters:
            types = getattr(lm.config, "layer_types", None)
            return lm.rotary_emb(hidden, rows, types[layer_index] if types else None)
        return lm.rotary_emb(hidden, rows)

    def decode_positions(self, kwargs: dict[str, Any], virtual_past: int, query_length: int) -> Tensor:
        if self.position_scheme == "mrope":
            return Qwen2VLAdapter.decode_positions(self, kwargs, virtual_past, query_length)  # type: ignore[arg-type]
        return super().decode_positions(kwargs, virtual_past, query_length)


#: Names of learned-query parameters: a projector holding one resamples the patches into queries.
QUERY_PARAMETERS = frozenset({"query", "queries", "latents", "latent_queries"})


def learned_queries(vlm: nn.Module) -> str | None:
    """The name of a learned-query parameter outside the language model (a resampling projector), or ``None``."""
    lm = language_model_of(vlm)
    inside = {id(p) for p in lm.parameters()} if lm is not None else set()
    for name, param in vlm.named_parameters():
        if name.rsplit(".", 1)[-1] in QUERY_PARAMETERS and id(param) not in inside:
            return name
    return None


class GenericDeepStackAdapter(DeepStackResiduals, GenericAdapter):
    """The generic adapter for a language model with Qwen3-VL's DeepStack residuals (Qwen3-Omni's thinker,
    Cosmos3-Omni, Granite-Docling): the engine takes ``visual_pos_masks`` and ``deepstack_visual_embeds`` out of
    the language model's call and adds each layer's features itself after that layer, with the model's own
    ``_deepstack_process``, on the tokens still there (:mod:`tokenprune.engine.deepstack`), as for Qwen3-VL."""

    notes = GenericAdapter.notes + "; DeepStack features follow the kept and merged tokens"


def uses_mrope(model: nn.Module) -> bool:
    """Qwen2-VL's 3-D positions: ``get_rope_index`` and ``rope_deltas`` on the base model, ``mrope_section``
    in the language model's rope parameters (or in those of each layer type)."""
    vlm = base_model_of(model)
    if not (callable(getattr(vlm, "get_rope_index", None)) and hasattr(vlm, "rope_deltas")):
        return False
    cfg = getattr(language_model_of(vlm), "config", None)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return False
    per_type = [v for v in rope.values() if isinstance(v, dict)]  # rope parameters per layer type (Cohere Compass)
    return "mrope_section" in rope or any("mrope_section" in v for v in per_type)


def _hints(value: Any) -> list[tuple[int, int, int]] | None:
    """``(t, h, w)`` per row of a ``(n, 3)`` grid or ``(n, 2)`` size tensor (``t = 1``)."""
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[-1] not in (2, 3) or not value.numel():
        return None
    rows = value.long().tolist()
    return [tuple(r) if len(r) == 3 else (1, r[0], r[1]) for r in rows]  # type: ignore[misc]


def positional_hints(call: ImageCall, method: Any) -> list[tuple[int, int, int]] | None:
    """``(1, rows, cols)`` per image from layout arguments :meth:`GenericAdapter.image_layouts` reads by their place
    in ``get_image_features`` (``method``): ``image_position_ids`` ``(N, max_patches, 2)`` (Gemma 4: each patch's
    ``(x, y)``, ``-1`` on padding; an image's extent is ``1 +`` its largest ``y`` and ``x``) or ``target_sizes``
    ``(N, 2)`` (MiniCPM-V: each slice's ``(h, w)`` in patches, one image per slice); ``None`` where neither is given."""
    positions = call.argument("image_position_ids", method)
    if isinstance(positions, Tensor) and positions.dim() == 3 and positions.shape[-1] == 2 and positions.numel():
        extent = positions.long().clamp(min=0).amax(dim=1) + 1  # (N, 2): (x, y) extents; padding clamps to 0
        return [(1, int(y), int(x)) for x, y in extent.tolist()]
    return _hints(call.argument("target_sizes", method))


def grids_from_hints(hints: list[tuple[int, int, int]], counts: list[int]) -> list[tuple[int, int, int]] | None:
    """``(frames, rows, cols)`` per image: the hint divided by the one factor that makes every count fit.

    ``counts`` are the feature rows per returned tensor; one tensor for all images is split by the hints.
    ``None`` when no factor up to :data:`MAX_FACTOR` fits every image.
    """
    total = sum(counts)
    if len(counts) not in (1, len(hints)):
        return None
    for s in range(1, MAX_FACTOR + 1):
        if any(h % s or w % s for _, h, w in hints):
            continue
        grids = [(t, h // s, w // s) for t, h, w in hints]
        sizes = [t * r * c for t, r, c in grids]
        if (len(counts) == len(hints) and sizes == counts) or (len(counts) == 1 and sum(sizes) == total):
            return grids
    return None


def _layout(grid: tuple[int, int, int], image: int) -> TokenLayout:
    t, rows, cols = grid
    one = TokenLayout.grid(rows, cols, image=image)
    return TokenLayout.cat([one] * t) if t > 1 else one


def adapter_for(model: nn.Module, manager: Any) -> ModelAdapter:
    """The adapter that serves ``model``: the registered one for its ``model_type``, else the generic one.

    Raises:
        UnsupportedModelError: no adapter is registered and the model lacks the standard shape (the
            message names the model type and the reason).
        PluginError: several plugins registered the model type.
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    registry = manager.adapters
    if model_type in list(registry):
        return registry.get(model_type)(model)
    reason = refusal(model)
    if reason is not None:
        served = ", ".join(registry) or "none"
        raise UnsupportedModelError(
            f"no adapter supports model_type {model_type!r} and the generic adapter cannot serve it: {reason}. "
            f"Registered adapters: {served}. To add an architecture, write an adapter plugin "
            "(docs/extending/adapters.md)"
        )
    if takes_deepstack(language_model_of(base_model_of(model))):  # type: ignore[arg-type]
        return GenericDeepStackAdapter(model)
    return GenericAdapter(model)
