"""The attention probe: attention paid to each token at chosen layers, while the model runs sdpa.

Score-based reducers (FastV, ATP) read how much attention the last token, or the text tokens,
pay to each visual token at layer ``k - 1``. Asking the model for ``output_attentions`` would force
eager attention on every layer (2.7x slower prefill at a realistic size, see the research notes).
Instead, :class:`AttentionProbe` registers a thin attention function through transformers'
``AttentionInterface`` (plus the matching mask function through ``AttentionMaskInterface``, without
which padding would be silently ignored) and points the language model's config at it:

* at the probed layers, during a prefill, it computes ``softmax(q k^T * scaling + mask)`` for the
  query rows a stage needs, from the ``q`` and ``k`` the layer already computed (after RoPE,
  q/k norms and GQA), averaged over heads and over the rows; one head at a time, so the extra
  memory is ``B x rows x L``;
* then, on every layer, it calls the stock attention function the model was using (sdpa, or the
  model's own eager function), so the outputs are bit-identical to the unprobed model.

Two more signals ride on the same function. At the ``keys`` layers it keeps the layer's keys
(after RoPE and k-norms; DART's pivots). And :meth:`AttentionProbe.dry_run` serves a layer's
*own* attention on its input before the layer runs (PyramidDrop): the engine calls that layer's
input norm and attention module on the hidden states entering it, without a cache; the probe
function computes the scores from the ``q`` and ``k`` the module built and stops the call there
(:class:`_DryRunDone`), so no attention output, o-projection or cache write happens.

Only the language model's config is switched (the vision tower keeps its attention), only while
the probe is installed; :meth:`AttentionProbe.remove` restores it exactly and unregisters the
functions when the last probe is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tokenprune.engine import compat
from tokenprune.engine.stopwatch import Stopwatch
from tokenprune.errors import TokenpruneError

if TYPE_CHECKING:
    from tokenprune.engine.decode_stage import StepKeys

SUPPORTED = ("sdpa", "eager")
_NAMES = {"sdpa": "tokenprune_probe_sdpa", "eager": "tokenprune_probe_eager"}
_TARGETS: weakref.WeakKeyDictionary[nn.Module, tuple[AttentionProbe, int]] = weakref.WeakKeyDictionary()


@dataclass
class ProbeRows:
    """Which query rows feed each source at the next probed layer.

    Attributes:
        visual: ``(B, L)`` bool, visual tokens of the sequence the layer sees.
        valid: ``(B, L)`` bool, real tokens (not padding).
    """

    visual: Tensor
    valid: Tensor


@dataclass
class AttentionProbe:
    """Records head-averaged attention at ``layers`` during prefill, under sdpa (or eager).

    Attributes:
        layers: Decoder layer indices to probe.
        sources: Per layer, the sources to compute (``last``, ``text``, ``visual``, ``all``).
        scores: After a prefill: ``scores[layer][source]`` is ``(B, Lk)`` float32, the attention
            that the source's query rows pay to every key of that layer, averaged over heads and
            rows.
        active: Set by the engine during prefill; the probe computes nothing otherwise.
        rows: The query rows of the sequence the next probed layer sees; the engine hands them over whenever
            that sequence changes (``None``: compute nothing).
        own: Layers whose own attention :meth:`dry_run` serves, with the sources it computes.
        keys: Layers whose keys are recorded in :attr:`key_states` during prefill.
        key_states: After a prefill: ``key_states[layer]`` is ``(B, Lk, Hkv * hd)``, the layer's keys
            (after RoPE), heads concatenated.
        text_rows: Layers whose attention is recorded row by row for the text tokens, in :attr:`text_scores`.
        text_scores: After a prefill: ``text_scores[layer]`` is ``(B, T, Lk)`` float32, the attention each
            text token (the valid non-visual rows, in sequence order; ``0`` at padding rows) pays to every
            key of that layer, averaged over heads only (:func:`text_row_attention`).
        decode_layer: The layer ``k - 1`` of a ``decode`` stage: at each decoding step its last query
            row's head-averaged attention and its cached keys are recorded in :attr:`decode_scores`
            (``(B, Lk)`` float32) and :attr:`decode_keys` (``(B, Lk, Hkv * hd)``).
        decode_from: The decode stage's layer ``k``: from there on, the attention of a decoding step
            reads only the cache columns that :attr:`step_keys` gives for the layer.
        decoding: Set by the engine during a decoding step of a pruned prefill.
        step_keys: What the decode stage left out of this decoding step's attention
            (:class:`~tokenprune.engine.decode_stage.StepKeys`), handed over by the engine once the stage ran;
            ``None``: every layer reads the whole cache.
        stopwatch: Times the probe's own work in each attention call (set by the engine to its own).
    """

    layers: dict[int, frozenset[str]]
    scores: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    active: bool = False
    rows: ProbeRows | None = None
    own: dict[int, frozenset[str]] = field(default_factory=dict)
    keys: frozenset[int] = frozenset()
    key_states: dict[int, Tensor] = field(default_factory=dict)
    text_rows: frozenset[int] = frozenset()
    text_scores: dict[int, Tensor] = field(default_factory=dict)
    decode_layer: int | None = None
    decode_from: int | None = None
    decoding: bool = False
    step_keys: StepKeys | None = None
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    decode_scores: Tensor | None = None
    decode_keys: Tensor | None = None
    _configs: list[tuple[Any, Any]] = field(default_factory=list)
    _name: str | None = None
    _dry: tuple[int, ProbeRows] | None = None
    _dry_scores: dict[str, Tensor] | None = None

    def install(self, language_model: nn.Module, decoder_layers: Iterable[nn.Module]) -> None:
        """Point the language model at the probing attention function.

        Raises:
            TokenpruneError: the model uses an attention implementation other than sdpa or eager.
        """
        decoder_layers = list(decoder_layers)
        configs, impl = compat.common_implementation(
            [getattr(language_model, "config", None)]
            + [getattr(compat.attention_module(layer), "config", None) for layer in decoder_layers],
            SUPPORTED,
            "the attention probe (needed by a score-based stage) of the language model",
        )
        self._name = _NAMES[impl]
        compat.acquire_attention(self._name, impl, _make_attention(impl))
        for i, layer in enumerate(decoder_layers):
            attn = compat.attention_module(layer)
            if attn is not None and (
                i in self.layers or i in self.own or i in self.keys or i in self.text_rows or self._decodes(i)
            ):
                _TARGETS[attn] = (self, i)
        for cfg in configs:
            self._configs.append((cfg, compat.swap_attention_implementation(cfg, self._name)))

    def remove(self) -> None:
        """Restore the configs and unregister the functions when no probe uses them."""
        compat.release_probe(self._configs, _TARGETS, self, self._name)
        self._name = None

    def _decodes(self, layer: int) -> bool:
        return layer == self.decode_layer or (self.decode_from is not None and layer >= self.decode_from)

    def record_decode(self, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: Any) -> None:
        """The decode stage's signals at :attr:`decode_layer`: the last query row's attention and the keys."""
        b, hkv, lk, hd = key.shape
        rows = ProbeRows(
            visual=torch.zeros(b, query.shape[2], dtype=torch.bool, device=query.device),
            valid=torch.ones(b, query.shape[2], dtype=torch.bool, device=query.device),
        )
        with torch.no_grad():
            self.decode_scores = attention_scores(module, query, key, mask, kw, ("last",), rows)["last"]
        self.decode_keys = key.detach().transpose(1, 2).reshape(b, lk, hkv * hd)

    def end_decode_step(self) -> None:
        """Forget the step's signals; attention reads the whole cache again."""
        self.decoding = False
        self.decode_scores = self.decode_keys = self.step_keys = None

    def reset(self, *, active: bool) -> None:
        """Forget what the last prefill recorded; compute during the next one if ``active``."""
        self.active = active
        self.rows = None
        self.scores.clear()
        self.key_states.clear()
        self.text_scores.clear()
        self.end_decode_step()

    def record(self, layer: int, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: Any) -> None:
        """Compute and store the scores (and keys) of ``layer`` (called from the attention function)."""
        if layer in self.keys:
            b, hkv, lk, hd = key.shape
            self.key_states[layer] = key.detach().transpose(1, 2).reshape(b, lk, hkv * hd)
        sources = self.layers.get(layer, frozenset())
        rows = self.rows
        if rows is not None and layer in self.text_rows:
            with torch.no_grad():
                self.text_scores[layer] = text_row_attention(module, query, key, mask, kw, rows)
        if not sources or rows is None:
            return
        with torch.no_grad():
            self.scores[layer] = attention_scores(module, query, key, mask, kw, sources, rows)

    def dry_run(self, layer: int, call: Callable[[], Any], rows: ProbeRows) -> dict[str, Tensor]:
        """Layer ``layer``'s own attention: run ``call`` (the layer's attention module on its input) up to its
        attention function, and return ``{source: (B, Lk) float32}`` for the sources of ``own[layer]``.

        Raises:
            TokenpruneError: the call never reached the attention function (its implementation is overridden).
        """
        self._dry, self._dry_scores = (layer, rows), None
        try:
            with torch.no_grad():
                call()
        except _DryRunDone:
            pass
        finally:
            self._dry = None
        scores, self._dry_scores = self._dry_scores, None
        if scores is None:
            raise TokenpruneError(
                f"the attention probe saw no attention call at layer {layer} while computing its own attention; is "
                "the attention implementation overridden elsewhere?"
            )
        return scores

    def _record_dry(self, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: Any) -> None:
        layer, rows = self._dry  # type: ignore[misc]
        self._dry_scores = attention_scores(module, query, key, mask, kw, self.own.get(layer, frozenset()), rows)
        raise _DryRunDone


