"""FLOPs of one prefill of a model, with or without a pipeline, counted three ways side by side.

* **analytic**: :func:`~tokenprune.cost.analytic.language_model_macs` on the tokens each decoder
  layer saw (recorded by the engine), plus each reducer's declared overhead
  (:meth:`~tokenprune.TokenReducer.overhead_macs`), the attention probe's ``QK^T`` rows and the
  own-layer dry calls (PyramidDrop's score);
* **torch**: ``FlopCounterMode`` around the real forward (CPU sdpa formula supplied), by module;
* **fvcore**: each decoder layer, and the LM head, traced on the exact inputs it received in the
  real forward. Tracing layer by layer is what makes fvcore usable at all here: it cannot trace the
  full LLaVA-NeXT forward, and a whole-LM trace would not see the engine's per-layer pruning.

The vision tower and projector run identically with or without a pipeline; torch counts them (the
``vision`` row), and neither analytic nor fvcore recount them. A ``pre_projector`` stage reduces the
projector's input in place (the projector still projects every row; the dropped ones leave at the
language model's input), so it saves the language model's work, which every counter sees in the
layers; its reducer runs in a pre-hook of the projector, and what torch counts there (beyond the
projector's own submodules) is the stages' work, reported in ``reducers_torch``, not in ``vision``.

All numbers are MACs (multiply-accumulates); FLOPs are twice as many.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.cost.analytic import (
    DecoderShape,
    attention_probe_macs,
    decoder_and_head,
    language_model_macs,
    own_attention_macs,
)
from tokenprune.cost.counters import flops_to_macs, fvcore_handles, language_model_flops, torch_flops
from tokenprune.engine import compat


@dataclass(frozen=True)
class LayerRow:
    """One decoder layer: tokens it processed (per sample) and its MACs by each counter."""

    index: int
    tokens: tuple[int, ...]
    analytic: int
    torch: int
    fvcore: int | None


@dataclass
class FlopsReport:
    """A prefill's MACs, by part and by counter.

    Attributes:
        layers: One row per decoder layer.
        lm_head: ``(analytic, torch, fvcore)`` MACs of the LM head.
        vision: MACs of the vision tower and projector (torch's count).
        reducers: ``(stage, reducer, analytic MACs)`` declared by each reducer.
        probe: Analytic MACs of the attention signals: the probe's ``QK^T`` rows at layer ``k - 1``,
            and the dry call of layer ``k`` that computes its own attention before it runs
            (:func:`~tokenprune.cost.analytic.own_attention_macs`).
        fvcore_notes: What fvcore could not count, and its captured warnings.
        batch: Samples in the batch (the counts cover the whole padded batch).
        reducers_torch: What torch counted inside the decoder but outside its layers, and in the
            projector outside its submodules (``pre_projector`` stages): the reducers' own work and the
            own-layer dry calls (it should equal the sum of ``reducers`` less the vision probe's share,
            plus the dry calls' share of ``probe``).
    """

    layers: list[LayerRow]
    lm_head: tuple[int, int, int | None]
    vision: int
    reducers: list[tuple[int, str, int]] = field(default_factory=list)
    probe: int = 0
    fvcore_notes: list[str] = field(default_factory=list)
    batch: int = 1
    reducers_torch: int = 0

    @property
    def language_model(self) -> dict[str, int | None]:
        """Decoder layers + LM head per counter (the model's own work, without overheads)."""
        fv = [r.fvcore for r in self.layers] + [self.lm_head[2]]
        return {
            "analytic": sum(r.analytic for r in self.layers) + self.lm_head[0],
            "torch": sum(r.torch for r in self.layers) + self.lm_head[1],
            "fvcore": None if any(v is None for v in fv) else sum(v for v in fv if v is not None),
        }

    @property
    def overhead(self) -> int:
        """Reducers' and probe's MACs (analytic)."""
        return sum(m for _, _, m in self.reducers) + self.probe

    @property
    def total(self) -> int:
        """Analytic total: vision + language model + overheads."""
        lm = self.language_model["analytic"]
        return self.vision + int(lm or 0) + self.overhead

    def reduction(self, baseline: FlopsReport) -> float:
        """Fraction of the baseline's total MACs saved (0.75 = 75% fewer)."""
        return 1.0 - self.total / baseline.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit": "MACs (FLOPs = 2 x MACs)",
            "batch": self.batch,
            "vision": self.vision,
            "layers": [r.__dict__ for r in self.layers],
            "lm_head": dict(zip(("analytic", "torch", "fvcore"), self.lm_head, strict=True)),
            "language_model": self.language_model,
            "reducers": [{"stage": s, "reducer": n, "macs": m} for s, n, m in self.reducers],
            "probe": self.probe,
            "reducers_torch": self.reducers_torch,
            "total": self.total,
            "fvcore_notes": self.fvcore_notes,
        }


def count_flops(
    model: nn.Module,
    inputs: Mapping[str, Any],
    pipeline: Any = None,
    *,
    use_fvcore: bool = True,
    plugins: Any = None,
) -> FlopsReport:
    """Count one prefill ``model(**inputs)``, under ``pipeline`` if given (applied, then removed).

    Args:
        model: A supported transformers VLM.
        inputs: Processor outputs for a batch.
        pipeline: Anything :func:`tokenprune.apply` takes, or None for the unpruned model.
        use_fvcore: Also count with fvcore (slower: one trace per layer).
        plugins: Plugin manager for :func:`tokenprune.apply`.
    """
    from tokenprune.engine import apply

    shape = DecoderShape.from_model(model)
    decoder, head = decoder_and_head(model)
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(apply(model, pipeline, plugins=plugins)) if pipeline is not None else None
        recorder = stack.enter_context(_record_layer_inputs(decoder, head))
        tower_inputs = stack.enter_context(_record_tower_inputs(run))
        count, _ = torch_flops(model, **inputs, use_cache=False)
        fvcore_layers, fvcore_head, notes = _fvcore_replay(decoder, head, recorder) if use_fvcore else (None, None, [])
        prefill = run.stats.last_prefill if run is not None else None
        reducers = [] if run is None else _reducer_overheads(run, shape)
        probe = 0 if run is None else _probe_macs(run, shape)
    widths = [rec["hidden"].shape[1] for rec in recorder.layers]
    batch = recorder.layers[0]["hidden"].shape[0]
    per_sample = prefill.layer_tokens if prefill is not None else [[w] * batch for w in widths]
    head_positions = recorder.head_input.shape[1]
    analytic = language_model_macs(shape, widths, logits_positions=head_positions, batch=batch)
    names = {id(m): n for n, m in model.named_modules()}
    decoder_path, head_path = "." + names[id(decoder)], "." + names[id(head)]
    torch_layers = [flops_to_macs(count.module_flops(f"{decoder_path}.layers.{i}")) for i in range(shape.num_layers)]
    rows = [
        LayerRow(
            i,
            tuple(per_sample[i]),
            analytic.layers[i],
            torch_layers[i],
            None if fvcore_layers is None else fvcore_layers[i],
        )
        for i in range(shape.num_layers)
    ]
    torch_head = flops_to_macs(count.module_flops(head_path))
    decoder_torch = flops_to_macs(language_model_flops(count, decoder_path, decoder))
    pre = _pre_projector_torch(count, names, run) + _vision_layer_torch(count, names, tower_inputs)
    vision = flops_to_macs(count.flops - count.module_flops(decoder_path)) - torch_head - pre
    # What torch counted in the decoder outside its layers: the reducers, run from the engine's hooks.
    overhead_torch = decoder_torch - sum(torch_layers) + pre
    return FlopsReport(
        rows, (analytic.lm_head, torch_head, fvcore_head), vision, reducers, probe, notes, batch, overhead_torch
    )


@contextlib.contextmanager
def _record_tower_inputs(run: Any) -> Iterator[dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]]:
    """Record what each vision-tower layer with a ``vision_layer`` stage received, after the stage ran."""
    recorded: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    points = [] if run is None else [p.stage.point for p in run.prepared.plans if p.stage.point.kind == "vision_layer"]
    tower = run.adapter.vision_tower() if points else None
    handles = []
    for k in sorted({int(p.layer) for p in points}) if tower is not None else []:

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorded[module] = (args, dict(kwargs))

        handles.append(tower.layers[k].register_forward_pre_hook(hook, with_kwargs=True))  # type: ignore[union-attr]
    try:
        yield recorded
    finally:
        for h in handles:
            h.remove()


def _vision_layer_torch(
    count: Any, names: Mapping[int, str], recorded: Mapping[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]
) -> int:
    """MACs torch counted in the tower layers that run ``vision_layer`` stages beyond the layers' own work: the
    stages' pre-hooks (each layer replayed on the inputs it received, after its stages)."""
    total = 0
    for layer, (args, kwargs) in recorded.items():
        own, _ = torch_flops(layer.forward, *args, **kwargs)
        total += flops_to_macs(count.module_flops("." + names[id(layer)]) - own.flops)
    return total


def _pre_projector_torch(count: Any, names: Mapping[int, str], run: Any) -> int:
    """MACs torch counted in the projector outside its submodules: the ``pre_projector`` stages' pre-hook (0: none).

    A per-token projector (LLaVA's MLP) does its own products in its submodules (``linear_1``, ``linear_2``).
    """
    if run is None or not any(p.stage.point.kind == "pre_projector" for p in run.prepared.plans):
        return 0
    projector = run.adapter.projector()
    if projector is None or id(projector) not in names:
        return 0
    path = "." + names[id(projector)]
    children = [name for name, _ in projector.named_children()]
    return flops_to_macs(count.module_flops(path, excluding=children))


class _Recorder:
    def __init__(self) -> None:
        self.layers: list[dict[str, Any]] = []
        self.head_input: Tensor = torch.empty(0)


@contextlib.contextmanager
def _record_layer_inputs(decoder: nn.Module, lm_head: nn.Module) -> Iterator[_Recorder]:
    """Record what every decoder layer and the LM head received, after any pipeline hooks ran."""
    recorder = _Recorder()
    handles = []

    def layer_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            while len(recorder.layers) <= index:
                recorder.layers.append({})
            recorder.layers[index] = {"module": module, "hidden": hidden, "kwargs": dict(kwargs), "args": args[1:]}

        return hook

    def head_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        recorder.head_input = args[0]

    for i, layer in enumerate(decoder.layers):
        handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
    handles.append(lm_head.register_forward_pre_hook(head_hook))
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Calls ``layer.forward`` (bypassing its hooks: the inputs were recorded after them)."""

    def __init__(self, layer: nn.Module, kwargs: dict[str, Any], tensor_keys: list[str]) -> None:
        super().__init__()
        self.layer = layer
        self.constants = {k: v for k, v in kwargs.items() if k not in tensor_keys}
        self.tensor_keys = tensor_keys
        # (cos, sin) pairs, flattened into two inputs; Llama 4's complex freqs_cis is one tensor
        self.pairs = {k for k in tensor_keys if isinstance(kwargs.get(k), tuple)}

    def forward(self, hidden: Tensor, *tensors: Tensor) -> Tensor:
        kwargs = dict(self.constants)
        flat = list(tensors)
        for key in self.tensor_keys:
            if key in self.pairs:
                kwargs[key] = (flat.pop(0), flat.pop(0))
            else:
                kwargs[key] = flat.pop(0)
        out = self.layer.forward(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _fvcore_replay(
    decoder: nn.Module, lm_head: nn.Module, recorder: _Recorder
) -> tuple[list[int] | None, int | None, list[str]]:
    import logging
    import warnings

    notes: list[str] = []
    results: list[int] = []
    fv_logger = logging.getLogger("fvcore")
    previous = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            from fvcore.nn import FlopCountAnalysis  # imported here: fvcore's import warns too

            uncounted: set[str] = set()
            for rec in recorder.layers:
                given = {**_positional_as_keywords(rec["module"], rec["args"]), **rec["kwargs"]}
                kwargs = {k: v for k, v in given.items() if k not in (*compat.CACHE_ARGUMENTS, "use_cache")}
                kwargs["use_cache"] = False
                keys, flat = [], []
                for k, v in kwargs.items():
                    if isinstance(v, Tensor):
                        keys.append(k)
                        flat.append(v)
                    elif k == "position_embeddings" and isinstance(v, tuple):
                        keys.append(k)
                        flat.extend(v)
                analysis = FlopCountAnalysis(_Replay(rec["module"], kwargs, keys), (rec["hidden"], *flat))
                analysis.set_op_handle(**fvcore_handles())
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
                results.append(int(analysis.total()))
                uncounted |= set(analysis.unsupported_ops())
            head = FlopCountAnalysis(lm_head, (recorder.head_input,))
            head.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            head_macs = int(head.total())
    except Exception as exc:  # fvcore is best effort: say what failed, keep the other counters
        fv_logger.setLevel(previous)
        return None, None, [f"fvcore could not trace a decoder layer: {type(exc).__name__}: {exc}"]
    fv_logger.setLevel(previous)
    products = sorted(op for op in uncounted if _looks_like_a_product(op))
    notes.append(
        "fvcore traced each decoder layer and the LM head on the inputs they received; "
        "it counts no element-wise op ("
        + ", ".join(sorted(uncounted - set(products)))
        + "), as the other counters do not"
    )
    if products:
        notes.append(
            "fvcore has no formula for " + ", ".join(products) + ": its count leaves them out and is low "
            "where the other counters count them"
        )
    notes.extend(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    return results, head_macs, notes


def _positional_as_keywords(layer: nn.Module, args: tuple[Any, ...]) -> dict[str, Any]:
    """The arguments a decoder layer received by place after the hidden states (Gemma 4's ``per_layer_input``),
    by the names of its ``forward``'s parameters, so that the fvcore replay passes them on."""
    if not args:
        return {}
    names = list(inspect.signature(layer.forward).parameters)[1:]
    if len(names) < len(args):
        raise TypeError(f"{type(layer).__name__}.forward takes fewer parameters than the {len(args) + 1} it was given")
    return dict(zip(names, args, strict=False))


def _looks_like_a_product(op: str) -> bool:
    """An op name that reads as a matrix product (which fvcore must count), not an element-wise op."""
    name = op.split("::")[-1].removesuffix("_fallback")
    return bool(re.search(r"(mm|matmul|linear|einsum)$|conv\d?d|convolution|attention", name))


def _reducer_overheads(run: Any, shape: DecoderShape) -> list[tuple[int, str, int]]:
    prefill = run.stats.last_prefill
    return [] if prefill is None else [(s.stage, s.reducer, s.overhead_macs) for s in prefill.stages]


def _probe_macs(run: Any, shape: DecoderShape) -> int:
    """The attention signals' MACs: the probe's QK^T rows at layer k - 1, and each own-layer dry call at k.

    What each stage reads comes from its requirements (``StagePlan.needs``), worked out once at prepare.
    """
    prefill = run.stats.last_prefill
    if prefill is None:
        return 0
    ran = {s.stage for s in prefill.stages}
    probed: dict[int, set[str]] = {}
    own: dict[int, set[str]] = {}
    first: dict[int, int] = {}  # layer k -> the first stage that ran there (the rows entering layer k)
    for plan in run.prepared.plans:
        point = plan.stage.point
        if point.kind == "layer" and plan.index in ran:
            k = int(point.layer)
            first.setdefault(k, plan.index)
            probed.setdefault(k - 1, set()).update(plan.needs.attention)
            if plan.needs.own_attention:
                own.setdefault(k, set()).update(plan.needs.own_attention)
    total = 0
    for layer, sources in probed.items():
        for b, keys in enumerate(prefill.layer_tokens[layer]):
            rows = _source_rows(prefill, first[layer + 1], b, keys)
            total += sum(attention_probe_macs(shape.q_dims[layer], rows[src], keys) for src in sources)
    for layer, sources in own.items():
        for b, keys in enumerate(prefill.layer_tokens[layer - 1]):  # what enters layer k: layer k - 1's tokens
            rows = _source_rows(prefill, first[layer], b, keys)
            projected = 1 if sources == {"last"} else keys  # the dry call projects only the queries it needs
            total += own_attention_macs(shape, layer, keys, projected, sum(rows[src] for src in sources))
    return total


def _source_rows(prefill: Any, stage: int, b: int, keys: int) -> dict[str, int]:
    """Query rows per attention source of sample ``b``'s tokens entering ``stage`` (the first at its layer)."""
    visual = next(s.entering[b] for s in prefill.stages if s.stage == stage)
    return {"last": 1, "text": keys - visual, "visual": visual, "all": keys}
