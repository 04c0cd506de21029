"""The engine: run a pipeline of token reducers inside an unmodified transformers VLM.

:func:`apply` installs PyTorch hooks on the model and returns a :class:`PruningRun`, which is also
a context manager; :meth:`PruningRun.remove` (or leaving the ``with``) takes every hook away and
restores the model exactly. Nothing is forked, no class is swapped, nothing is patched at import.
Users keep calling ``model(**inputs)`` and ``model.generate(**inputs)`` as before.

How it works (details in ``docs/engine.md``):

* **Prefill vs decoding.** A forward pass whose cache is empty (or absent) is a prefill: the
  pipeline runs. Later cached steps only have their masks and positions adjusted to the pruned
  cache.
* **post_projector stages** run in a forward pre-hook on the language model, which receives
  ``inputs_embeds`` with the projected image features already merged in at the placeholder
  positions. The hook gathers the visual rows (visual positions come from ``input_ids``, seen by a
  pre-hook on the multimodal base model), runs the reducers, and rebuilds ``inputs_embeds``, the
  attention mask and the position ids of the shortened sequence.
* **layer: k stages** run in a forward hook on decoder layer ``k - 1``, which replaces that layer's
  output by the kept rows. Pre-hooks on layers ``k, k+1, ...`` slice what the language model
  computed once for the whole sequence: the 4-D attention mask (both axes), the rotary
  ``position_embeddings`` and ``position_ids``. Layers after ``k`` therefore only see, and only
  cache, the kept tokens.
* **Ragged batches.** Samples may keep different numbers of tokens. After every stage each
  sample's surviving tokens are left-aligned to the right end of the row (left padding) and
  padding slots are masked out: an explicit 2-D mask at the language-model input (never ``None``,
  which would make transformers read gapped positions as packed sequences), and 4-D masks at
  layer stages.
* **Positions.** ``original`` (default) keeps each token's unpruned position; ``compact``
  renumbers (:mod:`tokenprune.positions`). During decoding, the caller's (or ``generate``'s) 2-D
  mask over the unpruned sequence is mapped onto the pruned cache, and positions continue from the
  unpruned length (``original``) or shift down by the freed positions (``compact``).
* **Attention probe.** Stages whose reducer reads attention get it from
  :class:`tokenprune.probe.AttentionProbe`, computed under sdpa at layer ``k - 1`` only.
* **Training.** ``labels`` are taken out of the call and the loss is computed on the logits of the
  kept tokens with the labels of those tokens.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from tokenprune import positions as P
from tokenprune.adapters.base import ImageCall, ModelAdapter
from tokenprune.budget import budget_per_sample
from tokenprune.errors import ReducerInputError, TokenpruneError
from tokenprune.layout import TokenLayout, sequence_layout
from tokenprune.pipeline import Pipeline, Stage, load_pipeline
from tokenprune.plugins import PluginManager, ReducerRegistry, get_plugin_manager
from tokenprune.probe import AttentionProbe, ProbeRows
from tokenprune.reducer import Merge, ReduceContext, Selection, TokenReducer
from tokenprune.stats import ForwardStats, RunStats, StageStats
from tokenprune.validation import check_reduction

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PruningRun] = weakref.WeakKeyDictionary()


def apply(
    model: nn.Module,
    pipeline: Pipeline | Mapping[str, Any] | str | Path,
    *,
    plugins: PluginManager | None = None,
) -> PruningRun:
    """Install ``pipeline`` on ``model``; returns the handle (also a context manager).

    Args:
        model: A supported transformers VLM, as loaded (``...ForConditionalGeneration``).
        pipeline: A :class:`~tokenprune.Pipeline`, a mapping, a YAML string or a path.
        plugins: The plugin manager providing reducers and adapters (default: a fresh one).

    Raises:
        UnsupportedModelError: no adapter for ``model.config.model_type`` (the message lists the
            supported types and the docs on adding one).
        PipelineError: the pipeline is invalid, or a stage's layer does not exist in this model.
        TokenpruneError: the model already has a pipeline applied, or its attention implementation
            cannot be probed.

    Example::

        with tp.apply(model, "pipeline.yaml") as run:
            out = model.generate(**inputs, max_new_tokens=32)
        print(run.stats.summary())
    """
    manager = plugins if plugins is not None else get_plugin_manager()
    pipe = load_pipeline(pipeline, registry=manager.reducers)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"tokenprune.apply needs a transformers model with a config, got {type(model).__name__}")
    adapter = manager.adapters.get(model_type)(model)
    if model in _ACTIVE:
        raise TokenpruneError(
            "this model already has a tokenprune pipeline applied; call .remove() on that handle (or leave its "
            "`with` block) before applying another"
        )
    run = PruningRun(model, pipe, adapter, manager.reducers)
    try:
        run._install()
    except BaseException:
        run.remove()
        raise
    _ACTIVE[model] = run
    return run


@dataclass
class _Entry:
    index: int
    stage: Stage
    reducer: TokenReducer
    who: str


@dataclass
class _Seq:
    """The sequence at some point of the LLM; every field is ``(B, L)``.

    ``orig``: column in the caller's ``input_ids`` (-1 for an engine padding slot). ``src0``: column
    in the language model's input sequence (-1 for padding). ``valid``: attended (a real token).
    """

    orig: Tensor
    src0: Tensor
    valid: Tensor
    visual: Tensor
    sizes: Tensor
    layout: TokenLayout | None
    rows: Tensor  # (R, B, L) positions
    freed: Tensor  # (R, B) cumulative freed positions (compact policy), relative to the caller's
    has_padding_slots: bool = False

    def gather(self, idx: Tensor) -> _Seq:
        pad = idx < 0
        safe = idx.clamp(min=0)

        def g(t: Tensor, fill: Any) -> Tensor:
            return t.gather(1, safe).masked_fill(pad, fill)

        return _Seq(
            orig=g(self.orig, -1),
            src0=g(self.src0, -1),
            valid=g(self.valid, False),
            visual=g(self.visual, False),
            sizes=g(self.sizes, 0.0),
            layout=self.layout.gather(idx) if self.layout is not None else None,
            rows=P.gather(self.rows, idx),
            freed=self.freed,
            has_padding_slots=bool(pad.any()),
        )


@dataclass
class _State:
    """One prefill and the decoding steps that follow it."""

    visual: Tensor
    mask2d: Tensor
    length: int  # caller's prefill length
    lm_len: int = 0  # language-model input length after post_projector stages
    lm_mask2d: Tensor | None = None
    lm_changed: bool = False
    lm_freed: Tensor | None = None  # (R, B)
    current: _Seq | None = None
    segments: dict[int, _Seq] = field(default_factory=dict)  # first layer -> sequence
    prefill: bool = True
    extra: int = 0  # tokens decoded since the prefill
    q: int = 0
    decode_rows: Tensor | None = None  # (R, B, q) positions of the current decoding step (LM level)
    final: _Seq | None = None
    lm_seq: _Seq | None = None


class PruningRun:
    """The handle returned by :func:`apply`: remove the hooks, read the statistics.

    Attributes:
        model: The model the pipeline is applied to.
        pipeline: The validated pipeline.
        adapter: The model family's adapter.
        stats: Per-forward statistics (:class:`tokenprune.stats.RunStats`).
    """

    def __init__(self, model: nn.Module, pipeline: Pipeline, adapter: ModelAdapter, registry: ReducerRegistry) -> None:
        self.model = model
        self.pipeline = pipeline
        self.adapter = adapter
        self.stats = RunStats()
        self._registry = registry
        self._handles: list[RemovableHandle] = []
        self._patched: list[tuple[nn.Module, str, Any, bool]] = []
        self._probe: AttentionProbe | None = None
        self._state: _State | None = None
        self._fs: ForwardStats | None = None
        self._image_call: ImageCall | None = None
        self._labels: Tensor | None = None
        self._real: list[int] = []
        self._removed = False
        reducers = pipeline.build_reducers(registry)
        self._entries = [
            _Entry(i, stage, reducer, registry.describe(stage.reducer))
            for i, (stage, reducer) in enumerate(zip(pipeline.stages, reducers, strict=False))
        ]
        self._post = [e for e in self._entries if e.stage.point.kind == "post_projector"]
        self._layer: dict[int, list[_Entry]] = {}
        for e in self._entries:
            if e.stage.point.kind == "layer":
                self._layer.setdefault(int(e.stage.point.layer), []).append(e)  # type: ignore[arg-type]

    # --- public -------------------------------------------------------------------------------

    @property
    def reducers(self) -> list[TokenReducer]:
        """The reducer instance of each stage, in pipeline order."""
        return [e.reducer for e in self._entries]

    def remove(self) -> None:
        """Take every hook away and restore the model; safe to call twice."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, name, value, had in reversed(self._patched):
            if had:
                module.__dict__[name] = value
            else:
                module.__dict__.pop(name, None)
        self._patched.clear()
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        self._state = None
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._removed = True

    def __enter__(self) -> PruningRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        stages = ", ".join(f"{e.stage.reducer}@{e.stage.point}" for e in self._entries) or "no stages"
        state = "removed" if self._removed else "active"
        return f"PruningRun({self.adapter.name}: {stages}; {state})"

    # --- installation -------------------------------------------------------------------------

    def _install(self) -> None:
        adapter = self.adapter
        vlm = adapter.vlm()
        lm = adapter.language_model()
        layers = list(adapter.decoder_layers())
        n = len(layers)
        for k in self._layer:
            if k >= n:
                e = self._layer[k][0]
                raise TokenpruneError(
                    f"stage {e.index} ({e.stage.reducer!r}) runs at layer {k}, but this model's language model has "
                    f"{n} decoder layers; use a layer between 1 and {n - 1}"
                )
        for e in self._entries:
            try:
                e.reducer.bind(self.model, e.stage.point)
            except ReducerInputError as exc:
                raise ReducerInputError(f"stage {e.index} ({e.stage.reducer!r} at {e.stage.point}): {exc}") from exc
        impl = getattr(adapter.text_config(), "_attn_implementation", None)
        if self._entries and impl not in ("sdpa", "eager"):
            raise TokenpruneError(
                f"tokenprune supports the 'sdpa' and 'eager' attention implementations, but the language model uses "
                f"{impl!r}; load the model with attn_implementation='sdpa'"
            )
        self._mask_is_bool = impl != "eager"
        probed: dict[int, frozenset[str]] = {}
        for k, entries in self._layer.items():
            sources: frozenset[str] = frozenset()
            for e in entries:
                sources |= e.reducer.attention_sources()
            if sources:
                probed[k - 1] = sources
        if probed:
            self._probe = AttentionProbe(layers=probed, rows=self._probe_rows)
            self._probe.install(lm, layers)

        self._handles.append(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._top_post, with_kwargs=True))
        self._handles.append(vlm.register_forward_pre_hook(self._vlm_pre, with_kwargs=True))
        self._handles.append(vlm.register_forward_hook(self._vlm_post, with_kwargs=True))
        self._handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
        for k in self._layer:
            self._handles.append(layers[k - 1].register_forward_hook(self._layer_post(k), with_kwargs=True))
        self._wrap_image_features(vlm)

    def _wrap_image_features(self, vlm: nn.Module) -> None:
        original = getattr(vlm, "get_image_features", None)
        if original is None:
            return
        had = "get_image_features" in vlm.__dict__
        previous = vlm.__dict__.get("get_image_features")

        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self._image_call = ImageCall(args, kwargs, out)
            return out

        get_image_features.__wrapped__ = original  # type: ignore[attr-defined]
        get_image_features.__doc__ = original.__doc__
        vlm.__dict__["get_image_features"] = get_image_features
        self._patched.append((vlm, "get_image_features", previous, had))

    # --- hooks: top model (labels, loss) ------------------------------------------------------

    def _top_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._labels = None
        kw = _bind(module.forward, args, kwargs)
        labels = kw.get("labels")
        if labels is not None and self._entries:
            self._labels = labels
            kw["labels"] = None
            return (), kw
        return None

    def _top_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        labels, self._labels = self._labels, None
        st = self._state
        if st is not None and st.prefill:
            st.prefill = False
            if self._probe is not None:
                self._probe.active = False
        if labels is None or getattr(output, "logits", None) is None:
            return None
        final = st.final if st is not None else None
        if final is not None:
            labels = labels.gather(1, final.orig.clamp(min=0)).masked_fill(final.orig < 0, -100)
        text_cfg = self.model.config.get_text_config()
        output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=text_cfg.vocab_size)
        return output

    # --- hooks: multimodal base model (phase, decoding masks and positions) ---------------------

    def _vlm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kw = _bind(module.forward, args, kwargs)
        input_ids = kw.get("input_ids")
        embeds = kw.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, q = int(ref.shape[0]), int(ref.shape[1])
        # transformers 5.24 renamed the multimodal models' `past_key_values` argument to `cache`.
        cache = kw.get("cache", kw.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            self._fs = ForwardStats("prefill", batch)
            self.stats.forwards.append(self._fs)
            self._state = None
            mask = kw.get("attention_mask")
            self._real = mask.sum(1).tolist() if isinstance(mask, Tensor) and mask.dim() == 2 else [q] * batch
            if input_ids is None or not self._entries:
                self._image_call = None
                return None
            visual = self.adapter.visual_mask(input_ids)
            if not bool(visual.any()):
                self._image_call = None
                return None
            mask = kw.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                mask2d = mask.bool()
            else:
                mask2d = torch.ones(batch, q, dtype=torch.bool, device=input_ids.device)
            self._state = _State(visual=visual, mask2d=mask2d, length=q)
            if self._probe is not None:
                self._probe.active = True
                self._probe.scores.clear()
            return None
        self._fs = ForwardStats("decode", batch)
        self.stats.forwards.append(self._fs)
        st = self._state
        if st is None:
            return None
        st.prefill = False
        st.q = q
        if not st.lm_changed:
            return None
        mask = kw.get("attention_mask")
        position_ids = kw.get("position_ids")
        if position_ids is None:
            position_ids = self.adapter.decode_positions(kw, st.length + st.extra, q)
        if isinstance(mask, Tensor) and mask.dim() == 2:
            expected = st.length + st.extra + q
            if mask.shape[1] != expected:
                raise TokenpruneError(
                    f"decoding step: attention_mask covers {mask.shape[1]} tokens, but the unpruned sequence so far "
                    f"has {expected}; pass the mask over the full (unpruned) sequence, as generate() does"
                )
            kw["attention_mask"] = torch.cat([st.lm_mask2d.to(mask.dtype), mask[:, st.length :]], dim=1)
        elif mask is None:
            ones = torch.ones(batch, st.extra + q, dtype=torch.long, device=ref.device)
            kw["attention_mask"] = torch.cat([st.lm_mask2d.long(), ones], dim=1)
        else:
            raise TokenpruneError(
                "decoding step after a pruned prefill: only 2-D attention masks (or none) can be mapped onto the "
                "pruned cache; pass a (batch, length) attention_mask"
            )
        if self.pipeline.positions == "compact" and st.lm_freed is not None:
            rows, fmt = P.to_rows(position_ids, batch)
            position_ids = P.from_rows(rows - st.lm_freed.unsqueeze(-1), fmt)
        kw["position_ids"] = position_ids
        return (), kw

    def _vlm_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        st = self._state
        if st is not None and not st.prefill:
            st.extra += st.q
        return None

    # --- hooks: language model (post_projector stages) ----------------------------------------

    def _lm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        st = self._state
        if st is None:
            return None
        kw = _bind(module.forward, args, kwargs)
        hidden = kw.get("inputs_embeds")
        if hidden is None:
            raise TokenpruneError(
                f"{type(module).__name__} was called without inputs_embeds; the {self.adapter.name} adapter expects "
                "the multimodal model to merge image features before the language model"
            )
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        position_ids = kw.get("position_ids")
        if not st.prefill:
            if position_ids is not None:
                st.decode_rows = P.to_rows(position_ids, batch)[0]
            else:
                st.decode_rows = torch.arange(
                    st.lm_len + st.extra, st.lm_len + st.extra + length, device=hidden.device
                )[None, None].expand(1, batch, -1)
            return None
        if length != st.length:
            raise TokenpruneError(
                f"the language model received {length} tokens but input_ids has {st.length}; the "
                f"{self.adapter.name} adapter cannot locate the visual tokens"
            )
        device = hidden.device
        if position_ids is None:
            rows = torch.arange(length, device=device)[None, None].expand(1, batch, -1)
            fmt = P.PositionFormat(2)
        else:
            rows, fmt = P.to_rows(position_ids, batch)
        arange = torch.arange(length, device=device).expand(batch, -1)
        seq = _Seq(
            orig=arange,
            src0=arange,
            valid=st.mask2d,
            visual=st.visual,
            sizes=torch.ones(batch, length, device=device),
            layout=self._layout(st.visual),
            rows=rows,
            freed=torch.zeros(rows.shape[0], batch, dtype=torch.long, device=device),
        )
        self._image_call = None
        changed = False
        for entry in self._post:
            hidden, seq, stage_changed, _ = self._run_stage(entry, hidden, seq, None)
            changed = changed or stage_changed
        st.lm_len = int(hidden.shape[1])
        st.lm_changed = changed
        st.lm_freed = seq.freed
        st.lm_mask2d = seq.valid.long()
        if changed:
            kw["inputs_embeds"] = hidden
            mask = kw.get("attention_mask")
            if mask is None or (isinstance(mask, Tensor) and mask.dim() == 2):
                dtype = mask.dtype if isinstance(mask, Tensor) else torch.long
                kw["attention_mask"] = seq.valid.to(dtype)
            elif isinstance(mask, dict):
                kw["attention_mask"] = {
                    name: self._slice_mask(m, seq.orig, seq.orig, seq.valid) for name, m in mask.items()
                }
            else:
                kw["attention_mask"] = self._slice_mask(mask, seq.orig, seq.orig, seq.valid)
            kw["position_ids"] = P.from_rows(seq.rows, fmt)
        lm_seq = replace(seq, src0=torch.arange(st.lm_len, device=device).expand(batch, -1), has_padding_slots=False)
        st.current = lm_seq
        st.final = lm_seq
        st.lm_seq = lm_seq
        return ((), kw) if changed else None

    # --- hooks: decoder layers (layer stages) -------------------------------------------------

    def _probe_rows(self, layer: int) -> ProbeRows | None:
        st = self._state
        if st is None or st.current is None:
            return None
        return ProbeRows(visual=st.current.visual, valid=st.current.valid)

    def _layer_post(self, k: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            st = self._state
            if st is None or not st.prefill or st.current is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            seq = st.current
            attention = None
            if self._probe is not None and (k - 1) in self._probe.layers:
                attention = self._probe.scores.get(k - 1)
                if attention is None:
                    raise TokenpruneError(
                        f"the attention probe recorded nothing at layer {k - 1}; the layer's attention did not go "
                        "through the probe (is the attention implementation overridden elsewhere?)"
                    )
            changed = False
            for entry in self._layer[k]:
                hidden, seq, stage_changed, idx = self._run_stage(entry, hidden, seq, attention)
                if stage_changed and attention is not None:
                    attention = {
                        s: a.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0) for s, a in attention.items()
                    }
                changed = changed or stage_changed
            if not changed:
                return None
            st.current = seq
            st.final = seq
            st.segments[k] = seq
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook

    def _segment(self, st: _State, layer: int) -> _Seq | None:
        best = None
        for k, seq in st.segments.items():
            if k <= layer and (best is None or k > best[0]):
                best = (k, seq)
        return best[1] if best is not None else None

    def _layer_pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs.get("hidden_states")
            st = self._state
            seg = self._segment(st, i) if st is not None else None
            if self._fs is not None and isinstance(hidden, Tensor):
                if st is not None and st.prefill and st.lm_seq is not None:
                    cur = seg if seg is not None else st.lm_seq
                    self._fs.layer_tokens.append(cur.valid.sum(1).tolist())
                elif self._fs.phase == "prefill" and len(self._real) == int(hidden.shape[0]):
                    self._fs.layer_tokens.append([int(r) for r in self._real])  # unchanged: the real tokens
                else:
                    self._fs.layer_tokens.append([int(hidden.shape[1])] * int(hidden.shape[0]))
                self._fs.layer_width.append(int(hidden.shape[1]))
            if seg is None or st is None:
                return None
            mask = kwargs.get("attention_mask")
            pe = kwargs.get("position_embeddings")
            pos = kwargs.get("position_ids")
            compact = self.pipeline.positions == "compact"
            if st.prefill:
                kwargs["attention_mask"] = self._slice_mask(mask, seg.src0, seg.src0, seg.valid)
                if compact:
                    kwargs["position_embeddings"] = self.adapter.rotary(hidden, seg.rows, i)
                elif pe is not None:
                    kwargs["position_embeddings"] = tuple(_gather_seq(t, seg.src0) for t in pe)
                if isinstance(pos, Tensor):
                    kwargs["position_ids"] = _gather_last(pos, seg.src0) if not compact else _rows_like(seg.rows, pos)
                return args, kwargs
            # Decoding: the new token attends to every kept token of this layer's cache that is not
            # padding, and to the tokens decoded so far. The model sized its mask from some layer's cache
            # (layer 0, or the first layer of that attention type, which may be pruned), so it is rebuilt
            # over this layer's own cache rather than sliced.
            extra = st.extra + st.q
            valid = torch.cat([seg.valid, seg.valid.new_ones(seg.valid.shape[0], extra)], 1)
            if mask is not None and mask.shape[-1] not in (st.lm_len + extra, valid.shape[1]):
                raise TokenpruneError(
                    f"decoding step at layer {i}: the attention mask covers {mask.shape[-1]} keys, expected "
                    f"{st.lm_len + extra} (unpruned cache plus new tokens) or {valid.shape[1]} (this layer's cache)"
                )
            if mask is not None or seg.has_padding_slots or not bool(seg.valid.all()):
                kwargs["attention_mask"] = self._build_mask(valid, q=st.q)
            if compact and st.decode_rows is not None:
                rows = st.decode_rows - (seg.freed - st.lm_freed).unsqueeze(-1)
                kwargs["position_embeddings"] = self.adapter.rotary(hidden, rows, i)
                if isinstance(pos, Tensor):
                    kwargs["position_ids"] = _rows_like(rows, pos)
            return args, kwargs

        return hook

    # --- stages -------------------------------------------------------------------------------

    def _run_stage(
        self, entry: _Entry, hidden: Tensor, seq: _Seq, attention: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, _Seq, bool, Tensor]:
        """Run one stage on ``hidden`` (``(B, L, D)``); returns the new hidden states and sequence,
        whether anything changed, and the ``(B, L')`` columns of ``hidden`` that were kept."""
        batch, length, dim = hidden.shape
        device = hidden.device
        vis = Selection.from_mask(seq.visual)
        vis_idx = vis.indices
        n = int(vis_idx.shape[1])
        valid_v = vis_idx >= 0
        safe = vis_idx.clamp(min=0)
        tokens = hidden.gather(1, safe.unsqueeze(-1).expand(-1, -1, dim))
        layout_v = seq.layout.gather(vis_idx) if seq.layout is not None else None
        if layout_v is not None and self.pipeline.protect_newlines:
            protected = layout_v.newline & valid_v
        else:
            protected = torch.zeros_like(valid_v)
        sizes_v = seq.sizes.gather(1, safe).masked_fill(~valid_v, 1.0)
        budget = budget_per_sample(entry.stage.keep, valid_v, protected)
        att_v: dict[str, Tensor] = {}
        if attention is not None:
            att_v = {s: a.gather(1, safe).masked_fill(~valid_v, 0.0) for s, a in attention.items()}
        text = text_valid = None
        cls = type(entry.reducer)
        if cls.capabilities.needs_text:
            tsel = Selection.from_mask(seq.valid & ~seq.visual)
            text_valid = tsel.indices >= 0
            text = hidden.gather(1, tsel.indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim))
        ctx = ReduceContext(
            at=entry.stage.point,
            budget=budget,
            valid=valid_v,
            protected=protected,
            sizes=sizes_v,
            layout=layout_v,
            attention=att_v,
            text=text,
            text_valid=text_valid,
            stage_index=entry.index,
        )
        start = time.perf_counter()
        result = entry.reducer.reduce(tokens, ctx)
        selection = check_reduction(result, tokens, ctx, who=entry.who, capabilities=cls.capabilities)
        merged = merged_sizes = None
        if isinstance(result, Merge):
            merged, merged_sizes, selection = result.apply(tokens, sizes_v, valid_v)
        seconds = time.perf_counter() - start
        if self._fs is not None:
            self._fs.stages.append(
                StageStats(
                    stage=entry.index,
                    at=str(entry.stage.point),
                    reducer=entry.stage.reducer,
                    entering=valid_v.sum(1).tolist(),
                    leaving=selection.counts.tolist(),
                    kept=selection.tolist(),
                    layout=layout_v,
                    seconds=seconds,
                    overhead_macs=entry.reducer.overhead_macs(tokens, ctx),
                )
            )
        # Columns (in this sequence) of the kept visual tokens.
        kept_v = selection.to_mask(n) & valid_v
        dummy = length
        cols_v = torch.where(valid_v, vis_idx, torch.full_like(vis_idx, dummy))
        keep = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)
        keep[:, :length] = seq.valid & ~seq.visual
        keep.scatter_(1, cols_v, kept_v)
        keep = keep[:, :length]
        sizes = seq.sizes
        if merged is not None:
            roots = selection.indices
            root_cols = torch.where(roots >= 0, vis_idx.gather(1, roots.clamp(min=0)), torch.full_like(roots, dummy))
            padded = torch.cat([hidden, hidden.new_zeros(batch, 1, dim)], 1)
            padded = padded.scatter(1, root_cols.unsqueeze(-1).expand(-1, -1, dim), merged.to(hidden.dtype))
            hidden = padded[:, :length]
            psizes = torch.cat([sizes, sizes.new_zeros(batch, 1)], 1)
            psizes = psizes.scatter(1, root_cols, merged_sizes.to(sizes.dtype))
            sizes = psizes[:, :length]
        if merged is None and bool((kept_v == valid_v).all()):
            return hidden, seq, False, torch.arange(length, device=device).expand(batch, -1)
        idx = _left_aligned(keep)
        new = replace(seq, sizes=sizes).gather(idx)
        if self.pipeline.positions == "compact":
            rows, freed = P.compact(seq.rows, idx, seq.orig >= 0)
            new.rows = rows
            new.freed = seq.freed + freed
        pad = (idx < 0).unsqueeze(-1)
        new_hidden = hidden.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim)).masked_fill(pad, 0.0)
        return new_hidden, new, True, idx

    def _layout_mismatch(self, sizes: list[int], counts: list[int]) -> str:
        return (
            f"adapter {self.adapter.name!r}: image_layouts() describes images of {sizes} tokens, but visual_mask() "
            f"marks {counts} visual tokens per sample; the layouts must cover exactly the tokens the mask marks "
            "(check tokenprune.testing_adapters.check_layout_covers_visual_tokens)"
        )

    def _layout(self, visual: Tensor) -> TokenLayout | None:
        call = self._image_call
        if call is None:
            return None
        layouts = self.adapter.image_layouts(call)
        try:
            return sequence_layout(layouts, visual)
        except ValueError:
            raise TokenpruneError(
                self._layout_mismatch([int(lay.shape[1]) for lay in layouts], visual.sum(1).tolist())
            ) from None

    # --- masks --------------------------------------------------------------------------------

    def _slice_mask(self, mask: Any, q_idx: Tensor, k_idx: Tensor, valid: Tensor) -> Any:
        """A 4-D mask of the pruned sequence: rows ``q_idx``, columns ``k_idx`` of ``mask``."""
        if mask is None:
            return self._build_mask(valid, q=valid.shape[1])
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            raise TokenpruneError(
                f"unsupported attention mask at a pruned layer ({type(mask).__name__}"
                f"{'' if not isinstance(mask, Tensor) else ' of shape ' + str(tuple(mask.shape))}); tokenprune "
                "handles sdpa and eager masks"
            )
        batch = q_idx.shape[0]
        m = mask.expand(batch, -1, -1, -1)
        heads, lq, lk = m.shape[1], q_idx.shape[1], k_idx.shape[1]
        m = m.gather(2, q_idx.clamp(min=0)[:, None, :, None].expand(batch, heads, lq, m.shape[3]))
        m = m.gather(3, k_idx.clamp(min=0)[:, None, None, :].expand(batch, heads, lq, lk))
        return m.masked_fill((k_idx < 0)[:, None, None, :], _masked_value(m))

    def _build_mask(self, key_valid: Tensor, q: int) -> Tensor:
        """Causal ``(B, 1, q, Lk)`` mask over ``key_valid`` keys, the queries being the last ``q``."""
        lk = key_valid.shape[1]
        q_pos = torch.arange(lk - q, lk, device=key_valid.device)
        causal = torch.arange(lk, device=key_valid.device)[None, :] <= q_pos[:, None]
        allowed = causal[None, None] & key_valid[:, None, None, :]
        if self._mask_is_bool:
            return allowed
        dtype = (
            self.adapter.language_model().dtype if hasattr(self.adapter.language_model(), "dtype") else torch.float32
        )
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