class _DryRunDone(Exception):
    """Stops a dry attention call once the probe has its scores."""


def attention_scores(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    kw: dict[str, Any],
    sources: Iterable[str],
    rows: ProbeRows,
) -> dict[str, Tensor]:
    """Head- and row-averaged attention probabilities.

    Args:
        module: The attention module (for ``scaling``).
        query: ``(B, H, Lq, hd)`` after RoPE.
        key: ``(B, Hkv, Lk, hd)`` after RoPE (grouped heads are repeated here).
        mask: ``None`` (causal), a bool mask (True attends) or an additive float mask,
            ``(B or 1, 1, Lq, Lk)``.
        kw: The attention call's keyword arguments (``scaling``, ``softcap``).
        sources: Which averages to return.
        rows: The visual and valid rows of the sequence.

    Returns:
        ``{source: (B, Lk) float32}``.
    """
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    scaling, softcap, key = _call_settings(module, query, key, kw)
    sources = sorted(set(sources))
    need_all_rows = any(s != "last" for s in sources)
    first = 0 if need_all_rows else lq - 1
    if mask is None:
        q_pos = torch.arange(first, lq, device=query.device) + (lk - lq)
        bias = torch.zeros(lq - first, lk, device=query.device)
        bias = bias.masked_fill(torch.arange(lk, device=query.device)[None, :] > q_pos[:, None], float("-inf"))
        bias = bias[None]
    else:
        m = mask[:, 0, first:lq, :lk]
        bias = (
            torch.zeros(m.shape, device=query.device).masked_fill(~m, float("-inf"))
            if m.dtype == torch.bool
            else m.float()
        )
    no_keys = torch.isneginf(bias).all(-1, keepdim=True)  # (B or 1, rows, 1)
    row_masks: dict[str, Tensor] = {}
    valid = rows.valid[:, first:lq].float()
    if "text" in sources:
        row_masks["text"] = (rows.valid & ~rows.visual)[:, first:lq].float()
    if "visual" in sources:
        row_masks["visual"] = (rows.valid & rows.visual)[:, first:lq].float()
    if "all" in sources:
        row_masks["all"] = valid
    acc = {s: torch.zeros(b, lk, dtype=torch.float32, device=query.device) for s in sources}
    for head in range(h):
        logits = query[:, head, first:].float() @ key[:, head].float().transpose(-1, -2) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        # A query row with every key masked (a padding row) has no distribution: it contributes 0. NaN
        # from the activations themselves is kept, so the reducers' finite checks see it.
        probs = torch.softmax(logits + bias, dim=-1).masked_fill(no_keys, 0.0)  # (B, rows, Lk)
        for s in sources:
            if s == "last":
                acc[s] += probs[:, -1]
            else:
                w = row_masks[s]
                acc[s] += (probs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)
    return {s: a / h for s, a in acc.items()}


