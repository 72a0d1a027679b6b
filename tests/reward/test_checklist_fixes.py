"""A checklist-mode judge that lists the items an image fails gives them as text fixes
(`details["fixes"]`), numbers looked up in the checklist it was asked; the remote judge end to end
against the local stand-in server."""

import pytest

from reward.checklist import checklist_items
from reward.instruction_match import best_match
from reward.judge_modes import DEFAULT_CHECKLIST_TEMPLATE, asked_checklist, result_from_checklist
from reward.verdict_parsing import parse_json_verdict
from rollout.interfaces import JudgeItem
from rollout.judge_fixes import FIXES_KEY, JudgeFix, fixes_in
from tests.reward.test_remote_judge import IMG, FakeChatServer, make

META = {"include": [{"class": "cat", "count": 1, "color": "black"}, {"class": "dog", "count": 2}]}


@pytest.mark.parametrize(
    ("text", "failed"),
    [
        ('{"correct": 0, "failed": [2, "the dog is missing"]}', ("2", "the dog is missing")),
        ('{"correct": 0, "Failed": 1}', ("1",)),
        ('{"correct": 0, "failed": {"item": 1}}', ()),
        ('{"correct": 0, "failed": [true, null, " "]}', ()),
        ('{"correct": 0}', ()),
    ],
)
def test_verdict_reads_the_failed_field(text, failed):
    assert parse_json_verdict(text).failed == failed


def test_failed_items_become_text_fixes():
    items = checklist_items(META)
    assert asked_checklist(JudgeItem(IMG, "p", META)) == items and len(items) == 2
    r = result_from_checklist('{"correct": 0, "failed": [2, 9, "no cat", 2]}', items)
    assert fixes_in(r.details) == (JudgeFix(text=items[1]), JudgeFix(text="no cat"))  # 9: not asked; 2 once
    assert FIXES_KEY not in result_from_checklist('{"correct": 1, "failed": [1]}', items).details
    assert FIXES_KEY not in result_from_checklist('{"correct": 0}', items).details
    assert FIXES_KEY not in result_from_checklist('{"correct": 0, "failed": [1]}', []).details
    assert asked_checklist(JudgeItem(IMG, "p", {"include": "cats"})) == []
    assert '"failed"' in DEFAULT_CHECKLIST_TEMPLATE


def test_remote_judge_gives_the_failed_items_as_fixes_that_an_instruction_can_match():
    server = FakeChatServer()
    try:
        (r,) = make(server).score([JudgeItem(IMG, 'ok {"correct": 0, "failed": [1]}', META)])
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    (fix,) = fixes_in(r.details)
    assert r.error is None and fix == JudgeFix(text=checklist_items(META)[0])
    assert best_match("make the cat black", [fix]).score == 1.0  # "The image contains at least one black cat."
    assert best_match("add a dog", [fix]).score == 0.0
