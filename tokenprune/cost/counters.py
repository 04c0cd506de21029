"""Measured FLOP counts: torch's ``FlopCounterMode`` and fvcore, each fixed where it is known to miss.

* ``torch.utils.flop_counter`` has no formula for the CPU sdpa kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) and counts it as 0; we pass one.
* fvcore (``FlopCountAnalysis``, built on ``torch.jit.trace``) silently skips
  ``aten::scaled_dot_product_attention``; we register a handle. It cannot trace the full LLaVA-NeXT
  forward (``unpad_image`` calls ``round()`` on a traced shape), so we count the language model on
  its ``inputs_embeds``, and report what fvcore left uncounted. Its warnings are captured.

* Neither has a formula for the grouped matrix product with which transformers runs a
  mixture-of-experts block's experts by default (``experts_implementation="grouped_mm"``:
  ``aten::_grouped_mm``, or transformers' own ``transformers::grouped_mm_fallback`` where torch's
  kernel cannot run); both count it as 0. We pass one to each (:func:`grouped_mm_macs`). The other
  implementations, ``eager`` (a loop of ``linear`` over the experts hit) and ``batched_mm``
  (``bmm`` on the gathered weights), are counted by both as they are.

torch counts FLOPs; fvcore counts MACs (FLOPs = 2 x MACs).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.engine import compat


@dataclass(frozen=True)
class TorchCount:
    """FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Attributes:
        flops: Total FLOPs.
        by_module: FLOPs per module path (``"Model.model.vision_tower"``, ...), nested paths included.
    """

    flops: int
    by_module: dict[str, int]

    def module_flops(self, suffix: str, *, excluding: Iterable[str] = ()) -> int:
        """FLOPs of the first module whose path ends with ``suffix`` (0 if none ran).

        ``excluding``: paths of submodules, relative to that module, whose FLOPs are left out.
        """
        for path, value in self.by_module.items():
            if path.endswith(suffix):
                return value - sum(self.by_module.get(f"{path}.{sub}", 0) for sub in excluding)
        return 0


def language_model_flops(count: TorchCount, decoder_suffix: str, decoder: nn.Module) -> int:
    """What torch counted in the decoder, less its rotary-embedding tables.

    The analytic formula counts the decoder layers; the ``(cos, sin)`` tables are computed once per
    forward by a matmul in transformers 5.18 (which the counters see) and by an elementwise product
    from 5.19 on (which they do not), so they are left out on every release.
    """
    return count.module_flops(decoder_suffix, excluding=compat.rotary_embedding_names(decoder))


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def grouped_mm_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """MACs of a grouped matrix product ``_grouped_mm(a, b, offs)`` from its operands' shapes.

    * ``a (S, K)``, ``b (G, K, N)`` (the MoE forward: ``S`` routed token-expert pairs, sorted by
      expert and cut by ``offs``): ``S * K * N``;
    * ``a (G, M, K)``, ``b (G, K, N)``: ``G * M * K * N``;
    * ``a (G, M, K)``, ``b (K, N)`` with ``N`` cut by ``offs``: ``M * K * N``;
    * ``a (M, K)``, ``b (K, N)`` with ``K`` cut by ``offs`` (a weight gradient): ``M * K * N``.

    Rows of ``a`` past ``offs[-1]`` (expert-parallel sentinels, which the kernel skips) are counted
    too: the shapes do not say how many there are. A single-process run has none.
    """
    if len(a) == 3 and len(b) == 3:
        return a[0] * a[1] * a[2] * b[2]
    return a[-2] * a[-1] * b[-1]


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * grouped_mm_macs(a_shape, b_shape)


def _grouped_mm_ops() -> list[Any]:
    """The grouped-mm ops this torch and transformers have (torch's, and transformers' fallback once registered)."""
    ops = [getattr(torch.ops.aten, "_grouped_mm", None)]
    with contextlib.suppress(AttributeError, RuntimeError):
        ops.append(torch.ops.transformers.grouped_mm_fallback)
    return [op for op in ops if op is not None]


GROUPED_MM_JIT_OPS = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")
"""The names under which ``torch.jit.trace`` (fvcore) records a grouped matrix product."""


def fvcore_grouped_mm_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    return grouped_mm_macs(get_shape(inputs[0]), get_shape(inputs[1]))


def fvcore_handles() -> dict[str, Callable[[list[Any], list[Any]], int]]:
    """The op handles we add to fvcore's: sdpa, and the grouped matrix products of MoE experts."""
    return {"aten::scaled_dot_product_attention": fvcore_sdpa_handle} | dict.fromkeys(
        GROUPED_MM_JIT_OPS, fvcore_grouped_mm_handle
    )


