import pytest
import torch

from tokenprune.budget import budget_per_sample, tokens_to_keep


@pytest.mark.parametrize(
    ("keep", "present", "expected"),
    [
        (1.0, 7, 7),
        (0.5, 7, 3),  # fractions round down
        (0.29, 100, 29),  # 0.29 * 100 is 28.999... in binary; still 29
        (0.01, 10, 1),  # never below one token
        (64, 10, 10),  # counts are capped at what is present
        (3, 10, 3),
        (0.5, 0, 0),  # nothing present, nothing kept
    ],
)
def test_tokens_to_keep(keep, present, expected):
    assert tokens_to_keep(keep, present) == expected


def test_tokens_to_keep_rejects_bool():
    with pytest.raises(TypeError, match="not a bool"):
        tokens_to_keep(True, 5)


def test_budget_counts_protected_and_never_drops_them():
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    protected = torch.tensor([[0, 0, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # sample 0: half of 6 is 3 (2 of them protected); sample 1: 1 of 3 wanted, but 3 are protected
    assert budget_per_sample(0.5, valid, protected).tolist() == [3, 3]
    assert budget_per_sample(2, valid, protected).tolist() == [2, 3]
    assert budget_per_sample(1.0, valid, protected).tolist() == [6, 3]
