"""The null arm's shuffle (learners.null_advantages): a seeded permutation of a batch's advantages."""

import pytest
import torch

from learners.null_advantages import null_seed, shuffle_advantages


def test_shuffle_keeps_the_values_and_moves_them():
    adv = torch.tensor([0.875, 0.375, -1.125, -0.125, 0.0, 0.0, 0.5, -0.5], dtype=torch.float64)
    out = shuffle_advantages(adv, seed=3)
    assert sorted(out.tolist()) == sorted(adv.tolist())  # same multiset: same mean, spread, update size
    assert out.sum().item() == pytest.approx(adv.sum().item())
    assert not torch.equal(out, adv)  # this seed moves them (the values are distinct enough)


def test_shuffle_is_the_permutation_of_its_seed():
    adv = torch.arange(6, dtype=torch.float64)
    expected = adv[torch.randperm(6, generator=torch.Generator().manual_seed(11))]
    assert torch.equal(shuffle_advantages(adv, 11), expected)
    assert torch.equal(shuffle_advantages(adv, 11), shuffle_advantages(adv, 11))
    assert not torch.equal(shuffle_advantages(adv, 11), shuffle_advantages(adv, 12))


def test_shuffle_handles_empty_and_refuses_non_vectors():
    assert shuffle_advantages(torch.zeros(0), 0).numel() == 0
    with pytest.raises(ValueError, match=r"1-D \[B\], got shape \(2, 2\)"):
        shuffle_advantages(torch.zeros(2, 2), 0)


def test_null_seed_differs_by_step_and_side():
    # (seed * 1_000_003 + step) * 2 + side, side 0 for text and 1 for image
    assert null_seed(0, 0, "text") == 0 and null_seed(0, 0, "image") == 1
    assert null_seed(0, 5, "text") == 10 and null_seed(1, 0, "image") == 2_000_007
    with pytest.raises(ValueError, match="side='images'"):
        null_seed(0, 0, "images")
