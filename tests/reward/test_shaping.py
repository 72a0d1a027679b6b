"""Reward shaping against hand-computed tables for both stages and chain mode (docs/design.md#rewards)."""

import pytest

from reward.shaping import (
    chain_rewards,
    discounted_returns,
    format_flag,
    generate_rewards,
    refine_rewards,
    stop_flag,
)


def test_format_and_stop_flags():
    assert format_flag("<think>a</think>b") == 1
    assert format_flag("<think>a</think>") == 0
    assert format_flag("b") == 0
    assert stop_flag("<think>ok</think>No further edit needed")
    assert not stop_flag("<think>no further edit needed?</think>add a cat")


# (r, f) -> (text r·f + w_f·f, image r), w_f = 1 unless given
GENERATE = [
    (1.0, True, 2.0, 1.0),
    (0.5, True, 1.5, 0.5),
    (0.0, True, 1.0, 0.0),
    (1.0, False, 0.0, 1.0),
    (0.25, False, 0.0, 0.25),
]


def test_generate_stage_table():
    scores, wf, text, image = zip(*[(r, f, t, i) for r, f, t, i in GENERATE], strict=True)
    out = generate_rewards(scores, wf)
    assert out.text == pytest.approx(list(text)) and out.image == pytest.approx(list(image))
    half = generate_rewards([0.5, 0.5], [True, False], format_weight=0.5)
    assert half.text == pytest.approx([1.0, 0.0])


# (r_prev, r_new, f, stopped) -> (Δ, text w_f·f + Δ·f, image r_new, image trainable)
REFINE = [
    (0.0, 1.0, True, False, 1.0, 2.0, 1.0, True),  # fixed it
    (0.5, 0.0, True, False, -0.5, 0.5, 0.0, True),  # made it worse
    (0.5, 0.5, True, False, 0.0, 1.0, 0.5, True),  # no change
    (1.0, 1.0, True, True, 1.0, 2.0, 1.0, False),  # correct stop on a perfect image: +1
    (0.5, 0.5, True, True, 0.0, 1.0, 0.5, False),  # stop on an imperfect image: Δ = 0
    (1.0, 0.0, True, False, -1.0, 0.0, 0.0, True),  # broke a perfect image
    (1.0, 1.0, True, False, 0.0, 1.0, 1.0, True),  # edited a perfect image, still perfect
    (0.0, 1.0, False, False, 1.0, 0.0, 1.0, True),  # malformed: text 0, image still r_new
    (1.0, 1.0, False, True, 1.0, 0.0, 1.0, False),  # malformed stop
]


def test_refine_stage_table():
    prev, new, wf, st, delta, text, image, trainable = map(list, zip(*REFINE, strict=True))
    out = refine_rewards(prev, new, wf, st)
    assert out.delta == pytest.approx(delta)
    assert out.text == pytest.approx(text)
    assert out.image == pytest.approx(image)
    assert out.image_trainable == trainable


def test_refine_weight_and_threshold():
    out = refine_rewards(
        [0.9, 0.2], [0.9, 0.6], [True, True], [True, False], format_weight=0.0, perfect_score=0.9
    )
    assert out.delta == pytest.approx([1.0, 0.4]) and out.text == pytest.approx([1.0, 0.4])


def test_wrong_stop_penalty():
    # stops: imperfect -> -0.5 (text w_f + Δ = 0.5), perfect -> +1 unchanged; edits unaffected
    out = refine_rewards([0.5, 1.0, 0.5], [0.5, 1.0, 0.25], [True] * 3, [True, True, False], wrong_stop_penalty=0.5)
    assert out.delta == pytest.approx([-0.5, 1.0, -0.25])
    assert out.text == pytest.approx([0.5, 2.0, 0.75])
    chain = chain_rewards([0.5, 0.5], [True, True], [False, True], wrong_stop_penalty=0.5)
    assert chain.delta == pytest.approx([0.0, -0.5]) and chain.text == pytest.approx([1.5, 0.5])


def test_chain_rewards_per_round_and_returns():
    # round 0: r=0.5 f=1 -> 1.5; round 1: 0.5->1.0 f=1 -> Δ .5, 1.5; round 2: stop on perfect f=1 -> Δ 1, 2.0
    out = chain_rewards([0.5, 1.0, 1.0], [True, True, True], [False, False, True])
    assert out.text == pytest.approx([1.5, 1.5, 2.0])
    assert out.delta == pytest.approx([0.0, 0.5, 1.0])
    assert out.image == pytest.approx([0.5, 1.0, 1.0])
    assert out.image_trainable == [True, True, False]
    assert out.text_credit == out.text
    disc = chain_rewards([0.5, 1.0, 1.0], [True, True, True], [False, False, True], discount=0.5)
    assert disc.text_credit == pytest.approx([1.5 + 0.5 * 1.5 + 0.25 * 2.0, 1.5 + 0.5 * 2.0, 2.0])


def test_discounted_returns():
    assert discounted_returns([1.0, 0.0, 2.0], 0.9) == pytest.approx([1.0 + 0.81 * 2.0, 1.8, 2.0])
    with pytest.raises(ValueError, match="discount"):
        discounted_returns([1.0], 1.5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: generate_rewards([1.2], [True]), r"scores\[0\]"),
        (lambda: generate_rewards([0.5, 0.5], [True]), "equal lengths"),
        (lambda: generate_rewards([float("nan")], [True]), "judge score"),
        (lambda: generate_rewards([0.5], [True], format_weight=-1), "format_weight"),
        (lambda: refine_rewards([0.5], [0.7], [True], [True]), "r_new must equal r_prev"),
        (lambda: refine_rewards([0.5], [0.5], [True], [True], wrong_stop_penalty=-1), "wrong_stop_penalty"),
        (lambda: chain_rewards([0.5, 0.5], [True, True], [True, False]), "round 0"),
        (lambda: chain_rewards([0.5, 0.5, 0.5], [True] * 3, [False, True, False]), "last round"),
    ],
)
def test_invalid_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
