"""The hooks that run a pipeline inside the model's forward: prefill, post_projector and layer stages, decoding.

:class:`ForwardHooks` is the machinery behind :class:`~tokenprune.engine.PruningRun`; it owns the
hooks (:class:`~tokenprune.engine.hooks.HookSet`), the attention probe and the per-forward state
(:class:`~tokenprune.engine.state.PrefillState`), and hands every stage to
:func:`~tokenprune.engine.stage.run_stage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.channels import SignalChannel, produce_channels
from tokenprune.engine import compat
from tokenprune.engine import positions as P
from tokenprune.engine.calls import FeatureCalls
from tokenprune.engine.decode import (
    check_decoding_mask,
    decoding_positions,
    model_decoding_kwargs,
    pruned_layer_call,
)
from tokenprune.engine.decode_stage import KeySubset, key_subset, run_decode_stage
from tokenprune.engine.guards import (
    bind_stages,
    check_attention_implementation,
    check_decode_layer,
    check_every_stage_ran,
    check_layers_exist,
    refuse_embeds_without_ids,
)
from tokenprune.engine.hooks import HookSet, bind_arguments
from tokenprune.engine.hybrid import check_attention_layers, is_recurrent, layer_kinds
from tokenprune.engine.layer_args import LayerArg, cut_lm_inputs, layer_args_of, positional_names
from tokenprune.engine.masks import mask_kind, pruned_input_mask
from tokenprune.engine.pre_projector import PreProjector
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.residuals import add_layer_residual, adds_visual_residuals
from tokenprune.engine.sequence import TokenSequence, input_sequence, kept_labels, residual_sequence, visual_layout
from tokenprune.engine.signals import (
    DryCall,
    attention_probe_for,
    follow_columns,
    follow_text_attention,
    probed_attention,
    stage_signals,
    with_text_signals,
)
from tokenprune.engine.stage import (
    StageOutcome,
    StagePlan,
    StageSignals,
    plans_by_layer,
    run_stage,
)
from tokenprune.engine.state import PrefillState, record_layer_tokens
from tokenprune.engine.stats import ForwardStats, RunStats
from tokenprune.engine.stopwatch import Stopwatch
from tokenprune.engine.vision import VisionProbe, post_projector_vision_signals, vision_probe_for
from tokenprune.engine.vision_layer import VisionLayerStages
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline


class ForwardHooks:
    """The engine's hooks on one model for one pipeline.

    Args:
        model: The top-level VLM.
        pipeline: The validated pipeline.
        adapter: The model family's adapter.
        plans: One :class:`StagePlan` per stage, in pipeline order.
        stats: Where each forward's statistics are appended.
        channels: The signal channels the stages read (:mod:`tokenprune.channels`).
    """

    def __init__(
        self,
        model: nn.Module,
        pipeline: Pipeline,
        adapter: ModelAdapter,
        plans: list[StagePlan],
        stats: RunStats,
        channels: Sequence[SignalChannel] = (),
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.adapter = adapter
        self.stats = stats
        self.probe: AttentionProbe | None = None
        self.vision_probe: VisionProbe | None = None
        self._plans = plans
        self._channels = tuple(channels)
        self.stopwatch = Stopwatch()
        self._hooks = HookSet(self.stopwatch)
        self._stopwatch_mark = 0.0  # the stopwatch when this forward's first hook began
        self._state: PrefillState | None = None
        self._forward: ForwardStats | None = None
        self._calls = FeatureCalls()
        self._labels: Tensor | None = None
        self._real_tokens: list[int] = []
        self._input_width = 0  # the multimodal model's input length in this forward
        self._post = [p for p in plans if p.stage.point.kind == "post_projector"]
        pre = [p for p in plans if p.stage.point.kind == "pre_projector"]
        tower = [p for p in plans if p.stage.point.kind == "vision_layer"]
        self._tower = VisionLayerStages(tower, adapter, self._calls) if tower else None
        self._pre = PreProjector(pre, adapter, self._calls, self._tower) if pre or tower else None
        self._layer = plans_by_layer(plans)
        self._decode = next((p for p in plans if p.stage.point.kind == "decode"), None)
        self._decode_layer = self._decode.stage.point.layer if self._decode is not None else None
        # without a stage inside the language model every decoder layer holds its input: no per-layer hooks,
        # _vlm_post records the layers at once (a hook dispatch per layer and step spared)
        self._inside_lm = bool(self._layer) or self._decode is not None
        self._left_out: Tensor | None = None  # the decode stage's language-model columns left out this step
        self._subsets: dict[tuple[int, int], KeySubset] = {}
        self._compact = pipeline.positions == "compact"
        self._masks: dict[str, Any] = {}
        self._layers: list[nn.Module] = []
        self._layer_args: dict[str, LayerArg] = {}
        self._arg_names: list[tuple[str, ...]] = []
        self._recurrent: list[bool] = []  # per decoder layer: linear attention or convolution (engine/hybrid.py)
        self._layer_kwargs: dict[str, Any] | None = None  # the last decoder layer's keyword arguments, unsliced

    def remove(self) -> None:
        """Take every hook and the probe away; safe to call twice."""
        self._hooks.remove()
        if self.probe is not None:
            self.probe.remove()
            self.probe = None
        if self.vision_probe is not None:
            self.vision_probe.remove()
            self.vision_probe = None
        self._state = None

    # --- installation -------------------------------------------------------------------------

    def install(self) -> None:
        """Check the model against the stages, then install every hook (on failure the caller removes)."""
        vlm, lm = self.adapter.vlm(), self.adapter.language_model()
        layers = list(self.adapter.decoder_layers())
        decode = {self._decode_layer: [self._decode]} if self._decode is not None and self._decode_layer else {}
        check_layers_exist({**self._layer, **decode}, len(layers))
        if self._decode_layer:
            check_decode_layer(self._decode_layer, layers)
        bind_stages(self._plans, self.model)
        impl = compat.attention_implementation(self.adapter.text_config())
        if self._plans:
            check_attention_implementation(impl)
        self._masks = mask_kind(self.adapter, boolean=impl != "eager")
        compat.cache_argument_name(vlm.forward)  # refuse, at apply time, a release whose cache argument is unknown
        self._layers = layers
        self._layer_args = layer_args_of(self.adapter)  # how each per-token layer argument follows a cut
        self._arg_names = [positional_names(layer) for layer in layers]
        kinds = layer_kinds(self.adapter.text_config(), layers)
        check_attention_layers(self._layer, self._decode, kinds)
        self._recurrent = [is_recurrent(kind) for kind in kinds]
        self.probe = attention_probe_for(self._layer, self._probe_rows, lm, layers, self._decode)
        if self.probe is not None:
            self.probe.stopwatch = self.stopwatch
        if self.probe is not None and self._decode is not None:
            self.probe.subset = self._key_subset
        pre = self._pre.plans if self._pre is not None else []
        self.vision_probe = vision_probe_for(pre + self._post, self.adapter)
        if self.vision_probe is not None:
            self.vision_probe.stopwatch = self.stopwatch
            self.vision_probe.install()
        hooks = self._hooks
        hooks.pre(self.model, self._top_pre)
        hooks.post(self.model, self._top_post, always=True)
        hooks.pre(vlm, self._vlm_pre)
        hooks.post(vlm, self._vlm_post)
        hooks.pre(lm, self._lm_pre)
        if self._inside_lm:
            for i, layer in enumerate(layers):
                hooks.pre(layer, self._layer_pre(i))
        if adds_visual_residuals(self.adapter):  # before the stages: layer k's input holds layer k - 1's features
            for i, layer in enumerate(layers):
                hooks.post(layer, self._residual_post(i))
        for k in sorted(set(self._layer) | {c.layer for c in self._channels if c.layer > 0}):
            hooks.post(layers[k - 1], self._layer_post(k))
        self._calls.vision_probe = self.vision_probe
        self._calls.install(hooks, vlm)
        if self._tower is not None:
            self._tower.install(hooks, [p for p in self._plans if p.needs.vision_attention is not None])
        if self._pre is not None:  # after the feature calls' wrappers: it reads whether a video call runs
            self._pre.install(hooks, self.vision_probe)

    def _forget_forward(self) -> None:
        """Drop what one forward left behind (after it raised, the next call starts clean)."""
        self._state = None
        self._calls.clear()
        if self._pre is not None:
            self._pre.clear()
        self._labels = None
        for probe in (self.probe, self.vision_probe):
            if probe is not None:
                probe.reset(active=False)
        self._layer_kwargs = None
        self._end_decode_step()

    # --- hooks: top model (labels, loss) ------------------------------------------------------

    def _top_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._stopwatch_mark = self.stopwatch.seconds
        self._labels = None
        kw = bind_arguments(module.forward, args, kwargs)
        labels = kw.get("labels")
        if labels is not None and self._plans:
            self._labels = labels
            kw["labels"] = None
            return (), kw
        return None

    def _top_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if output is None:  # the forward raised
            self._forget_forward()
            return None
        labels, self._labels = self._labels, None
        self._end_decode_step()
        if self._forward is not None:
            self._forward.engine_seconds = self.stopwatch.seconds - self._stopwatch_mark
        st = self._state
        if st is not None and st.in_prefill:
            st.in_prefill = False
            st.lm_embeds = None
            if self.probe is not None:
                self.probe.active = False
            if self.vision_probe is not None:
                self.vision_probe.reset(active=False)
        if labels is None or getattr(output, "logits", None) is None:
            return None
        labels = kept_labels(labels, st.final if st is not None else None)
        vocab = self.model.config.get_text_config().vocab_size
        output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=vocab)
        return output

    # --- hooks: multimodal base model (phase, decoding masks and positions) ---------------------

    def _vlm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kw = bind_arguments(module.forward, args, kwargs)
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        batch, q = int(ref.shape[0]), int(ref.shape[1])
        self._input_width = q
        if compat.cache_length(compat.cache_from_kwargs(kw)) == 0:
            self._start_prefill(kw, batch, q)
            return None
        self._forward = ForwardStats("decode", batch)
        self.stats.forwards.append(self._forward)
        st = self._state
        if st is None:
            return None
        st.in_prefill = False
        st.step_length = q
        check_decoding_mask(kw.get("attention_mask"), st)
        if self._decode is not None and self.probe is not None:
            self.probe.decoding = True
        if not st.lm_pruned:
            return None
        return (), model_decoding_kwargs(kw, st, self.adapter, self._compact)

    def _start_prefill(self, kw: dict[str, Any], batch: int, q: int) -> None:
        self._forward = ForwardStats("prefill", batch)
        self.stats.forwards.append(self._forward)
        self._state = None
        mask = kw.get("attention_mask")
        two_d = isinstance(mask, Tensor) and mask.dim() == 2
        self._real_tokens = mask.sum(1).tolist() if two_d else [q] * batch
        input_ids = kw.get("input_ids")
        if not self._plans:
            self._calls.clear()
            return
        if input_ids is None:
            refuse_embeds_without_ids(kw, self.adapter.name)
            self._calls.clear()
            return
        video = self.adapter.video_mask(input_ids)
        visual = self.adapter.visual_mask(input_ids) | video
        if not bool(visual.any()):
            self._calls.clear()
            return
        input_mask = mask.bool() if two_d else torch.ones(batch, q, dtype=torch.bool, device=input_ids.device)
        self._state = PrefillState(visual=visual, input_mask=input_mask, input_length=q, video=video)
        if self.probe is not None:
            self.probe.reset(active=True)

    def _vlm_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not self._inside_lm and self._forward is not None:
            self._record_uniform_layers()
        st = self._state
        if st is None:
            return
        if st.in_prefill:
            prefill_plans = [p for p in self._plans if p is not self._decode]
            check_every_stage_ran(prefill_plans, st.stages_run, self.model.config.model_type)
        else:
            st.decoded += st.step_length
            st.decode_steps += 1

    def _record_uniform_layers(self) -> None:
        """Record every decoder layer's tokens when no stage changes them inside the language model."""
        st, fs = self._state, self._forward
        if st is not None and st.in_prefill:
            width = st.lm_length
        elif st is not None:
            width = st.step_length
        else:
            width = self._input_width
        record_layer_tokens(fs, st, None, fs.batch_size, width, self._real_tokens, layers=len(self._layers))

    # --- hooks: language model (post_projector stages) ----------------------------------------

    def _lm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        st = self._state
        if st is None:
            return None
        kw = bind_arguments(module.forward, args, kwargs)
        hidden = kw.get("inputs_embeds")
        if hidden is None:
            raise TokenpruneError(
                f"{type(module).__name__} was called without inputs_embeds; the {self.adapter.name} adapter expects "
                "the multimodal model to merge image features before the language model"
            )
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        position_ids = kw.get("position_ids")
        if not st.in_prefill:
            st.step_positions = decoding_positions(
                position_ids, st.lm_length + st.decoded, batch, length, hidden.device
            )
            return None
        if length != st.input_length:
            raise TokenpruneError(
                f"the language model received {length} tokens but input_ids has {st.input_length}; the "
                f"{self.adapter.name} adapter cannot locate the visual tokens"
            )
        calls = self._calls
        layout = visual_layout(self.adapter, calls.image, calls.video, st.visual, st.video)
        seq, fmt = input_sequence(hidden, st.input_mask, st.visual, layout, position_ids, video=st.video)
        vision = post_projector_vision_signals(
            self.vision_probe, self.adapter, calls.image, self._post, st.visual, st.video, calls.video
        )
        hidden, seq, changed = self._pre_projector(hidden, seq, st, vision)
        calls.clear()
        residuals = self.adapter.take_visual_residuals(kw)
        if residuals is not None:
            seq.residuals, seq.receives = residual_sequence(residuals, batch, length)
        produce_channels(self._channels, hidden, seq, 0)
        for plan in self._post:
            signal = vision.get(plan.index)
            outcome = self._run(plan, hidden, seq, None, StageSignals(vision=signal) if signal is not None else None)
            hidden, seq, changed = outcome.hidden, outcome.sequence, changed or outcome.changed
            if outcome.changed:
                vision = {i: v.gather(outcome.kept_columns) for i, v in vision.items()}
        st.lm_length = int(hidden.shape[1])
        st.lm_pruned = changed
        st.lm_freed_positions = seq.freed_positions
        st.lm_mask = seq.valid.long()
        if changed:
            kw["inputs_embeds"] = hidden
            kw["attention_mask"] = pruned_input_mask(kw.get("attention_mask"), seq, **self._masks)
            kw["position_ids"] = P.from_rows(seq.positions, fmt)
            cut_lm_inputs(kw, seq.input_column, length)  # per-layer embeddings (Gemma 4)
        lm_columns = torch.arange(st.lm_length, device=hidden.device).expand(batch, -1)
        st.current = st.final = st.lm_sequence = replace(seq, lm_column=lm_columns, has_padding_slots=False)
        st.real_tokens(st.lm_sequence)  # read once here, for every layer's statistics (no host read per layer)
        if any("input_embeddings" in p.needs.signals for p in self._plans):
            st.lm_embeds = hidden
        return ((), kw) if changed or residuals is not None else None

    def _pre_projector(
        self, hidden: Tensor, seq: TokenSequence, st: PrefillState, vision: dict[int, Any]
    ) -> tuple[Tensor, TokenSequence, bool]:
        """Remove what the ``pre_projector`` stages dropped from the language model's input (their stats recorded)."""
        if self._pre is None:
            return hidden, seq, False
        image = st.visual & ~st.video if st.video is not None else st.visual
        hidden, seq, kept, stats = self._pre.apply(hidden, seq, self._calls.image, image, compact=self._compact)
        st.stages_run.update(plan.index for plan in self._pre.all_plans)
        if self._forward is not None:
            self._forward.stages.extend(stats)
        if kept is not None:
            for i, v in vision.items():
                vision[i] = v.gather(kept)
        return hidden, seq, kept is not None

    # --- hooks: decoder layers (layer stages) -------------------------------------------------

    def _probe_rows(self, layer: int) -> ProbeRows | None:
        st = self._state
        if st is None or st.current is None:
            return None
        return ProbeRows(visual=st.current.visual, valid=st.current.valid)

    def _residual_post(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            st = self._state
            if st is None or not st.in_prefill or st.current is None:
                return None
            return add_layer_residual(self.adapter, st.current, output, i)

        return hook

    def _layer_post(self, k: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            st = self._state
            if st is None or not st.in_prefill or st.current is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            produce_channels(self._channels, hidden, st.current, k)
            seq, attention, changed = st.current, probed_attention(self.probe, k), False
            keys = self.probe.key_states.get(k - 1) if self.probe is not None else None
            text_att = self.probe.text_scores.get(k - 1) if self.probe is not None else None
            for plan in self._layer.get(k, ()):
                signals = with_text_signals(plan, self._signals(k, plan, hidden, seq, keys), text_att, st)
                outcome = self._run(plan, hidden, seq, attention, signals)
                hidden, seq = outcome.hidden, outcome.sequence
                if outcome.changed:
                    attention, keys = follow_columns(outcome.kept_columns, attention, keys)
                    text_att = follow_text_attention(outcome.kept_columns, text_att)
                changed = changed or outcome.changed
            if not changed:
                return None
            st.current = st.final = st.segments[k] = seq
            st.real_tokens(seq)  # read once per stage, not in every later layer
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _signals(
        self, k: int, plan: StagePlan, hidden: Tensor, seq: TokenSequence, keys: Tensor | None
    ) -> StageSignals:
        """The layer-stage inputs ``plan``'s reducer asks for, on the sequence it is about to reduce."""
        dry = None
        if plan.needs.own_attention and self.probe is not None and self._state is not None:
            dry = DryCall(self._layers[k], self._layer_kwargs, self._state, self.adapter, self._compact, self._masks)
        return stage_signals(k, plan, hidden, seq, self.probe, dry, keys, self.adapter.language_model())

    def _layer_pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs.get("hidden_states")
            st = self._state
            if self.probe is not None and (i + 1) in self.probe.own and st is not None and st.in_prefill:
                self._layer_kwargs = dict(kwargs)  # the dry call of layer i + 1's own attention reuses them
            seg = st.segment(i) if st is not None else None
            if self._forward is not None and isinstance(hidden, Tensor):
                batch, width = int(hidden.shape[0]), int(hidden.shape[1])
                record_layer_tokens(self._forward, st, seg, batch, width, self._real_tokens)
            if st is not None and not st.in_prefill and i == self._decode_layer:
                self._run_decode_stage(st)
            if seg is None or st is None:
                return None
            return pruned_layer_call(
                args, kwargs, hidden, seg, st, self.adapter, i, compact=self._compact, **self._masks,
                table=self._layer_args, names=self._arg_names[i], recurrent=self._recurrent[i],
            )  # fmt: skip

        return hook

    # --- the decode stage ---------------------------------------------------------------------

    def _run_decode_stage(self, st: PrefillState) -> None:
        """Run the decode stage on layer ``k - 1``'s recorded signals (see :mod:`tokenprune.engine.decode_stage`)."""
        probe, plan, k = self.probe, self._decode, self._decode_layer
        if probe is None or plan is None or not k or probe.decode_scores is None or probe.decode_keys is None:
            return
        seq = self._cache_columns(st, k - 1)
        kw = {"protect_newlines": self.pipeline.protect_newlines}
        self._left_out, stats = run_decode_stage(
            plan, seq, probe.decode_scores, probe.decode_keys, st.decode_steps, st.lm_length, **kw
        )
        self._subsets = {}
        if self._forward is not None:
            self._forward.stages.append(stats)

    def _cache_columns(self, st: PrefillState, layer: int) -> TokenSequence:
        """The prefill columns of ``layer``'s cache."""
        seq = st.segment(layer) or st.lm_sequence
        if seq is None:
            raise TokenpruneError("decode stage: no prefill sequence was recorded for this decoding step")
        return seq

    def _key_subset(self, layer: int, key_length: int) -> KeySubset | None:
        """The probe's callback: the cache columns ``layer`` attends to in this step (``None``: all)."""
        st, left_out = self._state, self._left_out
        if st is None or left_out is None or self._decode_layer is None or layer < self._decode_layer:
            return None
        seq = self._cache_columns(st, layer)
        key = (id(seq), key_length)  # the layers that hold the same columns share one subset: one host read a step
        if key not in self._subsets:
            self._subsets[key] = key_subset(seq, left_out, key_length, st.decoded + st.step_length, layer)
        return self._subsets[key]

    def _end_decode_step(self) -> None:
        self._left_out, self._subsets = None, {}
        if self.probe is not None:
            self.probe.end_decode_step()

    # --- stages -------------------------------------------------------------------------------

    def _run(
        self,
        plan: StagePlan,
        hidden: Tensor,
        seq: TokenSequence,
        attention: Mapping[str, Tensor] | None,
        signals: StageSignals | None = None,
    ) -> StageOutcome:
        kw = {"compact_positions": self._compact, "protect_newlines": self.pipeline.protect_newlines}
        outcome = run_stage(plan, hidden, seq, attention, signals=signals, **kw)
        if self._state is not None:
            self._state.stages_run.add(plan.index)
        if self._forward is not None:
            self._forward.stages.append(outcome.stats)
        return outcome
