"""The reducer contract: what a token-reduction method receives and what it must return.

A reducer is a class with a registry ``name`` (the name used in YAML pipelines), a pydantic
``Params`` model, a :class:`Capabilities` declaration and one method, :meth:`TokenReducer.reduce`.
Given the visual tokens present at an insertion point, it returns either

* a :class:`Selection`: which tokens survive, per sample (samples may keep different counts), or
* a :class:`Merge`: which tokens combine into which, so that the engine replaces each group by its
  size-weighted mean and carries the summed sizes forward to later stages (ToMe).

Most methods only rank tokens. They subclass :class:`ScoringReducer` and write ``score()``; the base
class turns scores into a top-k selection under the stage's budget, keeping protected tokens.

The core checks every result against this contract (:func:`tokenprune.validation.check_reduction`)
and raises :class:`tokenprune.errors.ReducerOutputError` naming the plugin and the defect.

Batches are padded: ``tokens`` is ``(B, N, D)`` where ``N`` is the largest visual-token count in
the batch and ``ctx.valid`` marks the real tokens of each sample. A reducer must give each sample
the same result whether it runs alone or in a batch (the engine's invariant 5).

Papers implemented as built-in plugins: FastV (https://arxiv.org/abs/2403.06764), G-Prune
(https://arxiv.org/abs/2501.02268), ToMe (https://arxiv.org/abs/2210.09461), ATP-LLaVA
(https://arxiv.org/abs/2412.00447).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, ClassVar, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenprune.budget import budget_per_sample
from tokenprune.errors import ReducerInputError, ReducerOutputError
from tokenprune.layout import TokenLayout

InsertionKind = Literal["vision_layer", "pre_projector", "post_projector", "layer", "decode"]
"""``vision_layer``: between two layers of the vision tower, on each tower sequence's patch tokens
(:mod:`tokenprune.engine.vision_layer`). ``pre_projector``: on the vision tower's selected features, per tower
sequence (image, crop), before the multimodal projector (:mod:`tokenprune.engine.pre_projector`).
``post_projector``: after the multimodal projector, before the LLM. ``layer``: between two decoder layers.
``decode``: between two decoder layers at every decoding step, over the KV cache."""

AttentionSource = Literal["last", "text", "visual", "all"]
"""Which query rows of the attention probe are averaged: the last token's row (FastV's official
code), the text tokens', the visual tokens', or every token's (FastV's paper)."""

VisionAttentionKind = Literal["cls", "mean"]
"""Which vision-encoder attention a ``post_projector`` stage reads (:attr:`Capabilities.vision_attention`):
``cls``, the attention the tower's [CLS] query pays to each patch (towers with a CLS token: CLIP);
``mean``, the attention each patch receives, averaged over heads and over the patch query rows."""

ContextSignal = Literal["keys", "final_norm", "text_attention", "input_embeddings"]
BUILTIN_SIGNALS: frozenset[str] = frozenset(get_args(ContextSignal))  # the rest of ``signals`` names channels
"""Extra inputs a layer stage at ``{layer: k}`` may ask for (:attr:`Capabilities.signals`): ``keys``,
the keys of decoder layer ``k - 1`` (after RoPE and k-norms, one row per token, heads concatenated);
``final_norm``, the language model's final norm as a callable; ``text_attention``, every text row of
layer ``k - 1``'s attention to the visual tokens (not averaged over rows); ``input_embeddings``, the
language model's input embeddings (:class:`InputEmbeddings`)."""


@dataclass(frozen=True)
class InsertionPoint:
    """Where a stage runs.

    ``InsertionPoint("pre_projector")`` runs once on the vision tower's selected features, one row per tower
    sequence (an image, an anyres crop), before the multimodal projector: what it keeps or merges goes through the
    model's own projector and the language model receives only the kept tokens.
    ``InsertionPoint("vision_layer", k)`` runs between vision-tower layers ``k - 1`` and ``k`` on each tower
    sequence's patch tokens (the [CLS] token kept aside); the tokens it keeps or merges run through the tower's
    remaining layers (merged ones with ToMe's size-weighted attention).
    ``InsertionPoint("post_projector")`` runs once on the projected visual features before the LLM.
    ``InsertionPoint("layer", k)`` runs on the hidden states between decoder layers ``k - 1`` and
    ``k`` (so ``k >= 1``); the attention probe, if a reducer needs it, comes from layer ``k - 1``.
    ``InsertionPoint("decode", k)`` runs at every decoding step after the prefill, between decoder
    layers ``k - 1`` and ``k``, on the visual tokens held in the KV cache: the tokens are layer
    ``k - 1``'s cached keys, the attention is the step's last query row at layer ``k - 1``, and what
    the reducer drops is left out of the attention of layers ``k`` onwards *for that step only* (the
    cache keeps every token; DyCoke's dynamic pruning, https://arxiv.org/abs/2411.15024).
    """

    kind: InsertionKind
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind in ("pre_projector", "post_projector") and self.layer is not None:
            raise ValueError(f"InsertionPoint({self.kind!r}) takes no layer")
        if self.kind in ("vision_layer", "layer", "decode") and (self.layer is None or self.layer < 1):
            raise ValueError(f"InsertionPoint({self.kind!r}, k) needs k >= 1 (got {self.layer})")

    def __str__(self) -> str:
        if self.kind in ("pre_projector", "post_projector"):
            return self.kind
        if self.kind == "vision_layer":
            return f"vision layer {self.layer}"
        return f"layer {self.layer}" if self.kind == "layer" else f"decode layer {self.layer}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward-pass order: pre_projector, post_projector, then layers by index, then decode stages."""
        if self.kind == "vision_layer":
            return (-2, int(self.layer))  # type: ignore[arg-type]
        if self.layer is None:
            return (-1, 0) if self.kind == "pre_projector" else (0, 0)
        return (1, self.layer) if self.kind == "layer" else (2, self.layer)


