"""The decoder-layer hooks: layer stages, the decode stage, and the per-token arguments of pruned layers.

:class:`LayerHooks` holds the hooks :class:`~tokenprune.engine.forward.ForwardHooks` installs on the
decoder layers; both read and write one :class:`Live`: the install-time plan, the attention probe, the
last prefill's state and this forward's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from tokenprune.adapters.base import ModelAdapter
from tokenprune.channels import produce_channels
from tokenprune.engine.attention_signals import (
    PROBE,
    DryCall,
    probe_channels,
    stage_signals,
    with_probe_channels,
    with_text_signals,
)
from tokenprune.engine.decode_stage import StepKeys, cache_columns, run_decode_stage
from tokenprune.engine.deepstack import add_layer_residual
from tokenprune.engine.forward_state import ForwardState, PrefillState, record_layer_tokens
from tokenprune.engine.install import InstallPlan
from tokenprune.engine.kv_sharing import shared_keys_call, tail_call
from tokenprune.engine.probe import AttentionProbe, ProbeRows
from tokenprune.engine.pruned_inputs import pruned_layer_call
from tokenprune.engine.sequence import TokenSequence, without_channels
from tokenprune.engine.stage import StageOutcome, StagePlan, StageSignals, run_stage


@dataclass
class Live:
    """What the engine's hooks share while installed.

    Attributes:
        plan: The install-time plan (immutable).
        adapter: The model family's adapter.
        probe: The attention probe, if a stage reads attention.
        state: What the last prefill left for its decoding steps (``None``: nothing to prune).
        now: This call of the model (replaced as a whole at its start and end).
    """

    plan: InstallPlan
    adapter: ModelAdapter
    probe: AttentionProbe | None
    state: PrefillState | None = None
    now: ForwardState = field(default_factory=ForwardState)

    def run(
        self,
        plan: StagePlan,
        hidden: Tensor,
        seq: TokenSequence,
        attention: Mapping[str, Tensor] | None,
        signals: StageSignals | None = None,
    ) -> StageOutcome:
        """Run one stage and record it (in the prefill's stages run and this forward's statistics)."""
        outcome = run_stage(plan, hidden, seq, attention, signals=signals, **self.plan.stage_kw)
        if self.state is not None:
            self.state.stages_run.add(plan.index)
        if self.now.stats is not None:
            self.now.stats.stages.append(outcome.stats)
        return outcome

    def set_current(self, st: PrefillState, seq: TokenSequence, *, lm_input: bool = False, layer: int = 0) -> None:
        """``seq`` is the sequence from here on: recorded in the prefill state and handed to the probe."""
        if lm_input:
            st.current = st.final = st.lm_sequence = seq
        else:
            st.current = st.final = st.segments[layer] = seq
        st.real_tokens(seq)  # read once per sequence here, for every later layer's statistics (no host read per layer)
        if self.probe is not None:
            self.probe.rows = ProbeRows(visual=seq.visual, valid=seq.valid)


def _shared_tail(plan: InstallPlan, layer: int, hidden: Any, seg: TokenSequence) -> bool:
    """Whether ``layer`` is a shared layer that the model sliced to the last tokens of a pruned prefill."""
    sharing = plan.kv_sharing
    return (
        sharing is not None
        and layer >= sharing.first_shared
        and isinstance(hidden, Tensor)
        and int(hidden.shape[1]) < int(seg.valid.shape[1])
    )


class LayerHooks:
    """The hooks on the decoder layers, over the shared :class:`Live`."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def residual_post(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            st = self.live.state
            if st is None or not st.in_prefill or st.current is None:
                return None
            return add_layer_residual(self.live.adapter, st.current, output, i)

        return hook

    def layer_post(self, k: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            st = self.live.state
            if st is None or not st.in_prefill or st.current is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            produce_channels(self.live.plan.channels, hidden, st.current, k)
            hidden, seq, changed = self._layer_stages(k, hidden, st.current)
            if not changed:
                return None
            self.live.set_current(st, seq, layer=k)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _layer_stages(self, k: int, hidden: Tensor, seq: TokenSequence) -> tuple[Tensor, TokenSequence, bool]:
        """Run the ``layer: k`` stages on layer ``k - 1``'s output; whether any cut. The probe's signals of layer
        ``k - 1`` ride on the sequence as channels (:func:`with_probe_channels`), so each cut carries them."""
        changed, seq = False, with_probe_channels(seq, self.live.probe, k)
        for plan in self.live.plan.layer.get(k, ()):
            attention, keys, text_att = probe_channels(seq)
            signals = with_text_signals(plan, self._signals(k, plan, hidden, seq, keys), text_att, self.live.state)
            outcome = self.live.run(plan, hidden, seq, attention, signals)
            hidden, seq = outcome.hidden, outcome.sequence
            changed = changed or outcome.changed
        return hidden, without_channels(seq, PROBE), changed

    def _signals(
        self, k: int, plan: StagePlan, hidden: Tensor, seq: TokenSequence, keys: Tensor | None
    ) -> StageSignals:
        """The layer-stage inputs ``plan``'s reducer asks for, on the sequence it is about to reduce."""
        live, dry = self.live, None
        if plan.needs.own_attention and live.probe is not None and live.state is not None:
            at, masks = live.plan.layers[k], dict(live.plan.masks)
            dry = DryCall(at, live.now.layer_kwargs, live.state, live.adapter, live.plan.compact, masks)
        return stage_signals(k, plan, hidden, seq, live.probe, dry, keys, live.adapter.language_model())

    def layer_pre(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs.get("hidden_states")
            live = self.live
            st, now, plan, probe = live.state, live.now, live.plan, live.probe
            if probe is not None and (i + 1) in probe.own and st is not None and st.in_prefill:
                now.layer_kwargs = dict(kwargs)  # the dry call of layer i + 1's own attention reuses them
            seg = st.segment(i) if st is not None else None
            if now.stats is not None and isinstance(hidden, Tensor):
                batch, width = int(hidden.shape[0]), int(hidden.shape[1])
                record_layer_tokens(now.stats, st, seg, batch, width, now.real_tokens)
            if st is not None and not st.in_prefill and i == plan.decode_layer:
                self._run_decode_stage(st)
            if seg is None or st is None:
                return None
            if st.in_prefill and _shared_tail(plan, i, hidden, seg):  # KV sharing: the model kept the last tokens
                out = args, tail_call(dict(kwargs), hidden, seg, live.adapter, i, all_valid=st.all_valid(seg),
                                      compact=plan.compact, **plan.masks)  # fmt: skip
            else:
                out = pruned_layer_call(
                    args, kwargs, hidden, seg, st, live.adapter, i, compact=plan.compact, **plan.masks,
                    table=plan.layer_args, names=plan.arg_names[i], recurrent=plan.recurrent[i],
                )  # fmt: skip
            sharing = plan.kv_sharing
            if sharing is not None and i >= sharing.first_shared:  # its source's keys, to the tokens it holds
                return out[0], shared_keys_call(dict(out[1]), i, sharing, st, seg)
            return out

        return hook

    def _run_decode_stage(self, st: PrefillState) -> None:
        """Run the decode stage on layer ``k - 1``'s recorded signals (see :mod:`tokenprune.engine.decode_stage`);
        the probe receives what it left out of this step's attention."""
        probe, plan, k = self.live.probe, self.live.plan.decode, self.live.plan.decode_layer
        if probe is None or plan is None or not k or probe.decode_scores is None or probe.decode_keys is None:
            return
        seq = cache_columns(st, k - 1)
        kw = {"protect_newlines": self.live.plan.protect_newlines}
        left_out, stats = run_decode_stage(
            plan, seq, probe.decode_scores, probe.decode_keys, st.decode_steps, st.lm_length, **kw
        )
        probe.step_keys = StepKeys(left_out, k, st, st.decoded + st.step_length)
        if self.live.now.stats is not None:
            self.live.now.stats.stages.append(stats)
