"""The generator's claim split by how often the warm start draws each prompt right
(examples.shapesworld.headroom), on hand-made verdicts."""

import math

import pytest

from cluster.paired_stats import paired_difference
from examples.shapesworld.headroom import (
    gain_by_warm_start_class,
    group_spread,
    headroom_from_measures,
    headroom_markdown,
    warm_start_classes,
    warm_start_room,
)

# six probe samples, two per prompt: the warm start draws a never, b once, c always
PROMPTS = ["a", "a", "b", "b", "c", "c"]
WARM = [False, False, True, False, True, True]
ARM = [[1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]  # seeds 0, 1
NULL = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 1]]


def test_classes_by_hand():
    assert warm_start_classes(PROMPTS, WARM) == {"a": "never", "b": "sometimes", "c": "always"}
    with pytest.raises(ValueError, match="6 prompts but 5 warm-start verdicts"):
        warm_start_classes(PROMPTS, WARM[:5])


def test_warm_start_room_by_hand():
    never, sometimes, always = warm_start_room(PROMPTS, WARM)
    assert (never.name, never.prompts, never.share, never.right) == ("never", 1, pytest.approx(1 / 3), 0.0)
    assert (sometimes.prompts, sometimes.share, sometimes.right) == (1, pytest.approx(1 / 3), 0.5)
    assert (always.prompts, always.share, always.right) == (1, pytest.approx(1 / 3), 1.0)
    none_right = warm_start_room(["a", "a", "b"], [False, False, False])
    assert [c.prompts for c in none_right] == [2, 0, 0] and none_right[0].share == 1.0
    assert math.isnan(none_right[1].right) and none_right[2].share == 0.0


def test_split_by_hand_adds_up_to_the_whole_claim():
    never, sometimes, always = gain_by_warm_start_class(ARM, NULL, PROMPTS, WARM)
    # never (a): d = [1, 0] and [0, 0] -> per seed 0.5, 0 -> 0.25; share 2/6
    assert (never.name, never.prompts, never.share) == ("never", 1, pytest.approx(1 / 3))
    assert never.claim.per_seed == pytest.approx((0.5, 0.0)) and never.claim.mean == pytest.approx(0.25)
    assert (never.warm_start, never.arm, never.null) == (0.0, 0.25, 0.0)
    assert never.points_of_total == pytest.approx(1 / 12) and never.room == pytest.approx(1 / 3)
    # sometimes (b): d = [1, 0] and [0, 1] -> 0.5 both; within: sqrt(2 * 0.5 / 2) / 2
    assert sometimes.claim.mean == pytest.approx(0.5) and sometimes.claim.se_between == 0.0
    assert sometimes.claim.se_within == pytest.approx(math.sqrt(0.5) / 2)
    assert (sometimes.warm_start, sometimes.arm, sometimes.null) == (0.5, 1.0, 0.5)
    assert sometimes.room == pytest.approx(1 / 6) and sometimes.se_of_total == pytest.approx(sometimes.claim.se / 3)
    # always (c): d = [0, 0] and [0, -1] -> -0.25; no room over a null arm that is always right
    assert always.claim.mean == pytest.approx(-0.25) and always.room == pytest.approx(0.0)
    # the groups' points add up to the whole paired claim: seeds 1/3 and 0 -> 1/6
    whole = paired_difference(ARM, NULL).mean
    assert whole == pytest.approx(1 / 6)
    assert sum(r.points_of_total for r in (never, sometimes, always)) == pytest.approx(whole)


def test_empty_group_and_bad_shapes():
    rows = gain_by_warm_start_class([[1, 0, 1, 1]], [[0, 0, 1, 1]], ["a", "a", "c", "c"], [0, 0, 1, 1])
    assert [r.name for r in rows] == ["never", "sometimes", "always"]
    assert rows[1].claim is None and rows[1].share == 0.0 and rows[1].points_of_total == 0.0 == rows[1].room
    assert "| sometimes | 0 | 0 % | – |" in headroom_markdown(rows, "rl", "null")
    with pytest.raises(ValueError, match=r"need \[seeds\]\[4\] verdicts"):
        gain_by_warm_start_class([[1, 0, 1]], [[0, 0, 1]], ["a", "a", "c", "c"], [0, 0, 1, 1])


