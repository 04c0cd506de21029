"""The hooks that run a pipeline inside the model's forward: prefill, post_projector and layer stages, decoding.

:class:`ForwardHooks` is the machinery behind :class:`~tokenprune.engine.PruningRun`. Three objects hold
what it knows, each with one lifetime:

* :class:`~tokenprune.engine.install.InstallPlan`, immutable, built once by :meth:`ForwardHooks.install`:
  the stages by insertion point, the position policy, the mask kind, the decoder layers and their
  per-token arguments;
* :class:`~tokenprune.engine.forward_state.ForwardState`, one per call of the model: created by the first hook
  of a forward and dropped by its last (:meth:`ForwardHooks._end_forward`, the one place it is reset);
  its ``phase`` says whether the call is a prefill or a decoding step;
* :class:`~tokenprune.engine.forward_state.PrefillState`, what the last prefill left for the decoding steps
  after it.

The probes receive what they read: the attention probe gets the query rows of the sequence whenever
a stage changes it (``probe.rows``) and, at a decoding step, what the decode stage left out
(``probe.step_keys``); nothing in a probe calls back into the hooks. Every stage goes through
:func:`~tokenprune.engine.stage.run_stage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.adapters.token_types import typed_video_mask
from tokenprune.channels import SignalChannel, produce_channels
from tokenprune.engine import compat
from tokenprune.engine import positions as P
from tokenprune.engine.attention_signals import attention_probe_for
from tokenprune.engine.deepstack import with_residual_channels
from tokenprune.engine.feature_calls import FeatureCalls
from tokenprune.engine.forward_state import ForwardState, PrefillState, record_layer_tokens
from tokenprune.engine.guards import check_every_stage_ran, refuse_embeds_without_ids
from tokenprune.engine.hooks import HookSet, bind_arguments
from tokenprune.engine.install import plan_install
from tokenprune.engine.kv_sharing import full_prefill
from tokenprune.engine.layer_args import cut_lm_inputs
from tokenprune.engine.layer_hooks import LayerHooks, Live
from tokenprune.engine.masks import pruned_input_mask
from tokenprune.engine.pre_projector import PreProjector
from tokenprune.engine.probe import AttentionProbe
from tokenprune.engine.pruned_inputs import check_decoding_mask, decoding_positions, model_decoding_kwargs
from tokenprune.engine.run_stats import ForwardStats, RunStats
from tokenprune.engine.sequence import (
    TokenSequence,
    input_sequence,
    kept_labels,
    visual_layout,
    without_channels,
)
from tokenprune.engine.stage import StagePlan, StageSignals
from tokenprune.engine.stopwatch import Stopwatch
from tokenprune.engine.vision_layer import VisionLayerStages
from tokenprune.engine.vision_probe import (
    VISION,
    VisionProbe,
    post_projector_vision_signals,
    vision_probe_for,
    vision_signal,
    with_vision_channels,
)
from tokenprune.errors import TokenpruneError
from tokenprune.pipeline import Pipeline

_BETWEEN_FORWARDS = ForwardState()
"""The state between two calls of the model: no phase, nothing recorded. Never written: every forward's
first hook replaces it by a fresh one (:meth:`ForwardHooks._begin_forward`), so ending a forward allocates nothing."""


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
        self._plans = list(plans)
        self._channels = tuple(channels)
        self.stopwatch = Stopwatch()
        self._hooks = HookSet(self.stopwatch)
        self._calls = FeatureCalls()
        pre = [p for p in plans if p.stage.point.kind == "pre_projector"]
        tower = [p for p in plans if p.stage.point.kind == "vision_layer"]
        self._tower = VisionLayerStages(tower, adapter, self._calls) if tower else None
        self._pre = PreProjector(pre, adapter, self._calls, self._tower) if pre or tower else None
        self.live: Live  # the plan, the probe, the prefill and this forward; set by install(), before any hook

    def remove(self) -> None:
        """Take every hook and the probe away; safe to call twice."""
        self._hooks.remove()
        if self.probe is not None:
            self.probe.remove()
            self.probe = None
        if self.vision_probe is not None:
            self.vision_probe.remove()
            self.vision_probe = None
        live: Live | None = getattr(self, "live", None)
        if live is not None:
            live.state = None

    # --- installation -------------------------------------------------------------------------

    def install(self) -> None:
        """Check the model against the stages, then install every hook (on failure the caller removes)."""
        plan = plan_install(self.model, self.pipeline, self.adapter, self._plans, self._channels)
        vlm, lm, layers = self.adapter.vlm(), self.adapter.language_model(), list(plan.layers)
        self.probe = attention_probe_for(plan.layer, lm, layers, plan.decode)
        if self.probe is not None:
            self.probe.stopwatch = self.stopwatch
        self.live = Live(plan, self.adapter, self.probe)
        on_layers = LayerHooks(self.live)
        pre = self._pre.plans if self._pre is not None else []
        self.vision_probe = vision_probe_for(pre + list(plan.post), self.adapter)
        if self.vision_probe is not None:
            self.vision_probe.stopwatch = self.stopwatch
            self.vision_probe.install()
        hooks = self._hooks
        # The top model's pre-hook first and its post-hook last: Llama 4's multimodal base model is the top model
        # itself (``vlm is self.model``), where hooks of one module run in the order they were registered.
        hooks.pre(self.model, self._top_pre)
        hooks.pre(vlm, self._vlm_pre)
        hooks.post(vlm, self._vlm_post)
        hooks.post(self.model, self._top_post, always=True)
        hooks.pre(lm, self._lm_pre)
        if plan.inside_lm:
            for i, layer in enumerate(layers):
                hooks.pre(layer, on_layers.layer_pre(i))
        if plan.residuals:  # before the stages: layer k's input holds layer k - 1's features
            for i, layer in enumerate(layers):
                hooks.post(layer, on_layers.residual_post(i))
        for k in plan.produce_at:
            hooks.post(layers[k - 1], on_layers.layer_post(k))
        self._calls.vision_probe = self.vision_probe
        self._calls.install(hooks, vlm)
        if self._tower is not None:
            self._tower.install(hooks, [p for p in self._plans if p.needs.vision_attention is not None])
        if self._pre is not None:  # after the feature calls' wrappers: it reads whether a video call runs
            self._pre.install(hooks, self.vision_probe)

    # --- one forward: its start and its end -----------------------------------------------------

    def _begin_forward(self) -> ForwardState:
        """A fresh :class:`ForwardState` (the only place one is created)."""
        now = self.live.now = ForwardState(started=self.stopwatch.seconds)
        return now

    def _end_forward(self, *, failed: bool = False) -> None:
        """Drop this forward's state (the only place it is reset); after a failure, the prefill's too."""
        self.live.now = _BETWEEN_FORWARDS
        if self.probe is not None:
            self.probe.end_decode_step()
        if not failed:
            return
        self.live.state = None
        self._calls.clear()
        if self._pre is not None:
            self._pre.clear()
        for probe in (self.probe, self.vision_probe):
            if probe is not None:
                probe.reset(active=False)

    # --- hooks: top model (labels, loss) ------------------------------------------------------

    def _top_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        now = self._begin_forward()
        kw = bind_arguments(module.forward, args, kwargs)
        labels = kw.get("labels")
        if labels is not None and self._plans:
            now.labels = labels
            kw["labels"] = None
            return (), kw
        return None

    def _top_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if output is None:  # the forward raised
            self._end_forward(failed=True)
            return None
        now = self.live.now
        self._end_forward()
        if now.stats is not None:
            now.stats.engine_seconds = self.stopwatch.seconds - now.started
        st = self.live.state
        if st is not None and st.in_prefill:
            self._end_prefill(st)
        if now.labels is None or getattr(output, "logits", None) is None:
            return None
        labels = kept_labels(now.labels, st.final if st is not None else None)
        vocab = self.model.config.get_text_config().vocab_size
        output.loss = module.loss_function(logits=output.logits, labels=labels, vocab_size=vocab)
        return output

    def _end_prefill(self, st: PrefillState) -> None:
        st.in_prefill = False
        st.lm_embeds = None
        if self.probe is not None:
            self.probe.active = False
        if self.vision_probe is not None:
            self.vision_probe.reset(active=False)

    # --- hooks: multimodal base model (phase, decoding masks and positions) ---------------------

    def _vlm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        now = self.live.now
        if now is _BETWEEN_FORWARDS or now.stats is not None:  # the base model called without the top model
            now = self._begin_forward()
        kw = bind_arguments(module.forward, args, kwargs)
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        batch, q = int(ref.shape[0]), int(ref.shape[1])
        now.input_width = q
        prefill = compat.cache_length(compat.cache_from_kwargs(kw)) == 0
        now.stats = ForwardStats("prefill" if prefill else "decode", batch)
        self.stats.forwards.append(now.stats)
        if prefill:
            self._start_prefill(now, kw, batch, q)
            return None
        st = self.live.state
        if st is None:
            return None
        st.in_prefill = False
        st.step_length = q
        check_decoding_mask(kw.get("attention_mask"), st)
        if self.live.plan.decode is not None and self.probe is not None:
            self.probe.decoding = True
        if not st.lm_pruned:
            return None
        return (), model_decoding_kwargs(kw, st, self.adapter, self.live.plan.compact)

    def _start_prefill(self, now: ForwardState, kw: dict[str, Any], batch: int, q: int) -> None:
        self.live.state = None
        mask = kw.get("attention_mask")
        two_d = isinstance(mask, Tensor) and mask.dim() == 2
        now.real_tokens = mask.sum(1).tolist() if two_d else [q] * batch
        input_ids = kw.get("input_ids")
        if not self._plans:
            self._calls.clear()
            return
        if input_ids is None:
            refuse_embeds_without_ids(kw, self.adapter.name)
            self._calls.clear()
            return
        video = typed_video_mask(self.adapter, input_ids, kw.get("mm_token_type_ids"))
        if not self._calls.fed_videos(self.adapter.vlm(), kw):  # video ids embedded as text
            video = torch.zeros_like(video)
        visual = self.adapter.visual_mask(input_ids) | video
        if not bool(visual.any()):
            self._calls.clear()
            return
        input_mask = mask.bool() if two_d else torch.ones(batch, q, dtype=torch.bool, device=input_ids.device)
        self.live.state = PrefillState(visual=visual, input_mask=input_mask, input_length=q, video=video)
        if self.probe is not None:
            self.probe.reset(active=True)

    def _vlm_post(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not self.live.plan.inside_lm and self.live.now.stats is not None:
            self._record_uniform_layers(self.live.now.stats)
        st = self.live.state
        if st is None:
            return
        if st.in_prefill:
            check_every_stage_ran(list(self.live.plan.prefill_plans), st.stages_run, self.model.config.model_type)
        else:
            st.decoded += st.step_length
            st.decode_steps += 1

    def _record_uniform_layers(self, fs: ForwardStats) -> None:
        """Record every decoder layer's tokens when no stage changes them inside the language model."""
        st, now = self.live.state, self.live.now
        if st is not None and st.in_prefill:
            width = st.lm_length
        elif st is not None:
            width = st.step_length
        else:
            width = now.input_width
        record_layer_tokens(fs, st, None, fs.batch_size, width, now.real_tokens, layers=len(self.live.plan.layers))

    # --- hooks: language model (post_projector stages) ----------------------------------------

    def _lm_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        st = self.live.state
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
        if not st.in_prefill:
            start = st.lm_length + st.decoded
            st.step_positions = decoding_positions(kw.get("position_ids"), start, batch, length, hidden.device)
            return None
        if length != st.input_length:
            raise TokenpruneError(
                f"the language model received {length} tokens but input_ids has {st.input_length}; the "
                f"{self.adapter.name} adapter cannot locate the visual tokens"
            )
        return self._prefill_lm_input(kw, hidden, st)

    def _prefill_lm_input(self, kw: dict[str, Any], hidden: Tensor, st: PrefillState) -> Any:
        """Run the pre- and post-projector stages on the language model's input; rebuild its arguments."""
        plan, calls = self.live.plan, self._calls
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        layout = visual_layout(self.adapter, calls.image, calls.video, st.visual, st.video)
        seq, fmt = input_sequence(hidden, st.input_mask, st.visual, layout, kw.get("position_ids"), video=st.video)
        vision = post_projector_vision_signals(
            self.vision_probe, self.adapter, calls.image, list(plan.post), st.visual, st.video, calls.video
        )
        hidden, seq, changed = self._pre_projector(hidden, with_vision_channels(seq, vision), st)
        calls.clear()
        residuals = self.adapter.take_visual_residuals(kw)
        if residuals is not None:
            seq = with_residual_channels(seq, residuals)
        produce_channels(plan.channels, hidden, seq, 0)
        for stage in plan.post:  # the vision signals ride on the sequence as channels, through every cut
            signal = vision_signal(seq, vision, stage.index)
            outcome = self.live.run(
                stage, hidden, seq, None, StageSignals(vision=signal) if signal is not None else None
            )
            hidden, seq, changed = outcome.hidden, outcome.sequence, changed or outcome.changed
        seq = without_channels(seq, VISION)
        st.lm_length, st.lm_pruned = int(hidden.shape[1]), changed
        st.lm_freed_positions, st.lm_mask = seq.freed_positions, seq.valid.long()
        if changed:
            kw["inputs_embeds"] = hidden
            kw["attention_mask"] = pruned_input_mask(kw.get("attention_mask"), seq, **plan.masks)
            kw["position_ids"] = P.from_rows(seq.positions, fmt)
            cut_lm_inputs(kw, seq.input_column, length)  # per-layer embeddings (Gemma 4)
        full = plan.kv_sharing is not None and full_prefill(kw, seq.visual, always=plan.after_shared)
        lm_columns = torch.arange(st.lm_length, device=hidden.device).expand(batch, -1)
        self.live.set_current(st, replace(seq, lm_column=lm_columns, has_padding_slots=False), lm_input=True)
        if plan.keeps_embeds:
            st.lm_embeds = hidden
        return ((), kw) if changed or full or residuals is not None else None

    def _pre_projector(
        self, hidden: Tensor, seq: TokenSequence, st: PrefillState
    ) -> tuple[Tensor, TokenSequence, bool]:
        """Remove what the ``pre_projector`` stages dropped from the language model's input (their stats recorded)."""
        if self._pre is None:
            return hidden, seq, False
        image = st.visual & ~st.video if st.video is not None else st.visual
        hidden, seq, kept, stats = self._pre.apply(
            hidden, seq, self._calls.image, image, compact=self.live.plan.compact
        )
        st.stages_run.update(plan.index for plan in self._pre.all_plans)
        if self.live.now.stats is not None:
            self.live.now.stats.stages.extend(stats)
        return hidden, seq, kept is not None
