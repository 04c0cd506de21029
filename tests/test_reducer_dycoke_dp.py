"""DyCoke's dynamic pruning (``dycoke_dp``): the official per-step decision, re-implemented; the contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenprune_dycoke.decode import DyCokeDecode

import tokenprune as tp
from tokenprune import InsertionPoint, ReduceContext
from tokenprune.testing import check_reducer


def official_steps(attentions: list[torch.Tensor], pruning_ratio: float, threshold: float = 0.9) -> list[list[int]]:
    """The official ``dycoke_pruning`` / ``update_cache`` over decoding steps, for one sample.

    ``attentions[s]`` is step ``s``'s attention to the visual range (``image_attention``). The
    previous step's attention is compared by cosine; below the threshold (or at the first step)
    ``kv_cache`` is the top ``int(len * (1 - P))``; otherwise it stays ``None``: every token.
    """
    kept, previous = [], None
    for image_attention in attentions:
        similarity = 0 if previous is None else F.cosine_similarity(image_attention, previous, dim=0)
        previous = image_attention
        if similarity < threshold:
            num_keep = int(len(image_attention) * (1 - pruning_ratio))
            kept.append(sorted(torch.topk(image_attention, num_keep).indices.tolist()))
        else:
            kept.append(list(range(len(image_attention))))
    return kept


def _steps(n: int, count: int, seed: int) -> list[torch.Tensor]:
    """Attention over ``n`` tokens for ``count`` steps: slow drifts (similar) and jumps (not)."""
    gen = torch.Generator().manual_seed(seed)
    current = torch.rand(n, generator=gen)
    out = []
    for s in range(count):
        if s % 3 == 2:
            current = torch.rand(n, generator=gen)  # a jump: the attention moved to other tokens
        else:
            current = current + 0.02 * torch.rand(n, generator=gen)  # a drift: cosine stays near 1
        out.append(current / current.sum())
    return out


def _context(attention: torch.Tensor, valid: torch.Tensor, step: int | None, keep: float) -> ReduceContext:
    return ReduceContext(
        at=InsertionPoint("decode", 3),
        budget=valid.sum(1),
        valid=valid,
        protected=torch.zeros_like(valid),
        sizes=torch.ones(valid.shape),
        attention={"last": attention},
        keep=keep,
        step=step,
    )


def test_each_step_keeps_what_the_official_code_keeps_in_a_padded_batch():
    lengths, count, keep = (37, 20), 9, 0.3
    per_sample = [_steps(n, count, seed) for seed, n in enumerate(lengths)]
    expected = [official_steps(steps, pruning_ratio=0.7) for steps in per_sample]
    reducer = DyCokeDecode()
    valid = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    decisions = set()
    for s in range(count):
        attention = torch.zeros(valid.shape)
        for b, n in enumerate(lengths):
            attention[b, :n] = per_sample[b][s]
        kept = reducer.reduce(torch.zeros(*valid.shape, 4), _context(attention, valid, s, keep)).tolist()
        assert kept == [expected[0][s], expected[1][s]], f"step {s}"
        decisions.update(len(k) == n for k, n in zip(kept, lengths, strict=True))
    assert decisions == {True, False}  # both branches were taken


def test_the_first_step_of_a_new_generation_prunes_again():
    reducer = DyCokeDecode()
    valid = torch.ones(1, 10, dtype=torch.bool)
    attention = torch.linspace(0.0, 1.0, 10)[None]
    assert reducer.reduce(torch.zeros(1, 10, 4), _context(attention, valid, 0, 0.3)).tolist() == [[7, 8, 9]]
    assert len(reducer.reduce(torch.zeros(1, 10, 4), _context(attention, valid, 1, 0.3)).tolist()[0]) == 10
    assert reducer.reduce(torch.zeros(1, 10, 4), _context(attention, valid, 0, 0.3)).tolist() == [[7, 8, 9]]


def test_threshold_and_integer_keep():
    valid = torch.ones(1, 10, dtype=torch.bool)
    first, second = torch.linspace(0.0, 1.0, 10)[None], torch.linspace(1.0, 0.0, 10)[None]
    nudged = first.clone()
    nudged[0, 0] = 0.05  # cosine 0.9996: below a threshold of 0.9999, above the official 0.9
    strict = DyCokeDecode({"threshold": 0.9999})
    strict.reduce(torch.zeros(1, 10, 4), _context(first, valid, 0, 2))
    assert strict.reduce(torch.zeros(1, 10, 4), _context(nudged, valid, 1, 2)).tolist() == [[8, 9]]
    official = DyCokeDecode()
    official.reduce(torch.zeros(1, 10, 4), _context(first, valid, 0, 2))
    assert len(official.reduce(torch.zeros(1, 10, 4), _context(nudged, valid, 1, 2)).tolist()[0]) == 10
    never = DyCokeDecode({"threshold": -1.0})  # after the first step, never
    never.reduce(torch.zeros(1, 10, 4), _context(first, valid, 0, 2))
    assert len(never.reduce(torch.zeros(1, 10, 4), _context(second, valid, 1, 2)).tolist()[0]) == 10


def test_protected_tokens_are_kept_and_not_counted():
    valid = torch.ones(1, 10, dtype=torch.bool)
    ctx = _context(torch.linspace(1.0, 0.0, 10)[None], valid, 0, 0.5)
    ctx.protected[0, 9] = True  # a video newline with no attention
    assert DyCokeDecode().reduce(torch.zeros(1, 10, 4), ctx).tolist() == [[0, 1, 2, 3, 9]]  # int(9 * 0.5) + 1


def test_the_contract_and_registration():
    check_reducer(DyCokeDecode, {"threshold": 0.9})
    assert tp.get_plugin_manager().reducers.get("dycoke_dp") is DyCokeDecode
    assert DyCokeDecode.capabilities.insertion_points == {"decode"}
