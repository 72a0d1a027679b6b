"""Statistics of a learning claim (cluster.paired_stats), against hand-computed values."""

import math

import pytest

from cluster.paired_stats import combine_seeds, paired_difference, proportion_difference


def test_paired_difference_by_hand():
    # seed 0: d = [1, 0, 0, 1], mean 0.5, sample var (4 × 0.25) / 3 = 1/3, var of the mean 1/12
    # seed 1: d = [0, 0, 0, 0], mean 0, var 0
    c = paired_difference([[1, 1, 0, 1], [0, 0, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 0]])
    assert c.mean == pytest.approx(0.25)
    assert c.per_seed == pytest.approx((0.5, 0.0)) and c.n_per_seed == (4, 4)
    assert c.se_within == pytest.approx(math.sqrt(1 / 12) / 2)  # 0.1443
    assert c.se_between == pytest.approx(0.25)  # sd([0.5, 0]) = 0.3536, / sqrt(2)
    assert c.se == pytest.approx(0.25)  # the larger one


def test_within_seed_error_wins_when_seeds_agree():
    # both seeds d = [1, 0, 1, 0]: mean 0.5 each, var (4 × 0.25) / 3 / 4 = 1/12 each; between-seed sd 0
    c = paired_difference([[1, 0, 1, 0]] * 2, [[0, 0, 0, 0]] * 2)
    assert (c.mean, c.se_between) == (pytest.approx(0.5), pytest.approx(0.0))
    assert c.se == c.se_within == pytest.approx(math.sqrt(2 / 12) / 2)


def test_proportion_difference_by_hand():
    # seed 0: 0.6 - 0.4 = 0.2, var 0.24/50 + 0.24/50 = 0.0096; seed 1: 0.5 - 0.5 = 0, var 0.01
    c = proportion_difference([30, 25], [50, 50], [20, 25], [50, 50])
    assert c.mean == pytest.approx(0.1)
    assert c.se_within == pytest.approx(0.07)  # sqrt(0.0196) / 2
    assert c.se_between == pytest.approx(0.1)  # sd([0.2, 0]) / sqrt(2)
    assert c.se == pytest.approx(0.1)


def test_one_seed_has_no_between_seed_error():
    c = combine_seeds([0.3], [0.0004], [100])
    assert math.isnan(c.se_between) and c.se == pytest.approx(0.02)
    assert c.to_dict()["per_seed"] == [0.3]


def test_mismatches_are_refused():
    with pytest.raises(ValueError, match="2 seeds in the arm but 1"):
        paired_difference([[1, 0], [1, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="seed 0: need the same number"):
        paired_difference([[1, 0, 1]], [[1, 0]])
    with pytest.raises(ValueError, match="no samples"):
        proportion_difference([0], [0], [1], [2])