def test_from_measures_and_markdown():
    measures = [{"arm": arm, "seed": s, "probe": {"train": v[s]}} for arm, v in (("rl", ARM), ("null", NULL))
                for s in (0, 1)]  # fmt: skip
    rows = headroom_from_measures(measures, "rl", "null", PROMPTS, WARM)
    assert [r.claim.mean for r in rows] == pytest.approx([0.25, 0.5, -0.25])
    md = headroom_markdown(rows, "rl", "null")
    assert "| never | 1 | 33 % | 0.0 | 25.0 | 0.0 | +25.0 ± 25.0 | +8.3 ± 8.3 | 33.3 |" in md
    assert "| all | 3 | 100 % | | | | | +16.7 | 50.0 |" in md
    with pytest.raises(ValueError, match="share no finished seed"):
        headroom_from_measures(measures, "rl", "cps", PROMPTS, WARM)


def test_group_spread_by_hand():
    classes = warm_start_classes(PROMPTS, WARM)
    groups = [("a", [0.5, 0.5, 0.5]), ("a", [0.0, 0.5]), ("b", [1.0, 0.0, 1.0, 0.0]), ("z", [0.0, 1.0]), ("c", [1.0])]
    s = group_spread(groups, classes)
    # a: stds 0 and 0.25 -> half with spread, mean 0.125; b: std 0.5; c: one image is no group; z: not a probe prompt
    assert (s["never"].groups, s["never"].with_spread, s["never"].mean_std) == (2, 0.5, pytest.approx(0.125))
    assert (s["sometimes"].groups, s["sometimes"].with_spread, s["sometimes"].mean_std) == (1, 1.0, 0.5)
    assert s["always"].groups == 0 and math.isnan(s["always"].mean_std)
    md = headroom_markdown(gain_by_warm_start_class(ARM, NULL, PROMPTS, WARM), "rl", "null", s)
    assert "| +8.3 ± 8.3 | 33.3 | 2 | 50 % | 0.125 |" in md and "| 0.0 | 0 | – | – |" in md


def test_generate_groups_read_what_a_run_wrote(tmp_path):
    from examples.shapesworld.arms import generate_groups
    from rollout.trajectory import Round, Trajectory, write_trajectories

    def traj(prompt, group, stage, score):
        return Trajectory(prompt, {}, group, [Round(index=0, stage=stage, score=score)])

    (tmp_path / "trajectories").mkdir()
    # two steps reuse group ids 0 and 1; a refine group is not a generate group
    write_trajectories(tmp_path / "trajectories" / "step-000000.parquet",
                       [traj("a", 0, "generate", 0.5), traj("a", 0, "generate", 1.0), traj("b", 1, "refine", 0.0)])  # fmt: skip
    write_trajectories(tmp_path / "trajectories" / "step-000001.parquet",
                       [traj("c", 0, "generate", 0.25), traj("c", 0, "generate", 0.75)])  # fmt: skip
    assert generate_groups(tmp_path) == [("a", [0.5, 1.0]), ("c", [0.25, 0.75])]
    assert generate_groups(tmp_path / "no-such-run") == []


def test_partial_credit_per_group_by_hand():
    # scores of the same samples: the never prompt a gains a quarter of its checklist in seed 0 only
    arm_scores = [[0.75, 0.5, 1, 1, 1, 1], [0.5, 0.5, 1, 1, 1, 0.5]]
    null_scores = [[0.5, 0.25, 0.5, 1, 1, 1], [0.5, 0.5, 1, 0.5, 1, 1]]
    rows = gain_by_warm_start_class(ARM, NULL, PROMPTS, WARM, arm_scores, null_scores)
    assert [r.score_claim.mean for r in rows] == pytest.approx([0.125, 0.25, -0.125])
    measures = [{"arm": arm, "seed": s, "probe": {"train": v[s]}, "probe_score": {"train": sc[s]}}
                for arm, v, sc in (("rl", ARM, arm_scores), ("null", NULL, null_scores)) for s in (0, 1)]  # fmt: skip
    rows = headroom_from_measures(measures, "rl", "null", PROMPTS, WARM)
    assert rows[0].score_claim.per_seed == pytest.approx((0.25, 0.0))
    md = headroom_markdown(rows, "rl", "null")
    assert "score: rl − null in the group" in md and "| 33.3 | +12.5 ± 12.5 |" in md
    with pytest.raises(ValueError, match="need scores shaped like the verdicts"):
        gain_by_warm_start_class(ARM, NULL, PROMPTS, WARM, arm_scores[:1], null_scores)
