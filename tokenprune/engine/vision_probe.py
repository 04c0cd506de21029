"""The vision probe: the vision encoder's attention at one layer, under the tower's own sdpa attention.

Vision-attention reducers (FasterVLM, VisPruner, VisionZip) rank the projected visual tokens by the
attention inside the vision tower: the [CLS] query's row (``cls``), or the attention each patch
receives, averaged over heads and patch queries (``mean``). Asking the tower for
``output_attentions`` would switch every tower layer to eager attention. Instead, as the language
model's probe does (:mod:`tokenprune.engine.probe`), :class:`VisionProbe` registers a thin attention
function through transformers' ``AttentionInterface`` and points the tower's config at it while it
is installed. At the probed layer, during a prefill, it computes ``softmax(q k^T * scaling + mask)``
for the query rows it needs only (one row per tower sequence for ``cls``), from the ``q`` and ``k``
the layer already computed, one head at a time; then, on every layer, it calls the stock function
(sdpa or the modeling file's eager one), so the tower's outputs are bit-identical to the unprobed
model's.

The tower's sequences are the rows of its attention calls, in call order: one per tile for CLIP or
SigLIP towers (the batch of ``pixel_values``), one per image (per frame) for Qwen2-VL's packed
sequence, which calls the attention once per image. The adapter's
:meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_patches` maps the per-position values to
the post-projector tokens (:func:`sequence_vision_signal`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.adapters.base import ImageCall, ModelAdapter, VisionTower
from tokenprune.engine import compat
from tokenprune.engine.sequence import TokenSequence
from tokenprune.engine.stopwatch import Stopwatch
from tokenprune.errors import TokenpruneError
from tokenprune.reducer import VisionAttentionRequest

_NAMES = {"sdpa": "tokenprune_vision_sdpa", "eager": "tokenprune_vision_eager"}
_TARGETS: weakref.WeakKeyDictionary[nn.Module, tuple[VisionProbe, int]] = weakref.WeakKeyDictionary()
SUPPORTED = ("sdpa", "eager")


@dataclass
class VisionRecord:
    """What the probe recorded at one layer during one prefill, one entry per tower sequence.

    Attributes:
        scores: Per kind, one ``(S_r,)`` float32 tensor per tower sequence ``r``, over its key positions.
        keys: One ``(S_r, hd)`` float32 tensor per sequence: the keys averaged over heads (if asked).
        features: One ``(S_r, D)`` float32 tensor per sequence: the layer's output (if asked).
        macs: Per kind, the multiply-accumulates the probe spent on the scores.
    """

    scores: dict[str, list[Tensor]] = field(default_factory=dict)
    keys: list[Tensor] = field(default_factory=list)
    features: list[Tensor] = field(default_factory=list)
    macs: dict[str, int] = field(default_factory=dict)


def resolve_layer(tower: VisionTower, layer: int | None) -> int:
    """The non-negative index of ``layer`` (``None``: the tower's feature layer) among the tower's layers.

    Raises:
        TokenpruneError: the index is out of range.
    """
    n = len(tower.layers)
    index = tower.feature_layer if layer is None else layer
    if not -n <= index < n:
        raise TokenpruneError(f"vision layer {index} does not exist: the {tower.name} has {n} encoder layers")
    return index % n


@dataclass
class VisionProbe:
    """Records vision-encoder attention at some tower layers during prefill, under sdpa (or eager).

    Attributes:
        tower: The model's vision tower, from its adapter.
        requests: Tower layer (non-negative) to the kinds computed there, and whether keys and
            features are kept.
        records: After a prefill, per layer, what was recorded during the image call.
        video_records: The same for the video call (only with ``tower.videos``).
        active: Set by the engine during prefill; the probe computes nothing otherwise.
        stopwatch: Times the probe's own work (set by the engine to its own).
    """

    tower: VisionTower
    requests: dict[int, tuple[frozenset[str], bool, bool]]
    records: dict[int, VisionRecord] = field(default_factory=dict)
    video_records: dict[int, VisionRecord] = field(default_factory=dict)
    active: bool = False
    _into: str = "image"
    _configs: list[tuple[Any, Any]] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    _name: str | None = None

    def install(self) -> None:
        """Point the tower's attention modules at the probing function.

        Raises:
            TokenpruneError: the tower uses an attention implementation other than sdpa or eager.
        """
        towers = [self.tower.layers, *([self.tower.video_layers] if self.tower.video_layers else [])]
        configs, impl = compat.common_implementation(
            [getattr(compat.vision_attention_module(layer), "config", None) for layers in towers for layer in layers],
            SUPPORTED,
            f"the vision probe of the {self.tower.name}",
        )
        self._name = _NAMES[impl]
        compat.acquire_attention(self._name, impl, _make_attention(impl))
        for i, (_, _, features) in self.requests.items():
            for layers in towers:  # a video tower of its own (Video-LLaVA) records into the video records
                layer = layers[i]
                _TARGETS[compat.vision_attention_module(layer)] = (self, i)
                if features:
                    self._handles.append(layer.register_forward_hook(self.stopwatch.timed(self._feature_hook(i))))
        for cfg in configs:
            self._configs.append((cfg, compat.swap_attention_implementation(cfg, self._name)))

    def remove(self) -> None:
        """Restore the configs, remove the hooks and unregister the function when no probe uses it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        compat.release_probe(self._configs, _TARGETS, self, self._name)
        self._name = None

    def reset(self, *, active: bool) -> None:
        """Forget the last prefill's records; record (the image call's) during the next one if ``active``."""
        self.active = active
        self._into = "image"
        self.records.clear()
        self.video_records.clear()

    def begin(self, kind: str) -> None:
        """Record the tower calls that follow into ``kind``'s records (``image`` or ``video``), cleared first."""
        self._into = kind
        self._current().clear()
        self.active = True

    def _current(self) -> dict[int, VisionRecord]:
        return self.video_records if self._into == "video" else self.records

    def record(self, layer: int, module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None, kw: Any) -> None:
        """Compute and store ``layer``'s scores for one attention call (one or more tower sequences)."""
        kinds, keys, _ = self.requests[layer]
        rec = self._current().setdefault(layer, VisionRecord())
        with torch.no_grad():
            for kind in kinds:
                scores, macs = vision_scores(module, query, key, mask, kw, kind, self.tower.has_cls)
                rec.scores.setdefault(kind, []).extend(scores.unbind(0))
                rec.macs[kind] = rec.macs.get(kind, 0) + macs
            if keys:
                rec.keys.extend(key.detach().float().mean(1).unbind(0))

    def _feature_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            rec = self._current().setdefault(layer, VisionRecord())
            lengths = [int(s.shape[0]) for s in next(iter(rec.scores.values()), [])]
            flat = hidden.detach().float().reshape(-1, hidden.shape[-1])
            rec.features.extend(flat.split(lengths) if sum(lengths) == flat.shape[0] else flat.unbind(0))

        return hook


def vision_scores(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    kw: dict[str, Any],
    kind: str,
    has_cls: bool,
) -> tuple[Tensor, int]:
    """Head-averaged attention of one tower attention call.

    Args:
        module: The attention module (for ``scaling``).
        query: ``(B, H, S, hd)``.
        key: ``(B, Hkv, S, hd)``.
        mask: ``None``, a bool mask (True attends) or an additive float mask, ``(B or 1, 1, S, S)``.
        kw: The call's keyword arguments (``scaling``).
        kind: ``cls``: query row 0; ``mean``: the mean over the patch query rows (every row but the
            CLS one when ``has_cls``, and only rows that are not padding).
        has_cls: Position 0 is the tower's CLS token.

    Returns:
        ``(B, S)`` float32 scores over the key positions, and the multiply-accumulates spent.
    """
    b, h, s, hd = query.shape
    scaling = kw.get("scaling") or getattr(module, "scaling", None) or getattr(module, "scale", None) or hd**-0.5
    rep = h // key.shape[1]
    key = key.repeat_interleave(rep, dim=1) if rep > 1 else key
    rows = slice(0, 1) if kind == "cls" else slice(0, s)
    bias = torch.zeros(1, 1, s, s, device=query.device)
    if mask is not None:
        m = mask[..., :s, :s]
        bias = torch.zeros(m.shape, device=query.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m
    bias = bias.float()[:, 0, rows]  # (B or 1, rows, S)
    acc = torch.zeros(b, rows.stop - rows.start, s, dtype=torch.float32, device=query.device)
    for head in range(h):
        logits = query[:, head, rows].float() @ key[:, head].float().transpose(-1, -2) * scaling
        acc += torch.softmax(logits + bias, dim=-1)
    acc = acc / h
    macs = b * h * (rows.stop - rows.start) * s * hd
    if kind == "cls":
        return acc[:, 0], macs
    diag = torch.diagonal(bias.expand(b, -1, -1), dim1=-2, dim2=-1)  # a padding row does not attend itself
    weight = (~torch.isneginf(diag)).float()
    if has_cls:
        weight[:, 0] = 0.0
    return (acc * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1.0), macs


def _make_attention(impl: str) -> Callable[..., Any]:
    def vision_probe_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> Any:
        target = _TARGETS.get(module)
        if target is not None and target[0].active:
            with target[0].stopwatch.running():
                target[0].record(target[1], module, query, key, attention_mask, kwargs)
        return compat.stock_attention(impl, module)(module, query, key, value, attention_mask, **kwargs)

    vision_probe_attention.__name__ = f"tokenprune_vision_{impl}"
    return vision_probe_attention


@dataclass
class VisionSignal:
    """A stage's vision signal over the language model's input sequence, ``(B, L, ...)`` per column.

    Attributes:
        scores: ``(B, L)`` float32, the mean score of the patches each visual token is built from.
        valid: ``(B, L)`` bool, visual tokens built from at least one patch.
        features: ``(B, L, D)`` the probed layer's output, averaged the same way (if asked).
        keys: ``(B, L, hd)`` the head-averaged keys, averaged the same way (if asked).
        macs: The probe's multiply-accumulates for this signal.
        also: Per further tower layer of the request (``also_at``), its ``(B, L)`` scores, as ``scores``.
    """

    scores: Tensor
    valid: Tensor
    features: Tensor | None = None
    keys: Tensor | None = None
    macs: int = 0
    also: dict[int, Tensor] = field(default_factory=dict)


#: Channel-name prefix of the post_projector stages' vision signals while the language model's input is reduced
#: (see :func:`with_vision_channels`); a registered channel's name has no ``:``.
VISION = "vision:"


def with_vision_channels(seq: TokenSequence, signals: Mapping[int, VisionSignal]) -> TokenSequence:
    """``seq`` with each stage's vision signal (``signals``: by stage index) as channels of its columns,
    ``vision:<stage>:<part>``, so that every ``pre_projector`` and ``post_projector`` cut carries them through the
    sequence's own gather (a merged token keeps its root's value). ``seq`` itself is left as it is."""
    channels: dict[str, Tensor] = {}
    for index, signal in signals.items():
        parts = {"scores": signal.scores, "valid": signal.valid, "features": signal.features, "keys": signal.keys}
        parts |= {f"also{layer}": scores for layer, scores in signal.also.items()}
        channels |= {f"{VISION}{index}:{part}": v for part, v in parts.items() if v is not None}
    return replace(seq, channels={**seq.channels, **channels}) if channels else seq


def vision_signal(seq: TokenSequence, signals: Mapping[int, VisionSignal], index: int) -> VisionSignal | None:
    """Stage ``index``'s signal on the current columns of ``seq`` (:func:`with_vision_channels`); ``None``: none."""
    signal = signals.get(index)
    if signal is None:
        return None

    def part(name: str) -> Tensor | None:
        return seq.channels.get(f"{VISION}{index}:{name}")

    scores, valid = part("scores"), part("valid")
    if scores is None or valid is None:
        raise TokenpruneError(f"the vision signal of stage {index} is missing from the sequence (an engine bug)")
    also = {layer: part(f"also{layer}") for layer in signal.also}
    return VisionSignal(scores, valid, part("features"), part("keys"), signal.macs, also)  # type: ignore[arg-type]


def sequence_vision_signal(
    adapter: ModelAdapter,
    call: ImageCall,
    probe: VisionProbe,
    request: VisionAttentionRequest,
    visual: Tensor,
    *,
    video: bool = False,
) -> VisionSignal:
    """Map what ``probe`` recorded for ``request`` onto the ``(B, L)`` visual tokens ``visual`` of the sequence.

    With ``video``, from the video call's records through ``map_vision_video_patches`` (``visual``: the video
    tokens), else from the image call's through ``map_vision_patches``.

    Each tower position gets a coverage of 1 (0 at the CLS token); the adapter's
    :meth:`~tokenprune.adapters.base.ModelAdapter.map_vision_patches` maps ``[score, 1, features, keys]``
    (each times the coverage) to the post-projector tokens, and each token's values are divided by its
    mapped coverage: the mean over the patches it is built from. Tokens with no coverage are not valid.

    Raises:
        TokenpruneError: nothing was recorded, the adapter provides no mapping, or the mapped tokens do not
            match the visual tokens of the sequence.
    """
    layer = resolve_layer(probe.tower, request.layer)
    rec = (probe.video_records if video else probe.records).get(layer)
    if rec is None or request.kind not in rec.scores:
        raise TokenpruneError(
            f"the vision probe recorded nothing at layer {layer} of the {probe.tower.name}; its attention did not go "
            "through the probe (is the attention implementation overridden elsewhere?)"
        )
    values = []
    for r, score in enumerate(rec.scores[request.kind]):
        cover = torch.ones_like(score)
        if probe.tower.has_cls:
            cover[0] = 0.0
        parts = [score[:, None], cover[:, None]]
        parts += [rec.features[r]] if request.features else []
        parts += [rec.keys[r]] if request.keys else []
        values.append(torch.cat(parts, -1) * cover[:, None])
    mapped = (adapter.map_vision_video_patches if video else adapter.map_vision_patches)(call, values)
    if mapped is None:
        what = "video tokens" if video else "visual tokens"
        raise TokenpruneError(f"adapter {adapter.name!r} does not map vision patches to its {what}")
    flat = torch.cat([m.float() for m in mapped]) if mapped else torch.zeros(0, values[0].shape[-1])
    if flat.shape[0] != int(visual.sum()):
        raise TokenpruneError(
            f"adapter {adapter.name!r}: map_vision_{'video_' if video else ''}patches() returned {flat.shape[0]} "
            f"tokens, but the sequence has {int(visual.sum())} {'video' if video else 'image'} tokens; it must "
            "return one row per post-projector token, image (video) by image"
        )
    full = torch.zeros(*visual.shape, flat.shape[-1], device=visual.device)
    full[visual] = flat.to(visual.device)
    cover = full[..., 1]
    valid = visual & (cover > 1e-6)
    mean = full / cover.clamp(min=1e-6)[..., None]
    dv = rec.features[0].shape[-1] if request.features else 0
    also = {
        at: sequence_vision_signal(adapter, call, probe, VisionAttentionRequest(request.kind, at), visual, video=video)
        for at in request.also_at
    }
    return VisionSignal(
        scores=mean[..., 0].masked_fill(~valid, 0.0),
        valid=valid,
        features=mean[..., 2 : 2 + dv].masked_fill(~valid[..., None], 0.0) if request.features else None,
        keys=mean[..., 2 + dv :].masked_fill(~valid[..., None], 0.0) if request.keys else None,
        macs=rec.macs.get(request.kind, 0) + _further_macs(probe, layer, also),
        also={at: s.scores for at, s in also.items()},
    )


def _further_macs(probe: VisionProbe, layer: int, also: dict[int, VisionSignal]) -> int:
    """The probe's cost at a request's further layers, each tower layer counted once (and not the main ``layer``)."""
    seen, macs = {layer}, 0
    for at, signal in also.items():
        index = resolve_layer(probe.tower, at)
        macs += 0 if index in seen else signal.macs
        seen.add(index)
    return macs


def vision_probe_for(plans: list[Any], adapter: ModelAdapter) -> VisionProbe | None:
    """The vision probe the ``post_projector`` stages of ``plans`` need (``None``: none asks for vision attention).

    Raises:
        TokenpruneError: the adapter serves no vision attention, a stage asks for ``cls`` on a tower without a
            CLS token, or for a layer the tower does not have.
    """
    asking = [(p, p.needs.vision_attention) for p in plans]
    asking = [(p, r) for p, r in asking if r is not None]
    if not asking:
        return None
    tower = adapter.vision_tower()
    if tower is None:
        p = asking[0][0]
        raise TokenpruneError(
            f"stage {p.index} ({p.stage.reducer}) reads vision-encoder attention, but the {adapter.name!r} adapter "
            "does not describe its vision tower (ModelAdapter.vision_tower and map_vision_patches)"
        )
    requests: dict[int, tuple[frozenset[str], bool, bool]] = {}
    for p, r in asking:
        if r.kind == "cls" and not tower.has_cls:
            raise TokenpruneError(
                f"stage {p.index} ({p.stage.reducer}) reads the [CLS] attention of the vision tower, but this model's "
                f"{tower.name} has no CLS token; use the 'mean' vision attention (attention received by each patch)"
            )
        for n, at in enumerate((r.layer, *r.also_at)):
            try:
                layer = resolve_layer(tower, at)
            except TokenpruneError as err:
                raise TokenpruneError(f"stage {p.index} ({p.stage.reducer}): {err}") from None
            main = n == 0
            kinds, keys, features = requests.get(layer, (frozenset(), False, False))
            requests[layer] = (kinds | {r.kind}, keys or (main and r.keys), features or (main and r.features))
    return VisionProbe(tower=tower, requests=requests)


def post_projector_vision_signals(
    probe: VisionProbe | None,
    adapter: ModelAdapter,
    call: ImageCall | None,
    plans: list[Any],
    visual: Tensor,
    video: Tensor | None = None,
    video_call: ImageCall | None = None,
) -> dict[int, VisionSignal]:
    """Per post_projector stage plan that reads vision attention, its signal over the input sequence.

    The image tokens (``visual`` less ``video``) get it from the recorded ``get_image_features`` call; the
    video tokens from the ``get_video_features`` call (``video_call``) where the tower serves videos
    (``VisionTower.videos``), else none: then a stage that reads vision attention must reduce only the images
    (``tokens: image``) on a batch with video tokens. The probe's cost is counted at the first stage that
    reads each (layer, kind), zero at the others.

    Raises:
        TokenpruneError: a stage reads vision attention but the forward computed no image (video) features, or
            the stage reduces video tokens the adapter gives no vision attention and the batch has some.
    """
    out: dict[int, VisionSignal] = {}
    if probe is None:
        return out
    has_video = video is not None and bool(video.any())
    image = visual & ~video if has_video else visual
    videos = has_video and probe.tower.videos
    reading = [p for p in plans if p.needs.vision_attention is not None]
    for plan in reading:
        if has_video and not videos and getattr(plan.stage, "tokens", "all") in ("all", "video"):
            raise TokenpruneError(
                f"stage {plan.index} ({plan.stage.reducer}) reads vision-encoder attention, which the "
                f"{adapter.name!r} adapter serves for image tokens only, but this batch has video tokens; give the "
                "stage `tokens: image` to reduce the images only (the video tokens are then kept)"
            )
    has_image = bool(image.any())
    if call is None and (has_image or not has_video):
        raise TokenpruneError("a stage reads vision-encoder attention, but the model computed no image features")
    if videos and video_call is None:
        raise TokenpruneError("a stage reads vision-encoder attention, but the model computed no video features")
    counted: set[tuple[int | None, tuple[int, ...], str]] = set()
    for plan in reading:
        request = plan.needs.vision_attention
        parts = [sequence_vision_signal(adapter, call, probe, request, image)] if has_image else []
        if videos:
            parts.append(sequence_vision_signal(adapter, video_call, probe, request, video, video=True))
        if not parts:  # a video-only batch the adapter gives no vision attention: `tokens: image` stages skip it
            continue
        signal = parts[0] if len(parts) == 1 else _joined(parts[0], parts[1])
        key = (request.layer, request.also_at, request.kind)
        out[plan.index] = signal if key not in counted else replace(signal, macs=0)
        counted.add(key)
    return out


def _joined(a: VisionSignal, b: VisionSignal) -> VisionSignal:
    """Two signals over disjoint tokens (images, videos) as one: each is 0 and invalid outside its own."""

    def add(x: Tensor | None, y: Tensor | None) -> Tensor | None:
        return None if x is None or y is None else x + y

    return VisionSignal(
        a.scores + b.scores,
        a.valid | b.valid,
        add(a.features, b.features),
        add(a.keys, b.keys),
        a.macs + b.macs,
        {layer: a.also[layer] + b.also[layer] for layer in a.also},
    )
