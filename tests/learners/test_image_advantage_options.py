"""Image-side credit options: the zero-variance keep mask and per-group vs batch std, by hand.

Design: docs/design.md#advantages.
"""

import math

import pytest
import torch

from learners.algos import ZERO_VARIANCE_POLICIES, group_advantages, zero_variance_keep_mask

# three groups of 4: one with spread, one flat, one spanning 0.1
REWARDS = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.6])


def test_keep_mask_keeps_everything():
    assert zero_variance_keep_mask(REWARDS, 4, "keep").tolist() == [True] * 12


def test_drop_mask_leaves_out_flat_groups_only():
    assert zero_variance_keep_mask(REWARDS, 4, "drop").tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # a span of 0.1 (fp32: 0.6 − 0.5 = 0.100000024) counts as flat with tol 0.2, not with tol 0.05
    assert zero_variance_keep_mask(REWARDS, 4, "drop", tol=0.2).tolist() == [True] * 4 + [False] * 8
    assert zero_variance_keep_mask(REWARDS, 4, "drop", tol=0.05).tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # a group of one is flat: its advantage is 0
    assert zero_variance_keep_mask(torch.tensor([3.0, 4.0]), 1, "drop").tolist() == [False, False]


def test_keep_mask_rejects_unknown_policies_and_bad_groups():
    assert ZERO_VARIANCE_POLICIES == ("keep", "drop")
    with pytest.raises(ValueError, match="unknown zero-variance policy 'skip'"):
        zero_variance_keep_mask(REWARDS, 4, "skip")
    with pytest.raises(ValueError, match="divide N=12"):
        zero_variance_keep_mask(REWARDS, 5, "drop")


def test_per_group_and_batch_std_by_hand():
    # groups [1, 0] and [1, 1]: centred [.5, −.5, 0, 0]; group stds .5 and 0; batch std of
    # [1, 0, 1, 1] = sqrt(3/16) = .4330
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert group_advantages(rewards, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert group_advantages(rewards, 2, "group", eps=1e-6).tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0], rel=1e-5)
    batch = 0.5 / (math.sqrt(3 / 16) + 1e-6)
    assert group_advantages(rewards, 2, "global", eps=1e-6).tolist() == pytest.approx([batch, -batch, 0.0, 0.0])
    assert batch == pytest.approx(1.1547, abs=1e-4)
