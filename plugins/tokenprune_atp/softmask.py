"""ATP's soft-mask runtime: differentiable pruning inside a stock transformers VLM, for training.

ATP-LLaVA (https://arxiv.org/abs/2412.00447) trains its thresholds with differentiable masks: the
sequence keeps its length, and each visual token ``j`` is down-weighted as a *key* in every layer
after the module that (softly) prunes it. :class:`SoftATP` does this inside a stock transformers
model with hooks only (nothing is patched or subclassed), DynamicViT-style:

* an :class:`~tokenprune.engine.probe.AttentionProbe` records, under sdpa, the attention that the visual
  rows and the text rows pay to every key at layer ``k - 1`` of each module ``k`` (exactly the
  ``visual`` and ``text`` sources the inference reducer reads; the rows of tokens that an earlier
  module's mask put below 0.5 are left out, as they are gone at inference);
* a forward pre-hook on layer ``k`` computes the scores (:mod:`tokenprune_atp.scores`), the head's
  thresholds ``θ = (θ_r, θ_s)``, and the soft mask ``M = max(sigmoid(T (S_red - θ_r)), sigmoid(T (S_sp - θ_s)))``
  (protected newline tokens: ``M = 1``); masks of successive modules multiply;
* forward pre-hooks on every layer replace the attention mask by a full 4-D additive float mask:
  causal + padding, plus ``log M_j`` on the column of every visual key ``j`` except on the diagonal
  (``G_ij = 1`` if ``i = j`` else ``M_j``), so that ``softmax(P + log G) ∝ exp(P) G`` and gradients
  reach the heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.engine.hooks import HookSet
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.sequence import image_layout
from tokenprune.layout import TokenLayout
from tokenprune.plugins import get_plugin_manager
from tokenprune.reducer import Selection
from tokenprune_atp.scores import (
    pooled_states,
    redundancy_scores,
    score_statistics,
    spatial_scores,
)
from tokenprune_atp.weights import ATPWeights


@dataclass
class SoftForward:
    """What one soft-masked forward produced.

    Attributes:
        logits: ``(B, L, V)``.
        counts: ``(B, num_layers)`` soft visual-token count each decoder layer sees (differentiable).
        kept: Per module layer ``k``: ``(B,)`` soft fraction of the visual tokens kept after it.
        thresholds: Per module layer: ``(B, 2)`` ``(θ_r, θ_s)``.
        hard_counts: ``(B, num_layers)`` counts of the tokens whose cumulative mask exceeds 0.5.
    """

    logits: Tensor
    counts: Tensor
    kept: dict[int, Tensor]
    thresholds: dict[int, Tensor]
    hard_counts: Tensor


@dataclass
class _Batch:
    visual: Tensor  # (B, L) bool
    valid: Tensor  # (B, L) bool
    cols: Tensor  # (B, N) visual columns, -1 padding
    vvalid: Tensor  # (B, N) bool
    protected: Tensor  # (B, N) bool
    logm: Tensor  # (B, N) float, cumulative log mask
    present: Tensor  # (B, N) bool, cumulative hard mask
    base: Tensor  # (B, 1, L, L) additive float mask
    offdiag: Tensor  # (L, L) float, 0 on the diagonal
    counts: list[Tensor] = field(default_factory=list)
    hard: list[Tensor] = field(default_factory=list)
    kept: dict[int, Tensor] = field(default_factory=dict)
    thresholds: dict[int, Tensor] = field(default_factory=dict)
    layout: TokenLayout | None = None
    spatial: Tensor | None = None


class SoftATP:
    """Soft-masked ATP inside a transformers VLM, for training; a context manager that removes its hooks.

    Args:
        model: The VLM (``...ForConditionalGeneration``), sdpa or eager attention.
        weights: The ATP heads (trainable).
        temperature: Soft-mask steepness ``T`` (change it between forwards with :attr:`temperature`).

    Use :meth:`forward` (not ``model(...)``) so the masks know the batch.
    """

    def __init__(self, model: nn.Module, weights: ATPWeights, temperature: float = 10.0) -> None:
        weights.check_model(model)
        self.model = model
        self.weights = weights
        self.temperature = float(temperature)
        manager = get_plugin_manager()
        self.adapter: ModelAdapter = manager.adapters.get(model.config.model_type)(model)
        self.layers = list(self.adapter.decoder_layers())
        self.num_layers = len(self.layers)
        self._state: _Batch | None = None
        self._call: ImageCall | None = None
        self._hooks = HookSet()
        self.probe = AttentionProbe(
            layers={k - 1: frozenset({"visual", "text"}) for k in weights.config.layers}, rows=self._rows
        )
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

    def remove(self) -> None:
        """Remove every hook and restore the model; safe to call twice."""
        self._hooks.remove()
        self.probe.remove()

    def __enter__(self) -> SoftATP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _record_image_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        self._call = ImageCall(args, kwargs, output)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs: Any) -> SoftForward:
        """Run the model with soft ATP masks on a (right- or left-) padded batch.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` 1 on real tokens (default all ones).
            **inputs: The model's image inputs (``pixel_values``, ``image_sizes``, ...).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        visual = self.adapter.visual_mask(input_ids) & valid
        sel = Selection.from_mask(visual)
        cols = sel.indices
        vvalid = cols >= 0
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        eye = torch.eye(length, dtype=torch.bool, device=device)[None, None]
        allowed = (causal & valid[:, None, None, :]) | eye  # padding rows see themselves (no empty row)
        base = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        n = cols.shape[1]
        self._state = _Batch(
            visual=visual,
            valid=valid,
            cols=cols,
            vvalid=vvalid,
            protected=torch.zeros(batch, n, dtype=torch.bool, device=device),
            logm=torch.zeros(batch, n, dtype=torch.float32, device=device),
            present=vvalid.clone(),
            base=base,
            offdiag=1.0 - torch.eye(length, dtype=torch.float32, device=device),
        )
        self._call = None
        self.probe.active = True
        self.probe.scores.clear()
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
            st = self._state
            full = st.vvalid.sum(1).float()
            counts = [full] * self.num_layers
            hard = [st.vvalid.sum(1)] * self.num_layers
            for k, c in zip(sorted(st.kept), st.counts, strict=True):
                for i in range(k, self.num_layers):
                    counts[i] = c
            for k, c in zip(sorted(st.kept), st.hard, strict=True):
                for i in range(k, self.num_layers):
                    hard[i] = c
            return SoftForward(
                logits=out.logits,
                counts=torch.stack(counts, 1),
                kept=dict(st.kept),
                thresholds=dict(st.thresholds),
                hard_counts=torch.stack(hard, 1),
            )
        finally:
            self.probe.active = False
            self._state = None
            self._call = None

    def _rows(self, layer: int) -> ProbeRows | None:
        st = self._state
        if st is None:
            return None
        batch, length = st.visual.shape
        gone = torch.zeros(batch, length + 1, dtype=torch.bool, device=st.visual.device)
        gone.scatter_(1, torch.where(st.vvalid, st.cols, torch.full_like(st.cols, length)), ~st.present & st.vvalid)
        gone = gone[:, :length]
        return ProbeRows(visual=st.visual & ~gone, valid=st.valid & ~gone)

    def _ensure_layout(self, st: _Batch) -> None:
        if st.spatial is not None:
            return
        layout = image_layout(self.adapter, self._call, st.visual) if self._call is not None else None
        cfg = self.weights.config
        if layout is not None:
            lay = layout.gather(st.cols)
            st.layout = lay
            st.spatial = spatial_scores(lay.row, lay.col, lay.view, lay.image, lay.newline, cfg.spatial_lambda)
            if cfg.protect_newlines:
                st.protected = lay.newline & st.vvalid
        else:
            st.spatial = torch.zeros(st.cols.shape, dtype=torch.float32, device=st.cols.device)
        st.spatial = st.spatial.masked_fill(~st.vvalid | st.protected, 0.0)

    def _module(self, k: int, hidden: Tensor, st: _Batch) -> None:
        self._ensure_layout(st)
        scores = self.probe.scores.get(k - 1)
        if scores is None:
            raise RuntimeError(f"the attention probe recorded nothing at layer {k - 1}")
        safe = st.cols.clamp(min=0)
        att_v = scores["visual"].gather(1, safe).masked_fill(~st.vvalid, 0.0)
        att_t = scores["text"].gather(1, safe).masked_fill(~st.vvalid, 0.0)
        candidates = st.present & ~st.protected
        s_red = redundancy_scores(att_v, att_t, candidates)
        s_sp = st.spatial.masked_fill(~candidates, 0.0)
        stats = score_statistics(att_v, att_t, candidates)
        tokens = hidden.gather(1, safe.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        pooled = pooled_states(tokens.detach(), candidates)
        theta = self.weights.head(k)(stats, pooled)  # (B, 2)
        t = self.temperature
        logm = torch.maximum(
            nn.functional.logsigmoid((s_red - theta[:, :1]) * t), nn.functional.logsigmoid((s_sp - theta[:, 1:]) * t)
        )
        logm = logm.masked_fill(~st.vvalid | st.protected, 0.0)
        st.logm = st.logm + logm
        st.present = st.present & ((logm > math.log(0.5)) | st.protected)
        st.counts.append((st.logm.exp() * st.vvalid).sum(1))
        st.hard.append((st.present & st.vvalid).sum(1))
        st.kept[k] = st.counts[-1] / st.vvalid.sum(1).clamp(min=1)
        st.thresholds[k] = theta

    def _pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            st = self._state
            if st is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if str(i) in self.weights.heads:
                self._module(i, hidden, st)
            mask = st.base
            if st.kept:
                batch, length = st.visual.shape
                col = torch.zeros(batch, length + 1, dtype=st.logm.dtype, device=st.logm.device)
                col.scatter_(1, torch.where(st.vvalid, st.cols, torch.full_like(st.cols, length)), st.logm)
                bias = col[:, :length, None].transpose(1, 2).unsqueeze(1) * st.offdiag  # (B, 1, L, L)
                mask = mask + bias.to(mask.dtype)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook
