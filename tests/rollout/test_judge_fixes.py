"""The judge-fix protocol: JSON round trip, refusals naming the bad entry, and the buffer keeping an
image's fixes across a checkpoint (older checkpoints without them still load)."""

import numpy as np
import pytest

from rollout.buffer import BufferEntry, RolloutBuffer
from rollout.judge_fixes import FIXES_KEY, JudgeFix, fixes_in


def test_round_trip_and_absent_fixes():
    fix = JudgeFix("move", "star", "left of the square", "move the star to the left of the square")
    assert JudgeFix.from_json(fix.to_json()) == fix
    assert fixes_in({FIXES_KEY: [fix.to_json(), {"text": "a red circle"}]}) == (fix, JudgeFix(text="a red circle"))
    assert fixes_in({"checklist": []}) == () and fixes_in({FIXES_KEY: []}) == ()


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ({FIXES_KEY: "add a star"}, "must be a list of fix dicts, got 'add a star'"),
        ({FIXES_KEY: ["add a star"]}, "a fix must be a dict"),
        ({FIXES_KEY: [{"kind": "recolor"}]}, "fix kind 'recolor' is not one of"),
        ({FIXES_KEY: [{"kind": "add", "colour": "red"}]}, r"unknown keys \['colour'\]"),
        ({FIXES_KEY: [{}]}, "at least one of kind, object, attribute, text"),
        ({FIXES_KEY: [{"object": 3}]}, "fix object must be a string"),
    ],
)
def test_bad_fixes_are_refused_naming_them(details, message):
    with pytest.raises(ValueError, match=message):
        fixes_in(details)


def test_buffer_keeps_fixes_through_its_state_dict():
    fix = JudgeFix("add", "star", "red", "add a red star").to_json()
    buf = RolloutBuffer(seed=1)
    buf.add(BufferEntry("p", np.zeros((4, 4, 3), np.uint8), 0.5, fixes=[fix]))
    buf.add(BufferEntry("q", np.zeros((4, 4, 3), np.uint8), 1.0))
    state = buf.state_dict()
    back = RolloutBuffer()
    back.load_state_dict(state)
    assert [e.fixes for e in back._imperfect] == [[fix]] and [e.fixes for e in back._perfect] == [[]]
    for e in state["imperfect"] + state["perfect"]:
        del e["fixes"]  # a checkpoint written before fixes were kept
    back.load_state_dict(state)
    assert [e.fixes for e in back._imperfect] == [[]]
