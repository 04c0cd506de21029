"""Soft-mask training: the engine's seam for trainable reducers (a reducer's keep decisions as a differentiable mask).

At inference a layer stage cuts the sequence, which has no gradient. To *train* a method that decides
what to keep (ATP-LLaVA's threshold heads, https://arxiv.org/abs/2412.00447; DynamicViT's gates),
:class:`SoftMaskRun` keeps the sequence whole and turns each stage's decision into a weight on the
tokens as attention *keys*, DynamicViT-style:

* a trainable reducer implements :class:`SoftMaskReducer`: ``soft_keep(tokens, ctx)`` returns a
  :class:`SoftKeep`, a keep logit per visual token (``> 0``: kept at inference) that is
  differentiable in the reducer's parameters;
* at a stage ``{layer: k}`` the engine fills a :class:`~tokenprune.reducer.ReduceContext` exactly as
  at inference (the attention-probe sources of layer ``k - 1`` that the reducer's
  :meth:`~tokenprune.reducer.TokenReducer.requirements` name, the layout, ``valid`` = the tokens still
  kept, ``protected``), calls ``soft_keep``, and turns the logits into the soft mask
  ``M = sigmoid(T · logits)`` (``1`` at protected tokens); masks of successive stages multiply; a token
  whose cumulative mask falls below 0.5 counts as gone (its query rows leave the later probes, as at
  inference);
* a forward pre-hook on every decoder layer replaces the attention mask by a full 4-D additive float
  mask: causal + padding, plus ``log M_j`` on the column of every visual key ``j`` except on the
  diagonal, so that ``softmax(P + log G) ∝ exp(P) G`` and gradients reach the reducer.

With a steep ``T`` the forward equals the engine's hard-pruned one (ATP's tests check it). Only what
the hooks need is installed; :meth:`SoftMaskRun.remove` (or leaving the ``with``) restores the model.
Signals other than the attention probe and the layout are not served here: a reducer that needs more
is refused when the run is built. How a third-party method uses this: ``docs/extending/training.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.adapters.generic import adapter_for
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.sequence import image_layout
from tokenprune.errors import TokenpruneError
from tokenprune.layout import TokenLayout
from tokenprune.plugins import PluginManager, get_plugin_manager
from tokenprune.reducer import InsertionPoint, ReduceContext, Selection, TokenReducer


@dataclass(frozen=True)
class SoftKeep:
    """A trainable reducer's soft decision at one stage.

    Attributes:
        logits: ``(B, N)`` float, the keep logit of each visual token: the token is kept at inference
            where it is ``> 0``; during training its key weight is ``sigmoid(T · logits)``. Must carry the
            gradient to the reducer's parameters. Ignored at padding and protected tokens.
        aux: Anything else the method wants back per stage (e.g. ATP's thresholds ``(B, 2)``); returned in
            :attr:`SoftForward.aux` under the stage's layer.
    """

    logits: Tensor
    aux: Mapping[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class SoftMaskReducer(Protocol):
    """A reducer that can be trained through :class:`SoftMaskRun`: it also answers :meth:`soft_keep`."""

    def soft_keep(self, tokens: Tensor, ctx: ReduceContext) -> SoftKeep:
        """Keep logits for ``tokens`` ``(B, N, D)`` (every visual token, the gone ones included; ``ctx.valid``
        marks those still kept), differentiable in the reducer's parameters."""
        ...


@dataclass
class SoftForward:
    """What one soft-masked forward produced.

    Attributes:
        logits: ``(B, L, V)``.
        counts: ``(B, num_layers)`` soft visual-token count each decoder layer sees (differentiable).
        kept: Per stage layer ``k``: ``(B,)`` soft fraction of the visual tokens kept after it.
        aux: Per stage layer ``k``: the :attr:`SoftKeep.aux` its reducer returned.
        hard_counts: ``(B, num_layers)`` counts of the tokens whose cumulative mask exceeds 0.5.
    """

    logits: Tensor
    counts: Tensor
    kept: dict[int, Tensor]
    aux: dict[int, Mapping[str, Tensor]]
    hard_counts: Tensor


@dataclass
class _Forward:
    """The state of one soft forward; created by :meth:`SoftMaskRun.forward`, dropped after it."""

    visual: Tensor  # (B, L) bool
    valid: Tensor  # (B, L) bool
    cols: Tensor  # (B, N) visual columns, -1 padding
    vvalid: Tensor  # (B, N) bool
    logm: Tensor  # (B, N) float, cumulative log mask
    present: Tensor  # (B, N) bool, cumulative hard mask
    base: Tensor  # (B, 1, L, L) additive float mask
    offdiag: Tensor  # (L, L) float, 0 on the diagonal
    protected: Tensor | None = None  # (B, N) bool, once the layout is known
    layout: TokenLayout | None = None
    counts: list[Tensor] = field(default_factory=list)
    hard: list[Tensor] = field(default_factory=list)
    kept: dict[int, Tensor] = field(default_factory=dict)
    aux: dict[int, Mapping[str, Tensor]] = field(default_factory=dict)

    @classmethod
    def start(cls, visual: Tensor, valid: Tensor, dtype: torch.dtype) -> _Forward:
        """The state before layer 0 for ``(B, L)`` masks; ``dtype``: the attention mask's."""
        length, device = visual.shape[1], visual.device
        cols = Selection.from_mask(visual).indices
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
        allowed = (causal & valid[:, None, None, :]) | eye  # padding rows see themselves (no empty row)
        base = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return cls(
            visual=visual,
            valid=valid,
            cols=cols,
            vvalid=cols >= 0,
            logm=torch.zeros(cols.shape, dtype=torch.float32, device=device),
            present=cols >= 0,
            base=base,
            offdiag=1.0 - torch.eye(length, dtype=torch.float32, device=device),
        )

    def scatter(self, values: Tensor, fill: float | bool) -> Tensor:
        """``(B, N)`` per visual token to ``(B, L)`` per column (``fill`` elsewhere)."""
        batch, length = self.visual.shape
        out = torch.full((batch, length + 1), fill, dtype=values.dtype, device=values.device)
        out.scatter_(1, torch.where(self.vvalid, self.cols, torch.full_like(self.cols, length)), values)
        return out[:, :length]

    def rows(self) -> ProbeRows:
        """The probe's query rows: the tokens an earlier stage's mask put below 0.5 are left out."""
        gone = self.scatter(~self.present & self.vvalid, False)
        return ProbeRows(visual=self.visual & ~gone, valid=self.valid & ~gone)

    def mask(self) -> Tensor:
        """``(B, 1, L, L)`` the additive mask of a layer: the base plus ``log M`` on the visual key columns."""
        if not self.kept:
            return self.base
        bias = self.scatter(self.logm, 0.0)[:, None, None, :] * self.offdiag  # (B, 1, L, L)
        return self.base + bias.to(self.base.dtype)

    def record(self, layer: int, logm: Tensor, keep: SoftKeep) -> None:
        """Multiply the stage at ``layer``'s ``(B, N)`` log mask into the cumulative one."""
        self.logm = self.logm + logm
        self.present = self.present & ((logm > math.log(0.5)) | self._protected())
        self.counts.append((self.logm.exp() * self.vvalid).sum(1))
        self.hard.append((self.present & self.vvalid).sum(1))
        self.kept[layer] = self.counts[-1] / self.vvalid.sum(1).clamp(min=1)
        self.aux[layer] = dict(keep.aux)

    def _protected(self) -> Tensor:
        return self.protected if self.protected is not None else torch.zeros_like(self.vvalid)

    def per_layer(self, values: list[Tensor], first: Tensor, num_layers: int) -> Tensor:
        """``(B, num_layers)``: ``first`` before the first stage, then each stage's value from its layer on."""
        out = [first] * num_layers
        for k, v in zip(sorted(self.kept), values, strict=True):
            out[k:] = [v] * (num_layers - k)
        return torch.stack(out, 1)


class SoftMaskRun:
    """Trainable reducers as soft masks inside a transformers VLM; a context manager that removes its hooks.

    Args:
        model: The VLM (``...ForConditionalGeneration``), sdpa or eager attention.
        stages: Decoder layer ``k >= 1`` to the reducer that decides there (each a
            :class:`SoftMaskReducer`); they run in layer order.
        temperature: Soft-mask steepness ``T`` (change it between forwards with :attr:`temperature`).
        protect_newlines: Never mask the layout's row-end newline tokens (as a pipeline's
            ``protect_newlines``).
        plugins: The plugin manager whose adapters serve ``model`` (default: the installed plugins).

    Use :meth:`forward` (not ``model(...)``) so the masks know the batch.

    Raises:
        TokenpruneError: a stage off the model's layers, a reducer without ``soft_keep``, or one that reads
            more than the attention probe and the layout.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Mapping[int, TokenReducer],
        temperature: float = 10.0,
        *,
        protect_newlines: bool = False,
        plugins: PluginManager | None = None,
    ) -> None:
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model, plugins or get_plugin_manager())
        self.layers = list(self.adapter.decoder_layers())
        self.num_layers = len(self.layers)
        self.stages = dict(sorted(stages.items()))
        self.temperature = float(temperature)
        self.protect_newlines = protect_newlines
        self._sources = {k: self._check(k, reducer) for k, reducer in self.stages.items()}
        self._state: _Forward | None = None
        self._call: ImageCall | None = None
        self._hooks = HookSet()
        probed = {k - 1: sources for k, sources in self._sources.items() if sources}
        self.probe = AttentionProbe(layers=probed)
        try:
            self.probe.install(self.adapter.language_model(), self.layers)
            for i, layer in enumerate(self.layers):
                self._hooks.pre(layer, self._pre(i))
            vlm = self.adapter.vlm()
            if hasattr(vlm, "get_image_features"):
                self._hooks.wrap_method(vlm, "get_image_features", self._record_image_call)
        except BaseException:
            self.remove()
            raise

    def _check(self, k: int, reducer: TokenReducer) -> frozenset[str]:
        """The probe sources of the stage at layer ``k``, after refusing what this run cannot serve."""
        where = f"soft-mask stage at layer {k} ({getattr(reducer, 'name', type(reducer).__name__)})"
        if not 1 <= k < self.num_layers:
            raise TokenpruneError(f"{where}: the model has decoder layers 0..{self.num_layers - 1}; use 1 <= k < that")
        if not isinstance(reducer, SoftMaskReducer):
            raise TokenpruneError(f"{where}: the reducer has no soft_keep(tokens, ctx); implement SoftMaskReducer")
        needs = reducer.requirements(reducer.params)
        extra = [
            name
            for name, on in (
                ("own attention", needs.own_attention),
                ("text tokens", needs.text),
                ("signals", needs.signals),
                ("vision attention", needs.vision_attention),
            )
            if on
        ]
        if extra:
            raise TokenpruneError(
                f"{where}: soft-mask training serves the attention probe and the layout only, the reducer also "
                f"reads {', '.join(extra)}; train it another way or drop those needs in training"
            )
        return frozenset(needs.attention)

    def remove(self) -> None:
        """Remove every hook and restore the model; safe to call twice."""
        self._hooks.remove()
        self.probe.remove()

    def __enter__(self) -> SoftMaskRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _record_image_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._call = ImageCall(args, kwargs, output)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs: Any) -> SoftForward:
        """Run the model with soft masks on a (right- or left-) padded batch.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` 1 on real tokens (default all ones).
            **inputs: The model's image inputs (``pixel_values``, ``image_sizes``, ...).
        """
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        dtype = next(self.model.parameters()).dtype
        st = _Forward.start(
            self.adapter.visual_mask(input_ids) & valid, valid, dtype if dtype.is_floating_point else torch.float32
        )
        self._state, self._call = st, None
        self.probe.reset(active=True)
        self.probe.rows = st.rows()
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
            full = st.vvalid.sum(1)
            return SoftForward(
                logits=out.logits,
                counts=st.per_layer(st.counts, full.float(), self.num_layers),
                kept=dict(st.kept),
                aux=dict(st.aux),
                hard_counts=st.per_layer(st.hard, full, self.num_layers),
            )
        finally:
            self.probe.reset(active=False)
            self._state = self._call = None

    def _ensure_layout(self, st: _Forward) -> Tensor:
        """The protected tokens (the layout is read once per forward, at the first stage)."""
        if st.protected is not None:
            return st.protected
        layout = image_layout(self.adapter, self._call, st.visual) if self._call is not None else None
        st.layout = layout.gather(st.cols) if layout is not None else None
        protect = st.layout is not None and self.protect_newlines
        st.protected = st.layout.newline & st.vvalid if protect else torch.zeros_like(st.vvalid)
        return st.protected

    def _stage(self, k: int, hidden: Tensor, st: _Forward) -> None:
        """Run the stage at layer ``k`` on the hidden states entering it."""
        protected = self._ensure_layout(st)
        reducer = self.stages[k]
        scores = self.probe.scores.get(k - 1, {})
        if not set(self._sources[k]) <= set(scores):
            raise TokenpruneError(f"the attention probe recorded nothing at layer {k - 1} for the stage at layer {k}")
        safe = st.cols.clamp(min=0)
        attention = {s: scores[s].gather(1, safe).masked_fill(~st.vvalid, 0.0) for s in self._sources[k]}
        ctx = ReduceContext(
            at=InsertionPoint("layer", k),
            budget=(st.present & st.vvalid).sum(1),
            valid=st.present & st.vvalid,
            protected=protected,
            sizes=torch.ones(st.cols.shape, dtype=torch.float32, device=st.cols.device),
            layout=st.layout,
            attention=attention,
            stage_index=list(self.stages).index(k),
            columns=st.cols,
        )
        tokens = hidden.gather(1, safe.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        keep = reducer.soft_keep(tokens, ctx)  # type: ignore[attr-defined]
        logm = nn.functional.logsigmoid(keep.logits.float() * self.temperature)
        st.record(k, logm.masked_fill(~st.vvalid | protected, 0.0), keep)
        self.probe.rows = st.rows()  # the tokens now below 0.5 leave the later probes' query rows

    def _pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            st = self._state
            if st is None:
                return None
            if i in self.stages:
                self._stage(i, args[0] if args else kwargs["hidden_states"], st)
            kwargs["attention_mask"] = st.mask()
            return args, kwargs

        return hook