Media = Literal["image", "video"]
"""Which visual tokens a reducer reduces (:attr:`Capabilities.media`)."""


@dataclass(frozen=True)
class VisionAttentionRequest:
    """The vision-encoder attention one stage reads: its kind and the tower layer it is taken at.

    Attributes:
        kind: ``cls`` or ``mean`` (:data:`VisionAttentionKind`).
        layer: Index into the vision tower's encoder layers (negative counts from the end, ``-1`` the
            last); ``None``: the layer the model takes its image features from (the adapter's
            :attr:`~tokenprune.adapters.base.VisionTower.feature_layer`, e.g. LLaVA's
            ``vision_feature_layer``).
        features: Also serve ``ctx.vision_features``, the tower's hidden states output by that layer
            (the pre-projector features where it is the features layer).
        keys: Also serve ``ctx.vision_keys``, that layer's attention keys averaged over heads.
        also_at: Further tower layers (indices as ``layer``) whose attention of the same kind is served as
            ``ctx.vision_attention_at[layer]`` (HiPrune reads a middle layer's and the features layer's).
    """

    kind: VisionAttentionKind
    layer: int | None = None
    features: bool = False
    keys: bool = False
    also_at: tuple[int, ...] = ()


@dataclass(frozen=True)
class Capabilities:
    """What a reducer needs and supports; the pipeline is validated against it before a model runs.

    Attributes:
        insertion_points: The insertion kinds the reducer can run at.
        attention: Attention-probe sources the reducer reads by default (empty: none). The engine
            computes them under the model's sdpa attention, only at the layers that need them.
            A reducer whose needs depend on its params overrides
            :meth:`TokenReducer.attention_sources_for`.
        own_attention: Attention sources the reducer reads from the stage's *own* layer ``k`` (empty:
            none): the attention that layer ``k`` would compute on the hidden states entering it,
            before it runs (its input norm, q/k projections, q/k norms, RoPE and grouped heads), as
            PyramidDrop ranks. Params-dependent needs override
            :meth:`TokenReducer.own_attention_sources_for`. Layer stages only.
        signals: Extra inputs the reducer reads: the engine's own layer-stage signals
            (:data:`ContextSignal`; layer stages only), and the names of registered signal channels
            (:class:`tokenprune.channels.SignalChannel`), served as ``ctx.signals``.
        needs_text: Reads the text tokens at the insertion point (``ctx.text``).
        trainable: Carries learned weights (ATP).
        deterministic_count: Keeps exactly the stage's budget for every input, so the token count
            is known before the model runs (what serving engines such as vLLM need). Adaptive
            reducers set it to False and may keep fewer tokens than the budget.
        merges: May return a :class:`Merge` rather than a :class:`Selection`.
        vision_attention: The vision-encoder attention kinds the reducer may read at ``post_projector``
            (:data:`VisionAttentionKind`; empty: none). The engine serves the one that
            :meth:`TokenReducer.vision_attention_for` asks for as ``ctx.vision_attention``.
        media: The visual tokens the reducer reduces: ``image``, ``video`` or both. A video-only reducer
            (DyCoke's temporal merging) keeps every image token, so an image comparison leaves it out.
    """

    insertion_points: frozenset[InsertionKind] = frozenset({"post_projector", "layer"})
    attention: frozenset[AttentionSource] = frozenset()
    own_attention: frozenset[AttentionSource] = frozenset()
    signals: frozenset[ContextSignal | str] = frozenset()
    needs_text: bool = False
    trainable: bool = False
    deterministic_count: bool = True
    merges: bool = False
    vision_attention: frozenset[VisionAttentionKind] = frozenset()
    media: frozenset[Media] = frozenset({"image", "video"})

    @property
    def needs_attention(self) -> bool:
        """True when the reducer reads attention scores by default."""
        return bool(self.attention)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, as printed by ``tokenprune plugins --json``."""
        return {
            "insertion_points": sorted(self.insertion_points),
            "needs_attention": self.needs_attention,
            "attention": sorted(self.attention),
            "own_attention": sorted(self.own_attention),
            "signals": sorted(self.signals),
            "needs_text": self.needs_text,
            "trainable": self.trainable,
            "deterministic_count": self.deterministic_count,
            "merges": self.merges,
            "vision_attention": sorted(self.vision_attention),
            "media": sorted(self.media),
        }


@dataclass(frozen=True)
class Requirements:
    """What one stage's reducer reads, for its params (:meth:`TokenReducer.requirements`).

    Validation, the engine's install plan (which layers to probe, which signals to compute) and the
    FLOP count read this one object.

    Attributes:
        attention: Attention-probe sources read at layer ``k - 1`` (``ctx.attention``).
        own_attention: Sources read from the stage's own layer ``k`` (``ctx.own_attention``).
        signals: The engine's signals (:data:`ContextSignal`) and registered signal channels read.
        text: Reads the text tokens (``ctx.text``).
        vision_attention: The vision-encoder attention read at ``post_projector`` (``None``: none).
    """

    attention: frozenset[AttentionSource] = frozenset()
    own_attention: frozenset[AttentionSource] = frozenset()
    signals: frozenset[str] = frozenset()
    text: bool = False
    vision_attention: VisionAttentionRequest | None = None

    @property
    def channels(self) -> frozenset[str]:
        """The registered signal channels among :attr:`signals` (the names that are not the engine's own)."""
        return self.signals - BUILTIN_SIGNALS

    @property
    def reads_attention(self) -> bool:
        """Reads any attention of the language model (probe or own layer)."""
        return bool(self.attention or self.own_attention)


Share = Annotated[float, Field(ge=0.0, le=1.0)]
"""The type of a reducer param that is a share of something, in ``[0, 1]`` (VisionZip's ``contextual_ratio``):
``ratio: Share = Field(default=0.5, description=...)``; a value outside is refused naming the stage and the field."""


class ReducerParams(BaseModel):
    """Base of every reducer's ``Params``: unknown fields are rejected, values are immutable.

    Document each field with ``Field(description=...)``: the description feeds the docs, the
    pipeline JSON schema and ``tokenprune plugins``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionSourceParams(ReducerParams):
    """The param of a reducer that ranks the tokens by the language model's attention they receive: whose rows.

    FastV reads it at layer ``k - 1`` (``Requirements(attention=...)``), PyramidDrop at the stage's own layer
    (``Requirements(own_attention=...)``).
    """

    source: AttentionSource = Field(
        default="last",
        description="Whose attention ranks the tokens, averaged over heads: 'last' = the last token's row (the "
        "official code's), 'all' = every real token's rows, 'text' or 'visual' = those tokens' rows.",
    )


class VisionAttentionParams(ReducerParams):
    """The params every vision-attention reducer takes: which attention, at which vision-encoder layer.

    Subclass it for a reducer that reads ``ctx.vision_attention``: :meth:`TokenReducer.requirements` then asks for
    :meth:`vision_request` by default. Override :meth:`vision_request` where the params also ask for the layer's
    keys or features, or for other layers (VisionZip's ``similarity: keys``).
    """

    attention: VisionAttentionKind = Field(
        default="cls",
        description="Vision attention to rank by: the [CLS] query's row ('cls', as FasterVLM and VisPruner) or the "
        "attention each patch receives, averaged over patch queries ('mean', for towers without CLS).",
    )
    layer: int | None = Field(
        default=None,
        description="Vision-encoder layer the attention (and any features) are read at: an index into the tower's "
        "layers, negative from the end; null: the layer the model takes its image features from.",
    )

    def vision_request(self, **more: Any) -> VisionAttentionRequest:
        """The :class:`VisionAttentionRequest` of :attr:`attention` at :attr:`layer`; ``more`` sets its other
        fields (``features``, ``keys``, ``also_at``)."""
        return VisionAttentionRequest(self.attention, self.layer, **more)


def _default_vision_request(kinds: frozenset[str], params: ReducerParams) -> VisionAttentionRequest | None:
    """The vision attention a reducer reads by default: none where ``kinds`` is empty, else what its
    :class:`VisionAttentionParams` ask for, else ``cls`` (``mean`` where ``kinds`` lacks it) at the features layer."""
    if not kinds:
        return None
    if isinstance(params, VisionAttentionParams):
        return params.vision_request()
    return VisionAttentionRequest("cls" if "cls" in kinds else "mean")


@dataclass(frozen=True)
class InputEmbeddings:
    """The language model's input embeddings (after any post_projector stage), for a layer stage.

    A layer stage sees the hidden states at its layer; a method that decides on the embeddings the
    language model received (SparseVLM's text raters) reads them here. ``N0`` counts the visual
    tokens of the language model's input, which earlier layer stages may have reduced to ``N``.

    Attributes:
        visual: ``(B, N0, D)`` the visual tokens' input embeddings, in sequence order (padding: arbitrary).
        visual_valid: ``(B, N0)`` bool mask of ``visual``.
        visual_columns: ``(B, N0)`` long, each visual token's column in the language model's input
            (``-1`` at padding).
        text: ``(B, T, D)`` the input embeddings of the stage's text tokens, row for row as in
            :attr:`ReduceContext.text` (padding: arbitrary).
        text_columns: ``(B, T)`` long, their columns in the language model's input (``-1`` at padding).
    """

    visual: Tensor
    visual_valid: Tensor
    visual_columns: Tensor
    text: Tensor
    text_columns: Tensor

    def sample(self, i: int) -> InputEmbeddings:
        """Sample ``i`` alone, its visual padding cut off (one host read)."""
        n0 = int(self.visual_valid[i].sum())
        return InputEmbeddings(
            visual=self.visual[i : i + 1, :n0],
            visual_valid=self.visual_valid[i : i + 1, :n0],
            visual_columns=self.visual_columns[i : i + 1, :n0],
            text=self.text[i : i + 1],
            text_columns=self.text_columns[i : i + 1],
        )

    def to(self, device: torch.device | str) -> InputEmbeddings:
        """A copy on ``device``."""
        return InputEmbeddings(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class ReduceContext:
    """Everything a reducer may read besides the tokens themselves.

    Shapes use ``B`` (batch), ``N`` (visual tokens, padded to the batch maximum), ``T`` (text
    tokens, padded) and ``D`` (feature size).

    Attributes:
        at: The insertion point of this stage.
        budget: ``(B,)`` long. How many tokens each sample keeps, protected tokens included
            (never more than the sample's valid tokens; at least its protected tokens).
        valid: ``(B, N)`` bool. Real tokens; False at padding. Each sample's tokens come first
            (padding only at the end of a row), in the order they have in the sequence.
        protected: ``(B, N)`` bool. Tokens that must be kept and never merged into others
            (e.g. LLaVA-NeXT's row-end newline tokens when the pipeline protects them).
        sizes: ``(B, N)`` float. How many original tokens each token stands for (1 until a
            :class:`Merge` combined some).
        layout: Provenance of each token, when the adapter knows it.
        attention: Source name to ``(B, N)`` float: attention paid to each visual token at layer
            ``k - 1``, averaged over heads and over the source's query rows. Filled with the sources
            of :meth:`TokenReducer.attention_sources`; empty otherwise.
        text: ``(B, T, D)`` text-token features at the insertion point (only if ``needs_text``).
        text_valid: ``(B, T)`` bool mask of ``text``.
        stage_index: Index of the stage in its pipeline (for messages and per-stage seeding).
        keep: The stage's ``keep`` as written in the pipeline, which ``budget`` came from (through
            :meth:`TokenReducer.stage_budget`); ``None`` in contexts built by hand. For a reducer
            whose own budget rule needs it again in ``reduce`` (G-Prune's ``budget: official``).
        own_attention: Source name to ``(B, N)`` float: like ``attention``, but computed with the
            stage's own layer ``k`` on the hidden states entering it (the sources of
            :meth:`TokenReducer.own_attention_sources`); empty otherwise.
        keys: ``(B, N, Dk)`` keys of layer ``k - 1`` for the visual tokens (after RoPE and any
            k-norm, the key heads concatenated: ``Dk = num_key_value_heads * head_dim``); only if
            ``"keys"`` is in ``capabilities.signals``.
        text_keys: ``(B, T, Dk)`` the same for the text tokens (``"keys"`` and ``needs_text``).
        final_norm: The language model's final norm (``(..., D) -> (..., D)``), only if
            ``"final_norm"`` is in ``capabilities.signals``.
        columns: ``(B, N)`` long, each visual token's column in the sequence at the insertion point
            (``-1`` at padding): the order of visual and text tokens. Filled by the engine.
        text_columns: ``(B, T)`` long, the same for ``text`` (only if ``needs_text``).
        text_attention: ``(B, T, N)`` float32, the attention each text token (the rows of ``text``)
            pays to each visual token at layer ``k - 1``, averaged over heads only (``0`` at padding
            rows and columns); only if ``"text_attention"`` is in ``capabilities.signals`` and
            ``needs_text``.
        input_embeddings: The language model's input embeddings (:class:`InputEmbeddings`); only if
            ``"input_embeddings"`` is in ``capabilities.signals`` and ``needs_text``.
        vision_attention: ``(B, N)`` float32, the vision-encoder attention of each visual token (the
            kind and tower layer of :meth:`TokenReducer.vision_attention_for`; a token built from several
            patches holds the mean of their scores); only at ``post_projector`` for a reducer that asks
            for it. ``-inf`` where :attr:`vision_valid` is False, so a top-k never picks those first.
        vision_valid: ``(B, N)`` bool, the tokens that come from vision patches: False at padding and
            at tokens built from no patch (LLaVA-NeXT's row-end newlines).
        vision_features: ``(B, N, Dv)`` the vision tower's hidden states at the probed layer, averaged
            like the scores (pre-projector features; ``0`` where ``vision_valid`` is False); only for a
            reducer whose request sets ``features`` (VisPruner).
        vision_keys: ``(B, N, hd)`` that layer's attention keys, averaged over heads and like the scores;
            only for a reducer whose request sets ``keys`` (VisionZip).
        signals: Signal-channel name to ``(B, N, *shape)``: the registered channels
            (:mod:`tokenprune.channels`) that ``capabilities.signals`` names, at the visual tokens
            (``0`` at padding); empty otherwise.
        vision_attention_at: Tower layer (as written in the request's ``also_at``) to ``(B, N)`` float32 scores
            like :attr:`vision_attention`, at that layer; empty unless the request asks.
        step: At a ``decode`` stage, the decoding step after the prefill (``0`` for the first token
            generated after it); ``None`` at the other insertion points. A reducer that keeps state
            from step to step (DyCoke) starts afresh at ``0``.
    """

    at: InsertionPoint
    budget: Tensor
    valid: Tensor
    protected: Tensor
    sizes: Tensor
    layout: TokenLayout | None = None
    attention: Mapping[str, Tensor] = field(default_factory=dict)
    text: Tensor | None = None
    text_valid: Tensor | None = None
    stage_index: int = 0
    keep: float | int | None = None
    own_attention: Mapping[str, Tensor] = field(default_factory=dict)
    keys: Tensor | None = None
    text_keys: Tensor | None = None
    final_norm: Callable[[Tensor], Tensor] | None = None
    columns: Tensor | None = None
    text_columns: Tensor | None = None
    text_attention: Tensor | None = None
    input_embeddings: InputEmbeddings | None = None
    vision_attention: Tensor | None = None
    vision_valid: Tensor | None = None
    vision_features: Tensor | None = None
    vision_keys: Tensor | None = None
    step: int | None = None
    signals: Mapping[str, Tensor] = field(default_factory=dict)
    vision_attention_at: Mapping[int, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def num_valid(self) -> Tensor:
        """``(B,)`` long: real tokens per sample."""
        return self.valid.sum(1)

    def sample(self, i: int) -> ReduceContext:
        """Sample ``i`` alone, its padding tokens cut off: what a batch of one would give the reducer (padding holds
        zero attention and zero signals, so each value is unchanged). Every field is cut by its kind
        (:data:`CONTEXT_FIELDS`); one host read."""
        n = int(self.valid[i].sum())
        return replace(
            self, **{f.name: _sample_of(getattr(self, f.name), CONTEXT_FIELDS[f.name], i, n) for f in fields(self)}
        )

    def to(self, device: torch.device | str) -> ReduceContext:
        """A copy with every tensor (in mappings, the layout and the input embeddings too) on ``device``."""
        return replace(self, **{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})


#: How each field of :class:`ReduceContext` belongs to the samples, for :meth:`ReduceContext.sample`: ``"tokens"``,
#: ``(B, N, ...)`` (or a mapping of such tensors); ``"rows"``, ``(B, ...)`` per sample; ``"text_by_tokens"``,
#: ``(B, T, N)``; ``"own"``, an object with its own ``sample`` (the layout, the input embeddings); ``None``, the same
#: for every sample. A field added to the context must be listed here (a test checks).
CONTEXT_FIELDS: dict[str, str | None] = {
    "at": None,
    "budget": "rows",
    "valid": "tokens",
    "protected": "tokens",
    "sizes": "tokens",
    "layout": "own",
    "attention": "tokens",
    "text": "rows",
    "text_valid": "rows",
    "stage_index": None,
    "keep": None,
    "own_attention": "tokens",
    "keys": "tokens",
    "text_keys": "rows",
    "final_norm": None,
    "columns": "tokens",
    "text_columns": "rows",
    "text_attention": "text_by_tokens",
    "input_embeddings": "own",
    "vision_attention": "tokens",
    "vision_valid": "tokens",
    "vision_features": "tokens",
    "vision_keys": "tokens",
    "step": None,
    "signals": "tokens",
    "vision_attention_at": "tokens",
}


def _sample_of(value: Any, kind: str | None, i: int, n: int) -> Any:
    """``value``, a field of the given kind (:data:`CONTEXT_FIELDS`), for sample ``i`` of ``n`` real tokens."""
    if value is None or kind is None:
        return value
    if isinstance(value, Mapping):
        return {key: _sample_of(v, kind, i, n) for key, v in value.items()}
    if kind == "tokens":
        return value[i : i + 1, :n]
    if kind == "text_by_tokens":
        return value[i : i + 1, :, :n]
    if kind == "own":
        return value.sample(i, n) if isinstance(value, TokenLayout) else value.sample(i)
    return value[i : i + 1]


def _moved(value: Any, device: torch.device | str) -> Any:
    """``value`` with its tensors on ``device`` (a tensor, a mapping of them, or an object with ``to``)."""
    if isinstance(value, Mapping):
        return {key: v.to(device) for key, v in value.items()}
    if isinstance(value, (Tensor, TokenLayout, InputEmbeddings)):
        return value.to(device)
    return value


@dataclass(frozen=True)
class Selection:
    """The tokens each sample keeps.

    Attributes:
        indices: ``(B, K)`` long, ``K = counts.max()``. Row ``b`` holds the kept token indices of
            sample ``b`` in strictly increasing order in its first ``counts[b]`` entries, and ``-1``
            after them.
        counts: ``(B,)`` long. Tokens kept per sample.
    """

    indices: Tensor
    counts: Tensor

    @classmethod
    def from_mask(cls, keep: Tensor, *, most: int | None = None) -> Selection:
        """Build from a ``(B, N)`` bool mask of kept tokens.

        Args:
            keep: The kept tokens.
            most: ``counts.max()`` where the caller has read it already (saves a host read).
        """
        if keep.dtype != torch.bool or keep.dim() != 2:
            raise TypeError(f"Selection.from_mask needs a (B, N) bool mask, got {keep.dtype} {tuple(keep.shape)}")
        b, n = keep.shape
        counts = keep.sum(1)
        position = torch.arange(n, device=keep.device).expand(b, n)
        order = torch.where(keep, position, position + n).sort(dim=1).values
        k = most if most is not None else int(counts.max()) if b else 0
        indices = order[:, :k]
        indices = torch.where(indices < n, indices, torch.full_like(indices, -1))
        return cls(indices=indices, counts=counts)

    @classmethod
    def from_lists(cls, rows: list[Tensor] | list[list[int]], device: torch.device | str | None = None) -> Selection:
        """Build from one sequence of kept indices per sample (sorted by this method)."""
        tensors = [torch.as_tensor(r, dtype=torch.long, device=device).flatten().sort().values for r in rows]
        counts = torch.tensor([t.numel() for t in tensors], dtype=torch.long, device=device)
        k = int(counts.max()) if tensors else 0
        indices = torch.full((len(tensors), k), -1, dtype=torch.long, device=device)
        for i, t in enumerate(tensors):
            indices[i, : t.numel()] = t
        return cls(indices=indices, counts=counts)

    @classmethod
    def all(cls, valid: Tensor) -> Selection:
        """Keep every valid token of a ``(B, N)`` validity mask."""
        return cls.from_mask(valid.bool())

    def to_mask(self, num_tokens: int) -> Tensor:
        """``(B, N)`` bool mask of the kept tokens."""
        b = self.indices.shape[0]
        mask = torch.zeros(b, num_tokens + 1, dtype=torch.bool, device=self.indices.device)
        mask.scatter_(1, torch.where(self.indices < 0, num_tokens, self.indices), True)
        return mask[:, :num_tokens]

    def tolist(self) -> list[list[int]]:
        """Kept indices per sample as plain lists."""
        rows, counts = self.indices.tolist(), self.counts.tolist()  # two host reads, whatever the batch size
        return [row[:c] for row, c in zip(rows, counts, strict=True)]


@dataclass(frozen=True)
class Merge:
    """Which tokens combine, ToMe-style.

    Attributes:
        destination: ``(B, N)`` long. For every token, the index of the token it is merged into.
            A token that survives (a *root*) maps to itself; a root's group is every token mapping
            to it. Groups do not chain: the destination of a token is always a root. ``-1`` drops
            a token: it neither survives nor contributes to any group (for a sample whose budget
            leaves nothing to merge into). Padding entries are ignored.

    The output of a stage holds the roots in increasing index order; each is the size-weighted mean
    of its group (:meth:`apply`), its size the sum of the group's sizes, its position the root's.
    """

    destination: Tensor
    combine: Literal["mean", "root_plus_mean"] = "mean"
    """How a group becomes one token: ``mean``, the size-weighted mean of the group (the default, ToMe's);
    ``root_plus_mean``, the root plus the size-weighted mean of the other members (the root alone where it has
    none): VisionZip's official contextual tokens, ``target + mean(assigned)``."""
    weights: Tensor | None = None
    """``(B, N)`` float, non-negative: each token's weight in its group's ``mean`` in place of its size (a
    method's own combination, e.g. HoliTom's ``beta * center + (1 - beta) * mean(assigned)``); a group's weights
    need not sum to one (the mean divides by their sum), the merged sizes are still the sums of the sizes.
    ``None`` (the default): the sizes. Only with ``combine: mean``."""

    @property
    def roots(self) -> Tensor:
        """``(B, N)`` bool: tokens that survive."""
        n = self.destination.shape[1]
        return self.destination == torch.arange(n, device=self.destination.device)

    def selection(self, valid: Tensor) -> Selection:
        """The surviving tokens as a :class:`Selection`."""
        return Selection.from_mask(self.roots & valid)

    def apply(self, x: Tensor, sizes: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Selection]:
        """Merge ``x`` (``(B, N, D)``) with token ``sizes`` (``(B, N)``).

        Returns ``(merged, merged_sizes, selection)``: ``(B, K, D)`` size-weighted means (or, with
        ``combine: root_plus_mean``, each root plus the mean of its other members), ``(B, K)`` summed sizes,
        and the roots as a selection. The mean is computed in float32 and cast back.
        """
        b, n, d = x.shape
        dropped = self.destination < 0
        w = (sizes * (valid & ~dropped)).float()
        own = torch.arange(n, device=x.device).expand(b, n)
        dest = torch.where(valid & ~dropped, self.destination, own)  # dropped tokens: weight 0 on themselves
        den = torch.zeros(b, n, dtype=torch.float32, device=x.device).scatter_add_(1, dest, w)
        sel = self.selection(valid)
        safe = sel.indices.clamp(min=0)
        merged_sizes = den.gather(1, safe)
        if self.weights is not None:
            w = (self.weights.float() * (valid & ~dropped)).to(w.device)
            den = torch.zeros_like(den).scatter_add_(1, dest, w)
        num = torch.zeros(b, n, d, dtype=torch.float32, device=x.device)
        num.scatter_add_(1, dest.unsqueeze(-1).expand(b, n, d), x.float() * w.unsqueeze(-1))
        merged_den = den.gather(1, safe)
        merged_num = num.gather(1, safe.unsqueeze(-1).expand(-1, -1, d))
        if self.combine == "root_plus_mean":
            root = x.float().gather(1, safe.unsqueeze(-1).expand(-1, -1, d))
            root_w = w.gather(1, safe).unsqueeze(-1)
            rest_w = merged_den.unsqueeze(-1) - root_w
            merged = root + (merged_num - root * root_w) / rest_w.clamp(min=1e-12) * (rest_w > 1e-12)
        else:
            merged = merged_num / merged_den.clamp(min=1e-12).unsqueeze(-1)
        pad = sel.indices < 0
        merged = merged.masked_fill(pad.unsqueeze(-1), 0.0).to(x.dtype)
        return merged, merged_sizes.masked_fill(pad, 0.0).to(sizes.dtype), sel


Reduction = Selection | Merge


class TokenReducer(ABC):
    """Base class of every token-reduction method.

    Subclasses set three class attributes and implement :meth:`reduce`::

        class KeepFirst(TokenReducer):
            \"\"\"Keep the first tokens (a toy).\"\"\"
            name = "keep_first"
            capabilities = Capabilities(insertion_points=frozenset({"post_projector"}))

            def reduce(self, tokens, ctx):
                n = tokens.shape[1]
                return Selection.from_mask(torch.arange(n) < ctx.budget[:, None])

    and register the class from a plugin's ``tokenprune_register_reducers`` hook.

    Attributes:
        name: Registry name, used as ``reducer:`` in pipelines. Lower case, digits and ``_``.
        Params: A :class:`ReducerParams` subclass; a stage's ``params:`` are validated against it.
        capabilities: What the reducer needs and supports.
        params: The validated parameters of this instance.
    """

    name: ClassVar[str]
    Params: ClassVar[type[ReducerParams]] = ReducerParams
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, params: ReducerParams | Mapping[str, Any] | None = None) -> None:
        if params is None:
            params = {}
        if isinstance(params, ReducerParams):
            if not isinstance(params, self.Params):
                raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, got {type(params).__name__}")
            self.params = params
        else:
            self.params = self.Params.model_validate(dict(params))

    @abstractmethod
    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection | Merge:
        """Decide which visual tokens survive.

        Args:
            tokens: ``(B, N, D)`` visual tokens at the insertion point: post-projector features, or
                hidden states at a layer. Padded positions (``~ctx.valid``) hold arbitrary values.
                Must not be modified in place (they may be a view of the model's hidden states).
            ctx: Budget, masks, layout and probe outputs; see :class:`ReduceContext`.

        Returns:
            A :class:`Selection` keeping at most ``ctx.budget[b]`` tokens of sample ``b`` (exactly
            that many if ``capabilities.deterministic_count``) and every protected token, or, if
            ``capabilities.merges``, a :class:`Merge` whose roots obey the same rule.
        """

    def stage_budget(self, keep: float | int, valid: Tensor, protected: Tensor, layout: TokenLayout | None) -> Tensor:
        """``(B,)`` long: how many tokens each sample of a stage with this reducer keeps (``ctx.budget``).

        The default is :func:`tokenprune.budget.budget_per_sample`: ``keep`` of the valid tokens,
        protected tokens counted in it. A reducer whose method defines its count differently
        overrides it (FastV's ``rounding: nearest``, G-Prune's ``budget: official``, which keeps
        every newline token on top of a ratio of each graph). The count still depends only on
        ``keep``, the params and the token layout, so it is known before the model runs, and the
        engine checks it (at least the protected tokens, at most the valid ones) before ``reduce``
        sees it.

        Args:
            keep: The stage's ``keep``: a fraction in ``(0, 1]`` or a count ``>= 1``.
            valid: ``(B, N)`` bool, the real tokens (as ``ctx.valid``).
            protected: ``(B, N)`` bool, the tokens that must be kept (as ``ctx.protected``).
            layout: The tokens' provenance (as ``ctx.layout``), or ``None``.
        """
        return budget_per_sample(keep, valid, protected)

    def bind(self, model: torch.nn.Module, at: InsertionPoint) -> None:
        """Check this instance against the model it is about to run in; the default accepts any.

        :func:`tokenprune.apply` calls it once per stage, after the pipeline and its layers are
        validated and before any hook is installed, so a reducer can refuse a model it cannot
        serve while nothing is touched yet: trained weights for another hidden size or depth, a
        layer without a trained module. Raise :class:`~tokenprune.errors.ReducerInputError` with
        the reason and the fix; ``apply`` re-raises it naming the stage and installs nothing.

        Args:
            model: The VLM as passed to ``apply`` (``...ForConditionalGeneration``); its language
                model's settings are in ``model.config.get_text_config()``.
            at: This stage's insertion point.
        """
        return None

    @classmethod
    def requirements(cls, params: ReducerParams) -> Requirements:
        """What a stage of this reducer with ``params`` reads: the one declaration that validation, the
        engine's install plan and the FLOP count all read.

        A classmethod, so pipeline validation answers it without building the reducer (whose
        constructor may be costly). The default is the static declaration in :attr:`capabilities`
        (``attention``, ``own_attention``, ``signals``, ``needs_text``) and, when ``vision_attention``
        lists a kind, the vision attention that :meth:`VisionAttentionParams.vision_request` of ``params``
        asks for (``cls`` else ``mean`` at the features layer where the params are not
        :class:`VisionAttentionParams`). Override it when other needs depend on the params, e.g. FastV's
        ``source``::

            @classmethod
            def requirements(cls, params):
                return replace(super().requirements(params), attention=frozenset({params.source}))
        """
        caps = cls.capabilities
        return Requirements(
            attention=caps.attention,
            own_attention=caps.own_attention,
            signals=frozenset(caps.signals),
            text=caps.needs_text,
            vision_attention=_default_vision_request(caps.vision_attention, params),
        )

    def needs(self) -> Requirements:
        """This instance's requirements: :meth:`requirements` of its params, with the older per-need
        overrides (deprecated: ``attention_sources_for``, ``own_attention_sources_for``,
        ``vision_attention_for`` and their instance mirrors) honoured where a reducer still has them."""
        return _legacy_requirements(self)

    @classmethod
    def attention_sources_for(cls, params: ReducerParams) -> frozenset[AttentionSource]:
        """Deprecated: ``requirements(params).attention``, the attention-probe sources a stage reads."""
        return cls.requirements(params).attention

    def attention_sources(self) -> frozenset[AttentionSource]:
        """Attention-probe sources this instance reads (``needs().attention``)."""
        return class_requirements(type(self), self.params).attention

    @classmethod
    def own_attention_sources_for(cls, params: ReducerParams) -> frozenset[AttentionSource]:
        """Deprecated: ``requirements(params).own_attention``, the own-layer attention sources a stage reads."""
        return cls.requirements(params).own_attention

    def own_attention_sources(self) -> frozenset[AttentionSource]:
        """Own-layer attention sources this instance reads (``needs().own_attention``)."""
        return class_requirements(type(self), self.params).own_attention

    @classmethod
    def vision_attention_for(cls, params: ReducerParams) -> VisionAttentionRequest | None:
        """Deprecated: ``requirements(params).vision_attention``, the vision-encoder attention a stage reads."""
        return cls.requirements(params).vision_attention

    def vision_attention_request(self) -> VisionAttentionRequest | None:
        """The vision-encoder attention this instance reads (``needs().vision_attention``)."""
        return class_requirements(type(self), self.params).vision_attention

    def overhead_macs(self, tokens: Tensor, ctx: ReduceContext) -> int:
        """Multiply-accumulates that :meth:`reduce` spends on these inputs (the whole batch).

        The engine records it with every stage and the analytic FLOP count adds it to the model's
        own, so a method's overhead is never hidden. Count what the FLOP counters count: matrix
        products (not norms, sorting, softmax or element-wise work). The default, 0, suits reducers
        that do no matrix products (norms, random draws, attention already computed by the probe,
        which the engine counts itself). G-Prune overrides it with ``n^2 D + t n^2`` per graph.
        """
        return 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


class ScoringReducer(TokenReducer):
    """A reducer that ranks tokens: keep the ``budget`` highest-scoring tokens of each sample.

    Subclasses implement :meth:`score`. Protected tokens are always kept; ties go to the lower
    index, so the result is deterministic whenever the scores are.
    """

    @abstractmethod
    def score(self, tokens: Tensor, ctx: ReduceContext) -> Tensor:
        """Importance of every token: ``(B, N)`` float, higher is kept first.

        Scores at padded positions are ignored. NaN scores are an error.
        """

    def reduce(self, tokens: Tensor, ctx: ReduceContext) -> Selection:
        scores = self.score(tokens, ctx)
        b, n = ctx.valid.shape
        if scores.shape != (b, n):
            raise ReducerOutputError(
                f"reducer {self.name!r}: score() returned shape {tuple(scores.shape)}, expected (B, N) = {(b, n)}"
            )
        return top_k_selection(scores, ctx, reducer_name=self.name)


def top_k_selection(
    scores: Tensor, ctx: ReduceContext, *, eligible: Tensor | None = None, reducer_name: str = "?"
) -> Selection:
    """Keep, per sample, the protected tokens and then the highest ``scores`` up to ``ctx.budget``.

    Args:
        scores: ``(B, N)`` float scores; NaN at a valid position raises
            :class:`~tokenprune.errors.ReducerInputError`.
        ctx: Provides ``budget``, ``valid`` and ``protected``.
        eligible: ``(B, N)`` bool, the tokens that may be kept at all besides the protected ones (an
            adaptive reducer's threshold, ATP's); ``None``: every valid token. A sample keeps fewer
            than its budget when fewer are eligible.
        reducer_name: Named in error messages.
    """
    scores = scores.detach().float()
    bad = torch.isnan(scores) & ctx.valid
    if bool(bad.any()):
        sample = int(bad.any(1).nonzero()[0])
        raise ReducerInputError(
            f"reducer {reducer_name!r}: NaN scores for sample {sample} "
            f"({int(bad[sample].sum())} of {int(ctx.valid[sample].sum())} tokens); check the input features "
            "for NaN or infinite values"
        )
    # Rank protected tokens first, then by score; padding (and ineligible tokens) last.
    protected = ctx.protected & ctx.valid
    allowed = ctx.valid if eligible is None else ctx.valid & (eligible | protected)
    ranked = scores.masked_fill(~allowed, float("-inf")).masked_fill(protected, float("inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    n = scores.shape[1]
    rank_keep = torch.arange(n, device=scores.device).unsqueeze(0) < ctx.budget.unsqueeze(1)
    keep = torch.zeros_like(ctx.valid).scatter(1, order, rank_keep) & allowed
    return Selection.from_mask(keep)


_LEGACY_CLASSMETHODS = {
    "attention_sources_for": "attention",
    "own_attention_sources_for": "own_attention",
    "vision_attention_for": "vision_attention",
}
_LEGACY_METHODS = {
    "attention_sources": "attention",
    "own_attention_sources": "own_attention",
    "vision_attention_request": "vision_attention",
}


def legacy_overrides(cls: type[TokenReducer]) -> list[str]:
    """The deprecated per-need methods ``cls`` overrides (``requirements`` replaces them)."""
    out = []
    for name in (*_LEGACY_CLASSMETHODS, *_LEGACY_METHODS):
        mine, base = getattr(cls, name), getattr(TokenReducer, name)
        if getattr(mine, "__func__", mine) is not getattr(base, "__func__", base):
            out.append(name)
    return out


def class_requirements(cls: type[TokenReducer], params: ReducerParams) -> Requirements:
    """``cls.requirements(params)`` with the deprecated per-need classmethods' answers where overridden."""
    req = cls.requirements(params)
    overridden = set(legacy_overrides(cls))
    for name, field_name in _LEGACY_CLASSMETHODS.items():
        if name in overridden:
            req = replace(req, **{field_name: getattr(cls, name)(params)})
    return req


def _legacy_requirements(reducer: TokenReducer) -> Requirements:
    """:func:`class_requirements`, then the deprecated instance methods' answers where overridden."""
    req = class_requirements(type(reducer), reducer.params)
    overridden = set(legacy_overrides(type(reducer)))
    for name, field_name in _LEGACY_METHODS.items():
        if name in overridden:
            req = replace(req, **{field_name: getattr(reducer, name)()})
    return req