# --- helpers ----------------------------------------------------------------------------------------


def _bind(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a call as keywords (a ``**kwargs`` catch-all flattened)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{fn!r}: positional catch-all arguments are not supported")
        else:
            out[name] = value
    return out


def _left_aligned(keep: Tensor) -> Tensor:
    """``(B, L')`` column indices of the kept columns, right-aligned, ``-1`` on the left."""
    sel = Selection.from_mask(keep)
    width = sel.indices.shape[1]
    shift = width - sel.counts  # (B,)
    j = torch.arange(width, device=keep.device).expand(keep.shape[0], -1)
    src = j - shift.unsqueeze(1)
    out = sel.indices.gather(1, src.clamp(min=0))
    return out.masked_fill(src < 0, -1)


def _gather_seq(t: Tensor, idx: Tensor) -> Tensor:
    """Gather dim 1 of ``(B or 1, L, ...)`` ``t`` at ``(B, L')`` ``idx``."""
    batch = idx.shape[0]
    t = t.expand(batch, *t.shape[1:])
    shape = (batch, idx.shape[1], *t.shape[2:])
    index = idx.clamp(min=0).view(batch, idx.shape[1], *([1] * (t.dim() - 2))).expand(shape)
    return t.gather(1, index)


def _gather_last(t: Tensor, idx: Tensor) -> Tensor:
    """Gather the last (sequence) axis of ``(B, L)`` or ``(R, B, L)`` position ids."""
    if t.dim() == 2:
        return t.expand(idx.shape[0], -1).gather(1, idx.clamp(min=0))
    return t.expand(-1, idx.shape[0], -1).gather(2, idx.clamp(min=0).unsqueeze(0).expand(t.shape[0], -1, -1))


def _rows_like(rows: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 2:
        return rows[0]
    return rows[-like.shape[0] :]


def _masked_value(m: Tensor) -> Any:
    return False if m.dtype == torch.bool else torch.finfo(m.dtype).min


__all__ = ["PruningRun", "apply"]
