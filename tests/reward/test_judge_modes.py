"""Queries per mode, metadata errors as results, prompt-template validation, the judge registry."""

import numpy as np
import pytest

from reward.judge_modes import JudgePrompts, failure_kind, queries_for
from reward.registry import build_judge, known_judges, register_judge
from reward.simple_judges import CallLogJudge, ConstantJudge, read_call_log
from rollout.interfaces import Judge, JudgeItem, JudgeResult

IMG = np.zeros((8, 8, 3), np.uint8)


def test_checklist_query_contains_prompt_and_checklist():
    item = JudgeItem(IMG, "a photo of two clocks", {"include": [{"class": "clock", "count": 2}]})
    (q,) = queries_for(item, "checklist", JudgePrompts())
    assert '"a photo of two clocks"' in q
    assert "1. The image contains at least two clocks." in q
    assert '{"correct": 1}' in q


def test_questions_and_vqascore_queries():
    md = {"yn_question_list": ["Is there a cat?  ", "Is it red?"], "yn_answer_list": ["yes", "No"]}
    item = JudgeItem(IMG, "a red cat", md)
    assert queries_for(item, "questions", JudgePrompts()) == [
        "Is there a cat? Please answer yes or no.",
        "Is it red? Please answer yes or no.",
    ]
    assert queries_for(item, "vqascore", JudgePrompts(vqascore="Q: {prompt}?")) == ["Q: a red cat?"]


@pytest.mark.parametrize(
    ("mode", "metadata", "fragment"),
    [
        ("checklist", {}, "bad GenEval metadata"),
        ("questions", {}, "yn_question_list"),
        ("questions", {"yn_question_list": ["a?"], "yn_answer_list": []}, "1 questions but 0"),
        ("questions", {"yn_question_list": ["a?"], "yn_answer_list": ["maybe"]}, "not yes/no"),
    ],
)
def test_unusable_metadata_is_an_error_result(mode, metadata, fragment):
    r = queries_for(JudgeItem(IMG, "p", metadata), mode, JudgePrompts())
    assert isinstance(r, JudgeResult) and r.score == 0.0 and not r.correct and fragment in r.error


def test_unknown_mode_and_bad_template_raise():
    with pytest.raises(ValueError, match="unknown judge mode 'vqa'"):
        queries_for(JudgeItem(IMG, "p"), "vqa", JudgePrompts())
    with pytest.raises(ValueError, match="allowed fields"):
        JudgePrompts(checklist="{prompt} {missing}")
    with pytest.raises(ValueError, match="allowed fields"):
        JudgePrompts(checklist='{"correct": 1} {prompt} {checklist}')


def test_registry_builds_constant_and_rejects_unknown_and_duplicates(tmp_path):
    assert {"vlm", "remote", "ocr", "constant"} <= set(known_judges())
    judge = build_judge({"kind": "constant", "score": 0.5, "call_log": tmp_path / "calls.jsonl"})
    assert isinstance(judge, CallLogJudge) and isinstance(judge, Judge)
    out = judge.score([JudgeItem(IMG, "p")] * 3)
    assert [r.score for r in out] == [0.5] * 3
    assert [c["n"] for c in read_call_log(tmp_path / "calls.jsonl")] == [3]
    with pytest.raises(ValueError, match="unknown judge kind 'nope'"):
        build_judge({"kind": "nope"})
    with pytest.raises(ValueError, match="already registered"):
        register_judge("constant")(lambda: ConstantJudge())
    with pytest.raises(ValueError, match="outside"):
        ConstantJudge(score=2.0)


def test_failure_kind_tags():
    assert failure_kind("serve timeout after 1s (2 attempts)") == "timeout"
    assert failure_kind("engine error: RuntimeError: x") == "engine"
    assert failure_kind("no JSON object in output") == "model_output"
    assert failure_kind("http 503: busy (after 3 attempts)") == "transport"
    assert failure_kind("bad GenEval metadata: ...") == "input"