def torch_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[TorchCount, Any]:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode`` (in inference mode); return the count and the output."""
    from torch.utils.flop_counter import FlopCounterMode

    custom: dict[Any, Callable[..., int]] = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops
    }
    custom.update(dict.fromkeys(_grouped_mm_ops(), _grouped_mm_flops))
    frozen = _frozen_parameters(fn) if isinstance(fn, nn.Module) else contextlib.nullcontext()
    with frozen, torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        out = fn(*args, **kwargs)
    by_module = {path: int(sum(ops.values())) for path, ops in counter.get_flop_counts().items() if path != "Global"}
    return TorchCount(int(counter.get_total_flops()), by_module), out


@contextlib.contextmanager
def _frozen_parameters(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without ``requires_grad`` for the duration (restored after).

    ``FlopCounterMode``'s module tracker hooks the gradient of every module input that requires one; a view
    of a parameter made in inference mode and handed to a module (LFM2's short convolution hands its squeezed
    weight to a kernel module) has none to hook, and the tracker fails. A count needs no gradients.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass(frozen=True)
class FvcoreCount:
    """MACs counted by fvcore's ``FlopCountAnalysis``.

    Attributes:
        macs: Total MACs of the ops fvcore counted (sdpa included through our handle).
        by_module: MACs per module path.
        uncounted_ops: Ops fvcore saw but has no formula for, with how often they ran (element-wise
            ops, norms, softmax; none of them matrix products, so none missing from the total).
        warnings: What tracing and fvcore printed, captured.
    """

    macs: int
    by_module: dict[str, int]
    uncounted_ops: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def fvcore_sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    b, h, lq, d = q
    lk, dv = k[-2], v[-1]
    return b * h * lq * lk * (d + dv)


class _LanguageModelOnEmbeds(nn.Module):
    """The decoder and LM head of a model, fed ``inputs_embeds`` (what fvcore can trace)."""

    def __init__(self, model: nn.Module, logits_positions: int | None) -> None:
        super().__init__()
        self.decoder = model.get_decoder()
        self.lm_head = model.lm_head
        self.logits_positions = logits_positions

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        hidden = self.decoder(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if self.logits_positions is not None:
            hidden = hidden[:, -self.logits_positions :]
        return self.lm_head(hidden)


def fvcore_macs(
    model: nn.Module,
    inputs_embeds: Tensor,
    *,
    attention_mask: Tensor,
    position_ids: Tensor,
    logits_positions: int | None = None,
) -> FvcoreCount:
    """Count the language model of ``model`` (its decoder plus LM head) on ``inputs_embeds`` with fvcore.

    Args:
        model: A transformers causal LM or VLM (``get_decoder()`` and ``lm_head``). Hooks installed on
            its decoder layers (a tokenprune pipeline) are traced with it.
        inputs_embeds: ``(B, L, D)`` as the decoder receives them.
        attention_mask: ``(B, L)`` 2-D mask.
        position_ids: As the decoder receives them (``(B, L)``, or ``(3|4, B, L)`` for M-RoPE).
        logits_positions: Last positions whose logits are computed (None: all).
    """
    wrapper = _LanguageModelOnEmbeds(model, logits_positions).eval()
    captured: list[str] = []
    handler = _ListHandler(captured)
    fv_logger = logging.getLogger("fvcore")
    fv_logger.addHandler(handler)
    previous, fv_logger.propagate = fv_logger.propagate, False
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            from fvcore.nn import FlopCountAnalysis  # imported here: fvcore's import warns too

            analysis = FlopCountAnalysis(wrapper, (inputs_embeds, attention_mask, position_ids))
            analysis.set_op_handle(**fvcore_handles())
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            by_module = {name: int(v) for name, v in analysis.by_module().items()}
            rotary = sum(by_module.get(f"decoder.{n}", 0) for n in compat.rotary_embedding_names(wrapper.decoder))
            total = int(analysis.total()) - rotary
            uncounted = dict(Counter(analysis.unsupported_ops()))
    finally:
        fv_logger.removeHandler(handler)
        fv_logger.propagate = previous
    captured.extend(str(w.message).splitlines()[0] for w in caught)
    return FvcoreCount(total, by_module, uncounted, _dedupe(captured))


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage().splitlines()[0])


def _dedupe(messages: list[str]) -> list[str]:
    return list(dict.fromkeys(messages))


def flops_to_macs(flops: int) -> int:
    """MACs from FLOPs (exact: every counted op is a multiply-accumulate)."""
    return flops // 2


__all__: list[str] = [
    "FvcoreCount",
    "TorchCount",
    "flops_to_macs",
    "fvcore_handles",
    "fvcore_macs",
    "grouped_mm_macs",
    "torch_flops",
]
