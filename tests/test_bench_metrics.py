import math

import pytest
import torch

from tokenprune.bench.metrics import exact_match, kl_divergence, normalize_answer, vqa_score


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two dogs.", "2 dogs"),
        ("The RED car!", "red car"),
        ("one", "1"),
        ("3.5", "3.5"),
        ("top-left", "top left"),
        ("  an  apple ", "apple"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_exact_match_uses_any_reference():
    assert exact_match("Red.", ["blue", "red"]) == 1.0
    assert exact_match("reddish", ["red"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_vqa_score_counts_matching_references():
    answers = ["cat"] * 2 + ["dog"] * 8
    assert vqa_score("cat", answers) == pytest.approx(2 / 3)
    assert vqa_score("dog", answers) == 1.0
    assert vqa_score("cow", answers) == 0.0
    assert vqa_score("cat", ["cat"]) == 1.0 and vqa_score("cat", ["cat", "dog"]) == 0.5
    assert vqa_score("cat", []) == 0.0


def test_kl_divergence_against_a_direct_formula():
    p_logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q_logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    got = kl_divergence(p_logits, q_logits)
    p = [math.exp(v) for v in (2.0, 0.0, -1.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v) for v in (0.0, 1.0, 0.0)]
    q = [v / sum(q) for v in q]
    assert got[0].item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q, strict=True)), rel=1e-5)
    assert got[1].item() == 0.0
