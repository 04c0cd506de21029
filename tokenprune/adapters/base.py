"""The adapter contract: what tokenprune must know about a model family to prune inside it.

An adapter is registered for one or more transformers ``model_type`` values (``config.model_type``
of the top-level model) through the ``tokenprune_register_adapters`` hook, so a new architecture is
a plugin like a new reducer. The engine (:mod:`tokenprune.engine`) asks the adapter for:

* the modules it hooks: the multimodal base model (:meth:`ModelAdapter.vlm`, which receives
  ``input_ids``), the language model (:meth:`ModelAdapter.language_model`, which receives the
  merged ``inputs_embeds``) and its decoder layers (:meth:`ModelAdapter.decoder_layers`);
* which sequence positions hold visual tokens (:meth:`ModelAdapter.visual_mask`);
* the spatial layout of every visual token, from the call to ``get_image_features`` that the model
  makes (:meth:`ModelAdapter.image_layouts`);
* how to turn position ids into rotary embeddings (:meth:`ModelAdapter.rotary`), and the position
  ids the unmodified model would use when a caller passes none during decoding
  (:meth:`ModelAdapter.decode_positions`).

Everything else (masks, caches, batching) is generic: the engine relies only on the call contract
that transformers 5 decoder layers share (``hidden_states``, ``attention_mask``,
``position_embeddings``, ``position_ids`` keyword arguments; a tensor returned).

A minimal adapter for a LLaVA-like model is a few lines::

    class MyAdapter(ModelAdapter):
        name = "my_vlm"
        model_types = ("my_vlm",)

        def image_layouts(self, call):
            return [TokenLayout.grid(24, 24) for _ in range(self.num_images(call))]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from tokenprune.layout import TokenLayout

if TYPE_CHECKING:
    from tokenprune.adapters.packed import PackedTower
    from tokenprune.engine.layer_args import LayerArg


@dataclass
class ImageCall:
    """One call of the model's ``get_image_features``, as recorded by the engine.

    Attributes:
        args: The call's positional arguments (after ``self``).
        kwargs: The call's keyword arguments.
        output: What it returned (a ``BaseModelOutputWithPooling`` in transformers 5, or a tensor).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any

    def arg(self, name: str, index: int, default: Any = None) -> Any:
        """The argument ``name`` whether passed by keyword or at position ``index``."""
        if name in self.kwargs:
            return self.kwargs[name]
        if index < len(self.args):
            return self.args[index]
        return default

    def argument(self, name: str, method: Any) -> Any:
        """The argument ``name``, by keyword or at its place in the signature of ``method`` (the bound method called:
        transformers' own forwards pass Gemma 4's ``image_position_ids`` and MiniCPM-V's ``target_sizes`` by
        place); ``None`` where the call did not pass it."""
        try:
            names = list(inspect.signature(method).parameters)
        except (TypeError, ValueError):
            names = []
        return self.arg(name, names.index(name)) if name in names else self.kwargs.get(name)

    def features(self) -> list[Tensor]:
        """Per-image projected features: a list of ``(n_i, D)`` tensors."""
        out = self.output
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and isinstance(out, (Tensor, list, tuple)):
            pooled = out
        if pooled is None:  # Fuyu: the projected patches are the last hidden state (there is no tower)
            pooled = getattr(out, "last_hidden_state", None)
        if pooled is None:
            return []
        if isinstance(pooled, Tensor):
            if pooled.dim() == 2:
                return [pooled]
            return list(pooled.unbind(0))
        return [p.reshape(-1, p.shape[-1]) for p in pooled]