def text_row_attention(
    module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: dict[str, Any], rows: ProbeRows
) -> Tensor:
    """The attention of every text row, averaged over heads only (the arguments of :func:`attention_scores`).

    Only the text query rows (valid, not visual) are computed, one head at a time: ``O(H T Lk hd)``.

    Returns:
        ``(B, T, Lk)`` float32, ``T`` the most text rows of a sample; row ``t`` of sample ``b`` is its
        ``t``-th text token in sequence order (``0`` past its text tokens).
    """
    b, h, lq, hd = query.shape
    lk = key.shape[2]
    scaling, softcap, key = _call_settings(module, query, key, kw)
    text = rows.valid & ~rows.visual
    t = int(text.sum(1).max()) if b else 0
    order = torch.where(text, 0, 1).argsort(dim=1, stable=True)[:, :t]  # the text rows first, in sequence order
    real = text.gather(1, order)  # (B, T)
    if mask is None:
        q_pos = order + (lk - lq)
        bias = torch.zeros(b, t, lk, device=query.device)
        bias = bias.masked_fill(torch.arange(lk, device=query.device)[None, None, :] > q_pos[..., None], float("-inf"))
    else:
        m = mask[:, 0, :, :lk].expand(b, lq, lk).gather(1, order[..., None].expand(b, t, lk))
        bias = (
            torch.zeros(m.shape, device=query.device).masked_fill(~m, float("-inf"))
            if m.dtype == torch.bool
            else m.float()
        )
    q = query.gather(2, order[:, None, :, None].expand(b, h, t, hd))
    acc = torch.zeros(b, t, lk, dtype=torch.float32, device=query.device)
    for head in range(h):
        logits = q[:, head].float() @ key[:, head].float().transpose(-1, -2) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        acc += torch.softmax(logits + bias, dim=-1).masked_fill(~real[..., None], 0.0)
    return acc / h


