"""Analytic MACs equal fvcore's and torch's counts exactly, on tiny models of four families (one MoE)."""

import pytest
import tiny_models
import torch

from tokenprune.cost.analytic import DecoderShape, language_model_macs
from tokenprune.cost.counters import (
    flops_to_macs,
    fvcore_macs,
    grouped_mm_macs,
    language_model_flops,
    torch_flops,
)

FAMILIES = ["llava_next", "llava", "qwen2_vl", "qwen3_vl_moe"]


def _decoder_inputs(model, inputs):
    """Run the model once and capture what its decoder received."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
    try:
        torch_count, _ = torch_flops(model, **inputs)
    finally:
        handle.remove()
    return torch_count, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_equals_torch_and_fvcore_unpruned(family):
    tiny = getattr(tiny_models, family)()
    model, inputs = tiny.model, tiny.make_inputs([(56, 84)])
    length = inputs["input_ids"].shape[1]
    torch_count, seen = _decoder_inputs(model, inputs)
    shape = DecoderShape.from_model(model)
    analytic = language_model_macs(shape, [length] * shape.num_layers, logits_positions=length)
    lm_flops = language_model_flops(torch_count, ".language_model", model.get_decoder())
    torch_lm = flops_to_macs(lm_flops + torch_count.module_flops(".lm_head"))
    position_ids = seen.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length)[None]
    fv = fvcore_macs(model, seen["inputs_embeds"], attention_mask=inputs["attention_mask"], position_ids=position_ids)
    assert analytic.total == torch_lm == fv.macs
    # the attention term is really there: without it the count would be lower by 2 * q_dim * n^2 per layer
    assert analytic.total - sum(
        length * p for p in shape.linear_macs_per_token
    ) - length * shape.hidden * shape.vocab == sum(2 * q * length * length for q in shape.q_dims)
    # fvcore saw no matrix product it could not count
    assert not {op for op in fv.uncounted_ops if any(w in op for w in ("mm", "matmul", "linear", "attention"))}


def test_torch_counter_counts_cpu_sdpa():
    """Without our formula FlopCounterMode counts CPU sdpa as 0; with it, 2*(QK^T + AV) FLOPs."""
    q = torch.randn(2, 4, 7, 8)
    k = torch.randn(2, 4, 9, 8)
    count, _ = torch_flops(torch.nn.functional.scaled_dot_product_attention, q, k, k)
    assert count.flops == 2 * (2 * 4 * 7 * 9 * 8) * 2


def test_torch_counter_counts_grouped_mm():
    """FlopCounterMode has no formula for aten._grouped_mm (MoE experts) and counts it as 0; with ours, 2 x S x K x N."""
    a, b = torch.randn(6, 16), torch.randn(3, 16, 8)
    offs = torch.tensor([2, 4, 6], dtype=torch.int32)
    count, out = torch_flops(torch.nn.functional.grouped_mm, a, b, offs=offs)
    assert torch.allclose(out, torch.cat([a[0:2] @ b[0], a[2:4] @ b[1], a[4:6] @ b[2]]))
    assert count.flops == 2 * 6 * 16 * 8
    count, _ = torch_flops(torch.nn.functional.grouped_mm, torch.randn(3, 4, 16), b)
    assert count.flops == 2 * 3 * 4 * 16 * 8


def test_grouped_mm_macs_of_every_operand_layout():
    assert grouped_mm_macs((6, 16), (3, 16, 8)) == 6 * 16 * 8  # jagged tokens, one weight per group
    assert grouped_mm_macs((3, 4, 16), (3, 16, 8)) == 3 * 4 * 16 * 8  # batched
    assert grouped_mm_macs((3, 4, 16), (16, 24)) == 4 * 16 * 24  # jagged output columns
    assert grouped_mm_macs((4, 30), (30, 8)) == 4 * 30 * 8  # jagged contraction (a weight gradient)


def test_decoder_shape_reads_gqa_and_gated_mlp():
    shape = DecoderShape.from_model(tiny_models.llava_next().model)
    hidden, ffn, heads_dim, kv_dim = 64, 128, 64, 32  # tiny: 4 heads x 16, 2 KV heads x 16
    assert shape.linear_macs_per_token[0] == hidden * heads_dim * 2 + hidden * kv_dim * 2 + 3 * hidden * ffn
    assert shape.q_dims == (heads_dim,) * 4 and shape.vocab == 256


def test_decoder_shape_rejects_a_model_without_a_decoder():
    with pytest.raises(TypeError, match="has no get_decoder"):
        DecoderShape.from_model(torch.nn.Linear(2, 2))


def test_layer_count_must_match():
    shape = DecoderShape.from_model(tiny_models.llava().model)
    with pytest.raises(ValueError, match="layer_tokens has 2 entries; the model has 4 layers"):
        language_model_macs(shape, [5, 5], logits_positions=1)