@dataclass(frozen=True)
class VisionTower:
    """What the vision probe needs to know about a model's vision encoder.

    Attributes:
        name: How messages name the tower, e.g. ``"CLIPVisionModel"``.
        layers: The encoder layers in order (each holds its attention as ``self_attn``, ``attn`` or ``attention``).
        feature_layer: Index into ``layers`` (non-negative) of the layer whose output the model's image
            features are taken from (LLaVA's ``vision_feature_layer``): the default probed layer.
        has_cls: Position 0 of every tower sequence is a [CLS] token (CLIP); SigLIP and Qwen2-VL have none.
        notes: Where the default layer is not obvious, why it was chosen (Qwen2.5-VL's window attention).
        videos: The probe also watches the tower during ``get_video_features`` and the adapter maps those
            sequences to the video tokens (:meth:`ModelAdapter.map_vision_video_patches`); ``False``: video
            tokens get no vision attention, and a stage that reads it may not reduce them.
        video_layers: With ``videos``, the layers of a second tower that encodes the videos (Video-LLaVA's
            ``video_tower``), index for index as ``layers`` (the same architecture and feature layer); the probe
            watches them during ``get_video_features``. Empty (the default): the videos run through ``layers``.
    """

    name: str
    layers: tuple[nn.Module, ...]
    feature_layer: int
    has_cls: bool
    notes: str = ""
    videos: bool = False
    video_layers: tuple[nn.Module, ...] = ()


@dataclass
class VisualResiduals:
    """Features a language model adds to the hidden states of visual tokens after its first decoder layers.

    Qwen3-VL's DeepStack adds vision-tower features of intermediate layers to the visual positions'
    hidden states after decoder layers ``0, 1, ..., len(features) - 1``. The engine takes them out
    of the language model's call (:meth:`ModelAdapter.take_visual_residuals`) and adds them itself
    (:meth:`ModelAdapter.add_visual_residual`), so that they follow the kept and merged tokens.

    Attributes:
        mask: ``(B, L)`` bool, the positions of the language model's input that receive them.
        features: One ``(n, D)`` tensor per decoder layer, rows in the row-major order of ``mask``.
    """

    mask: Tensor
    features: list[Tensor]


