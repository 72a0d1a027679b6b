"""The instruction reward's formula: components and score of an edit instruction against the judge's
fix, hand-computed; the refine reward with it (text = w_f·f + (Δ + w_i·m)·f); the metrics."""

import pytest

from reward.instruction_match import (
    best_match,
    content_words,
    instruction_kind,
    instruction_match_metrics,
    match_fix,
)
from reward.shaping import refine_rewards
from rollout.judge_fixes import JudgeFix

RECOLOR = JudgeFix("change", "circle", "blue", "change the red circle to blue")
MOVE = JudgeFix("move", "star", "left of the squares", "move the star to the left of the squares")


@pytest.mark.parametrize(
    ("instruction", "kind"),
    [
        ("change the red circle to blue", "change"),
        ("Make the square green.", "change"),
        ("please add a red star", "add"),
        ("put a circle above the square", "add"),
        ("move the stars above the circle", "move"),
        ("get rid of one star", "remove"),
        ("Remove one triangle", "remove"),
        ("the circle should be blue", None),
        ("", None),
    ],
)
def test_instruction_kind_is_the_first_edit_verb(instruction, kind):
    assert instruction_kind(instruction) == kind


def test_content_words_fold_plurals_and_drop_fillers():
    assert content_words("Move the two stars to the LEFT of the wine glasses!") == {
        "move", "two", "star", "left", "wine", "glass"
    }  # fmt: skip
    assert content_words("add one more box") == {"add", "box"}


@pytest.mark.parametrize(
    ("instruction", "fix", "want"),
    [
        # kind, object, attribute, text, score
        ("change the red circle to blue", RECOLOR, (1.0, 1.0, 1.0, None, 1.0)),
        ("make the circle blue", RECOLOR, (1.0, 1.0, 1.0, None, 1.0)),
        ("change the circle to green", RECOLOR, (1.0, 1.0, 0.0, None, 2 / 3)),
        ("add a blue square", RECOLOR, (0.0, 0.0, 1.0, None, 1 / 3)),
        ("", RECOLOR, (0.0, 0.0, 0.0, None, 0.0)),
        # attribute "left of the squares" -> {left, square}: "right of the square" finds 1 of 2
        ("move the star to the right of the square", MOVE, (1.0, 1.0, 0.5, None, 2.5 / 3)),
        ("move the stars left of the squares", MOVE, (1.0, 1.0, 1.0, None, 1.0)),
        # no attribute: mean of kind and object
        ("remove one triangle", JudgeFix("remove", "star"), (1.0, 0.0, None, None, 0.5)),
        # a failed checklist item (text only): the share of its words, {red, circle, left, blue, square}
        ("make the circle red", JudgeFix(text="a red circle left of a blue square"), (None, None, None, 0.4, 0.4)),
    ],
)  # fmt: skip
def test_match_components_hand_computed(instruction, fix, want):
    got = match_fix(instruction, fix)
    assert tuple(got) == pytest.approx(want)


def test_best_match_over_fixes_and_none_without_fixes():
    assert best_match("move the star left of the squares", [RECOLOR, MOVE]).score == pytest.approx(1.0)
    assert best_match("change the circle to green", [RECOLOR, MOVE]) == match_fix("change the circle to green", RECOLOR)
    assert best_match("anything", []) is None


def test_refine_reward_adds_the_weighted_match_to_well_formed_answers():
    # Δ = [0, 0.5, -0.5, 0], m = [1, 0.5, 0, 1], f = [1, 1, 1, 0], w_f = 1, w_i = 0.4
    args = ([0.5] * 4, [0.5, 1.0, 0.0, 0.5], [True, True, True, False], [False] * 4)
    paper = refine_rewards(*args)
    shaped = refine_rewards(*args, instruction_match=[1.0, 0.5, 0.0, 1.0], instruction_weight=0.4)
    assert paper.text == pytest.approx([1.0, 1.5, 0.5, 0.0])
    assert shaped.text == pytest.approx([1.4, 1.7, 0.5, 0.0])
    assert shaped.image == paper.image and shaped.delta == paper.delta
    assert refine_rewards(*args, instruction_match=[1.0] * 4).text == paper.text  # weight 0: the paper
    with pytest.raises(ValueError, match=r"instruction_match\[1\] = 1.5"):
        refine_rewards(*args, instruction_match=[1.0, 1.5, 0.0, 0.0], instruction_weight=1.0)
    with pytest.raises(ValueError, match="instruction_weight must be finite and >= 0, got -1"):
        refine_rewards(*args, instruction_match=[0.0] * 4, instruction_weight=-1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        refine_rewards(*args, instruction_match=[0.0] * 3, instruction_weight=1.0)


def test_metrics_count_full_matches_per_component():
    matches = [
        match_fix("change the red circle to blue", RECOLOR),  # kind, object, attribute
        match_fix("change the circle to green", RECOLOR),  # kind, object
        match_fix("remove one star", JudgeFix("remove", "star")),  # kind, object (no attribute)
        match_fix("make it red", JudgeFix(text="a red circle")),  # text only: counts in none
        None,  # no fix named: not judged
    ]
    m = instruction_match_metrics(matches, "refine")
    assert m == pytest.approx({
        "refine/instruction_judged": 4.0,
        "refine/instruction_score_mean": (1.0 + 2 / 3 + 1.0 + 0.5) / 4,
        "refine/instruction_kind_match": 1.0,
        "refine/instruction_object_match": 1.0,
        "refine/instruction_attribute_match": 0.5,
    })  # fmt: skip
    assert instruction_match_metrics([None], "refine")["refine/instruction_kind_match"] == 0.0
