"""Reasoner templates and the plan / reflect answer parsers (docs/design.md#answers-and-the-stop-phrase)."""

import numpy as np
import pytest

from rollout.templates import Templates, parse_plan, parse_reflect

IMG = np.zeros((4, 4, 3), np.uint8)


def test_plan_messages_fill_prompt_and_system():
    msgs = Templates().plan_messages("a red cube")
    assert [m.role for m in msgs] == ["system", "user"]
    assert "a red cube" in msgs[1].text and "<think>" in msgs[1].text
    assert msgs[1].images == ()


def test_reflect_messages_show_the_image_and_stop_phrase():
    t = Templates(system="")
    (msg,) = t.reflect_messages("two dogs", IMG)
    assert msg.images[0] is IMG
    assert "two dogs" in msg.text and "no further edit needed" in msg.text


def test_custom_templates_are_used_verbatim():
    t = Templates(
        system="S",
        plan="P:{prompt}",
        reflect="R:{prompt}|{stop_phrase}",
        stop_phrase="all done, no further edit",
    )
    assert t.plan_messages("x")[1].text == "P:x"
    assert t.reflect_messages("x", IMG)[1].text == "R:x|all done, no further edit"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(plan="no placeholder"), "plan"),
        (dict(reflect="{prompt} {other}"), "reflect"),
        (dict(stop_phrase="done", stop_match="no further edit"), "stop_phrase"),
        (dict(edit_fallback="fix it"), "edit_fallback"),
    ],
)
def test_bad_templates_raise_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Templates(**kwargs)


def test_reflect_image_must_be_uint8_hwc():
    with pytest.raises(ValueError, match="uint8"):
        Templates().reflect_messages("x", np.zeros((4, 4, 3), np.float32))


def test_parse_plan_well_formed_and_fallback():
    ok = parse_plan("<think>count two</think> two red apples on a table ", "apples")
    assert ok == ("two red apples on a table", "count two", True)
    for bad in ("no tags at all", "<think>x</think>   ", "<think>a<think>b</think>c"):
        p = parse_plan(bad, "apples")
        assert p.generator_prompt == "apples" and not p.well_formed


def test_parse_reflect_edit_stop_and_fallback():
    edit = parse_reflect("<think>dog missing</think>Add a dog on the left.", "a dog")
    assert edit.instruction == "Add a dog on the left." and edit.well_formed and not edit.stop
    stop = parse_reflect("<think>fine</think>No Further Edit Needed.", "a dog")
    assert stop.stop and stop.well_formed and stop.instruction == ""
    bad_stop = parse_reflect("no further edit needed", "a dog")
    assert bad_stop.stop and not bad_stop.well_formed
    bad = parse_reflect("make it blue", "a dog")
    assert not bad.stop and not bad.well_formed
    assert bad.instruction == "Edit the image so that it shows: a dog"