def _call_settings(module: nn.Module, query: Tensor, key: Tensor, kw: Any) -> tuple[float, float | None, Tensor]:
    """The attention call's scaling and softcap, and its keys repeated to the query heads (GQA)."""
    scaling = kw.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    rep = query.shape[1] // key.shape[1]
    return scaling, kw.get("softcap"), key.repeat_interleave(rep, dim=1) if rep > 1 else key


def _make_attention(impl: str) -> Callable[..., Any]:
    def probe_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> Any:
        target = _TARGETS.get(module)
        if target is not None:
            probe, layer = target
            with probe.stopwatch.running():
                if probe._dry is not None and probe._dry[0] == layer:
                    probe._record_dry(module, query, key, attention_mask, kwargs)
                if probe.active and query.shape[2] > 1:
                    probe.record(layer, module, query, key, attention_mask, kwargs)
                elif probe.decoding:
                    if layer == probe.decode_layer:
                        probe.record_decode(module, query, key, attention_mask, kwargs)
                    keys = probe.step_keys
                    subset = keys.subset(layer, int(key.shape[2])) if keys is not None else None
                    if subset is not None:
                        q, boolean = int(query.shape[2]), impl != "eager"
                        key, value, attention_mask = subset.apply(key, value, attention_mask, q, boolean=boolean)
        return compat.stock_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    probe_attention.__name__ = f"tokenprune_probe_{impl}"
    return probe_attention