class ModelAdapter:
    """Base class of model adapters; the defaults fit LLaVA-like models of transformers 5.

    One instance serves one model (``self.model``, the top-level ``...ForConditionalGeneration``).

    Attributes:
        name: A short name for listings, e.g. ``"llava_next"``.
        model_types: The ``config.model_type`` values this adapter handles.
        position_scheme: ``"rope"`` (1-D positions) or ``"mrope"`` (Qwen2-VL's 3-D positions).
        notes: One line shown in ``docs/adapters.md`` and listings (limits, semantics).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    position_scheme: ClassVar[str] = "rope"
    notes: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- modules --------------------------------------------------------------------------------

    def vlm(self) -> nn.Module:
        """The multimodal base model: receives ``input_ids`` and calls ``get_image_features``."""
        vlm = getattr(self.model, "model", None)
        if not isinstance(vlm, nn.Module):
            raise TypeError(
                f"{type(self.model).__name__} has no `.model` submodule; pass the top-level "
                "...ForConditionalGeneration model to tokenprune.apply"
            )
        return vlm

    def language_model(self) -> nn.Module:
        """The text decoder stack: receives ``inputs_embeds`` with the image features merged in."""
        return self.vlm().language_model

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers of :meth:`language_model`, in order."""
        return self.language_model().layers

    def text_config(self) -> Any:
        """The language model's config (read for the attention implementation and sliding windows)."""
        return self.language_model().config

    # --- visual tokens --------------------------------------------------------------------------

    def image_token_id(self) -> int:
        """The placeholder id that marks a visual token in ``input_ids``."""
        cfg = self.model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
        raise TypeError(f"{type(self.model).__name__}: the config has no image_token_id / image_token_index")

    def visual_mask(self, input_ids: Tensor) -> Tensor:
        """``(B, L)`` bool: the visual tokens of ``(B, L)`` ``input_ids``."""
        return input_ids == self.image_token_id()

    def image_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """One ``(1, n_i)`` :class:`TokenLayout` per image of the recorded ``get_image_features`` call.

        ``n_i`` must equal the number of sequence positions that :meth:`visual_mask` marks for image
        ``i``: its feature rows, plus any row-break tokens the mask counts as visual (Mistral3's
        ``[IMG_BREAK]``). The engine refuses layouts that do not cover the marked tokens exactly. The
        default lays each image out as a square grid when ``n_i`` is a square, else as one row.
        """
        layouts = []
        for i, feats in enumerate(call.features()):
            n = int(feats.shape[0])
            side = math.isqrt(n)
            if side * side == n:
                layouts.append(TokenLayout.grid(side, side, image=i))
            else:
                layouts.append(TokenLayout.grid(1, n, image=i))
        return layouts

    # --- vision attention ----------------------------------------------------------------------

    def vision_tower(self) -> VisionTower | None:
        """The vision encoder the vision probe reads (:class:`VisionTower`); ``None``: this adapter does not
        serve vision attention (the default), and a stage that needs it is refused at ``apply``."""
        return None

    def map_vision_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """Map per-position values of the vision tower to the post-projector visual tokens.

        The tower's sequences are the rows of its attention calls, in call order (one per tile or crop
        for CLIP/SigLIP towers, one per image or frame for Qwen2-VL). ``values[r]`` is ``(S_r, C)``:
        ``C`` channels for each position of sequence ``r`` (the CLS position included, where the tower
        has one). Return one ``(n_i, C)`` tensor per image of ``call``, row for row the image's
        post-projector tokens (as :meth:`image_layouts` orders them): each row the sum, with the
        weights of a mean, of the positions that token is built from, exactly as the model builds it
        (drop the CLS position when the model drops it, unpad and crop, 2x2 or pixel-shuffle groups,
        pooling, interpolation) and ``0`` for a token built from no position (a newline). The map must
        be linear in ``values``; the engine maps a coverage channel with the values and divides by it.

        The default, ``None``, says the adapter provides no mapping.
        """
        return None

    def map_vision_video_patches(self, call: ImageCall, values: list[Tensor]) -> list[Tensor] | None:
        """:meth:`map_vision_patches` for the recorded ``get_video_features`` call (``VisionTower.videos``).

        ``values`` holds the tower's sequences of that call (one per frame for CLIP towers); return one
        ``(n_v, C)`` tensor per video, row for row its tokens as :meth:`video_layouts` orders them, with the same
        rules (mean weights of the positions a token is built from, linear). The default, ``None``: no mapping.
        """
        return None

    # --- pre_projector stages ------------------------------------------------------------------

    pre_projector_refusal: ClassVar[str] = (
        "its adapter names no per-token projector (ModelAdapter.projector returns None)"
    )
    """Why this family cannot run a ``pre_projector`` stage, where :meth:`projector` returns ``None``."""

    def projector(self) -> nn.Module | None:
        """The multimodal projector a ``pre_projector`` stage runs before (:mod:`tokenprune.engine.pre_projector`).

        It must be a *per-token* projector called once per image call on the ``(M, P, Dv)`` selected features (one
        row per tower sequence, the rows :meth:`map_vision_patches` maps), each output token built from the input
        token at its place only (LLaVA's MLP). ``None`` (the default): the family runs no ``pre_projector`` stage,
        for the reason :attr:`pre_projector_refusal` gives (a projector that mixes tokens: Qwen2-VL's 2x2
        PatchMerger, a pixel shuffle, pooling).
        """
        return None

    def packed_tower(self) -> PackedTower | None:
        """The tower's description where it runs every image's patches as one packed sequence and its projector
        merges groups of patches (Qwen2-VL); ``pre_projector`` and ``vision_layer`` stages then reduce whole merge
        units (:mod:`tokenprune.adapters.packed`). ``None`` (the default): the projector is per token."""
        return None

    def video_token_id(self) -> int | None:
        """The placeholder id of a video token in ``input_ids`` (``None``: the model takes no videos)."""
        cfg = self.model.config
        for attr in ("video_token_id", "video_token_index"):
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
        return None

    def video_mask(self, input_ids: Tensor) -> Tensor:
        """``(B, L)`` bool: the video tokens of ``input_ids`` (none when the model takes no videos)."""
        token = self.video_token_id()
        if token is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token

    def video_layouts(self, call: ImageCall) -> list[TokenLayout]:
        """One ``(1, n_v)`` layout per video of the recorded ``get_video_features`` call, ``video`` set.

        The default lays each video's features out as :meth:`image_layouts` would (one frame); adapters
        of video models give each token its frame.
        """
        return [replace(lay, video=torch.ones_like(lay.newline)) for lay in ModelAdapter.image_layouts(self, call)]

    # --- positions ------------------------------------------------------------------------------

    def rotary(self, hidden: Tensor, positions: Tensor, layer_index: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` for ``positions`` as the model's rotary embedding computes them.

        Args:
            hidden: ``(B, L, D)`` hidden states (for dtype and device).
            positions: ``(R, B, L)`` position rows in the engine's normal form (``R = 1`` for 1-D
                RoPE; 3 or 4 for M-RoPE, see :mod:`tokenprune.engine.positions`).
            layer_index: The decoder layer the embedding is for (Gemma3 has per-layer-type RoPE).
        """
        return self.language_model().rotary_emb(hidden, positions[0])

    def layer_args(self) -> Mapping[str, LayerArg]:
        """How this family's per-token decoder-layer arguments follow a cut, beyond the engine's table.

        The engine's table (:data:`tokenprune.engine.layer_args.DEFAULT_LAYER_ARGS`) slices the 4-D
        ``attention_mask``, the rotary ``position_embeddings`` and the ``position_ids``; any other
        ``(B, L, ...)`` tensor argument is gathered along axis 1 by the generic default. Override to
        declare an argument the default would miss or mistreat, by name (positional arguments are named
        by the layer's signature): e.g. ``{"per_layer_input": LayerArg("columns")}``, a 2-D
        linear-attention mask ``LayerArg("padding_mask")``, a token axis other than 1
        ``LayerArg("columns", axis=2)``, ``LayerArg("recompute", recompute=fn)``, or ``KEEP`` for a tensor
        that only looks per token. The default declares nothing.
        """
        return {}

    def decode_positions(self, kwargs: dict[str, Any], virtual_past: int, query_length: int) -> Tensor:
        """Position ids the unmodified model would use in a decoding step that was given none.

        Args:
            kwargs: The keyword arguments of the base model's forward (``attention_mask`` is the
                caller's, over the unpruned sequence).
            virtual_past: Tokens before this step in the *unpruned* sequence.
            query_length: Tokens in this step.

        Returns:
            Position ids in the form the base model accepts (``(B, q)`` for 1-D RoPE).
        """
        batch = _batch_size(kwargs)
        device = _device(kwargs)
        pos = torch.arange(virtual_past, virtual_past + query_length, device=device)
        return pos.unsqueeze(0).expand(batch, -1)

    # --- per-layer visual features (DeepStack) ------------------------------------------------

    def take_visual_residuals(self, kwargs: dict[str, Any]) -> VisualResiduals | None:
        """Take the per-layer visual features out of the language model's prefill keyword arguments.

        Called by the engine on the language model's ``kwargs`` in a prefill it prunes; an adapter
        whose model adds visual features inside the decoder stack (Qwen3-VL's DeepStack) removes
        them from ``kwargs`` (in place) and returns them, and the engine adds them after the same
        layers with :meth:`add_visual_residual`. The default: the model has none.
        """
        return None

    def add_visual_residual(self, hidden: Tensor, mask: Tensor, features: Tensor, layer_index: int) -> Tensor:
        """``hidden`` (``(B, L, D)``) plus ``features`` (``(n, D)``) at the ``(B, L)`` ``mask``, as the model does.

        The default adds them to a copy in the hidden states' dtype; Qwen3-VL's adapter calls the model's own function.
        """
        out = hidden.clone()
        out[mask] = out[mask] + features.to(hidden.device, hidden.dtype)
        return out


def _batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            return int(value.shape[0])
    return 1


def _device(kwargs: dict[str, Any]) -> torch.device:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")
