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

Only the language model's config is switched (the vision tower keeps its attention), only while
the probe is installed; :meth:`AttentionProbe.remove` restores it exactly and unregisters the
functions when the last probe is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.engine import compat
from tokenprune.errors import TokenpruneError

SUPPORTED = ("sdpa", "eager")
_NAMES = {"sdpa": "tokenprune_probe_sdpa", "eager": "tokenprune_probe_eager"}
_USERS: dict[str, int] = {}
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
        rows: Set by the engine before each probed layer runs.
    """

    layers: dict[int, frozenset[str]]
    scores: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    active: bool = False
    rows: Callable[[int], ProbeRows | None] | None = None
    _configs: list[tuple[Any, Any]] = field(default_factory=list)
    _name: str | None = None

    def install(self, language_model: nn.Module, decoder_layers: Iterable[nn.Module]) -> None:
        """Point the language model at the probing attention function.

        Raises:
            TokenpruneError: the model uses an attention implementation other than sdpa or eager.
        """
        decoder_layers = list(decoder_layers)
        configs: list[Any] = []
        for cfg in [getattr(language_model, "config", None)] + [
            getattr(compat.attention_module(layer), "config", None) for layer in decoder_layers
        ]:
            if cfg is not None and all(cfg is not c for c in configs):
                configs.append(cfg)
        impls = {compat.attention_implementation(c) for c in configs}
        if len(impls) != 1 or (impl := next(iter(impls))) not in SUPPORTED:
            raise TokenpruneError(
                f"the attention probe (needed by a score-based stage) supports the language model's "
                f"attention implementations {', '.join(SUPPORTED)}, but the model uses {sorted(map(str, impls))}; "
                "load it with attn_implementation='sdpa'"
            )
        name = _NAMES[impl]
        if _USERS.get(name, 0) == 0:
            compat.register_attention(name, impl, _make_attention(impl))
        _USERS[name] = _USERS.get(name, 0) + 1
        self._name = name
        for i, layer in enumerate(decoder_layers):
            attn = compat.attention_module(layer)
            if attn is not None and i in self.layers:
                _TARGETS[attn] = (self, i)
        for cfg in configs:
            self._configs.append((cfg, compat.swap_attention_implementation(cfg, name)))

    def remove(self) -> None:
        """Restore the configs and unregister the functions when no probe uses them."""
        for cfg, value in self._configs:
            compat.restore_attention_implementation(cfg, value)
        self._configs.clear()
        for module in [m for m, (p, _) in list(_TARGETS.items()) if p is self]:
            del _TARGETS[module]
        if self._name is not None:
            _USERS[self._name] -= 1
            if _USERS[self._name] == 0:
                del _USERS[self._name]
                compat.unregister_attention(self._name)
            self._name = None

    def record(self, layer: int, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: Any) -> None:
        """Compute and store the scores of ``layer`` (called from the attention function)."""
        sources = self.layers.get(layer, frozenset())
        rows = self.rows(layer) if self.rows is not None else None
        if not sources or rows is None:
            return
        with torch.no_grad():
            self.scores[layer] = attention_scores(module, query, key, mask, kw, sources, rows)


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
    b, h, lq, hd = query.shape
    lk = key.shape[2]
    scaling = kw.get("scaling") or getattr(module, "scaling", None) or hd**-0.5
    softcap = kw.get("softcap")
    rep = h // key.shape[1]
    key = key.repeat_interleave(rep, dim=1) if rep > 1 else key
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


def _make_attention(impl: str) -> Callable[..., Any]:
    def probe_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> Any:
        target = _TARGETS.get(module)
        if target is not None:
            probe, layer = target
            if probe.active and query.shape[2] > 1:
                probe.record(layer, module, query, key, attention_mask, kwargs)
        return compat.stock_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    probe_attention.__name__ = f"tokenprune_probe_{impl}"
    return probe_attention
