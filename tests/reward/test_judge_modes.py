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


def test_vqascore_results_from_log_probs_are_errors_when_non_finite():
    import math

    from reward.judge_modes import result_from_token_logprobs, result_from_yes_no_logprobs

    r = result_from_yes_no_logprobs([math.log(0.3)], [math.log(0.1)], raw="Yes", threshold=0.5)
    assert (r.score, r.correct, r.error) == (pytest.approx(0.75), True, None)
    r = result_from_yes_no_logprobs([2000.0], [2000.0 + math.log(3.0)])  # would overflow exp()
    assert (r.score, r.correct, r.error) == (pytest.approx(0.25), False, None)
    for yes, no in (([math.inf], [0.0]), ([math.nan], [0.0]), ([0.0], [math.inf])):
        r = result_from_yes_no_logprobs(yes, no, raw="Yes")
        assert (r.score, r.correct, r.raw) == (0.0, False, "Yes")
        assert r.error.startswith("judge returned a non-finite log-prob"), r.error
    r = result_from_token_logprobs({"Yes": math.inf, "No": -1.0})  # +inf Yes: an error, not a silent 0
    assert r.error is not None and "non-finite" in r.error and r.score == 0.0
    assert result_from_token_logprobs({"Yes": math.log(0.2), "no": math.log(0.6)}).score == pytest.approx(0.25)
    assert result_from_token_logprobs({"maybe": 0.0}).error.startswith("no yes/no token")


def test_vlm_judge_vqascore_reads_first_token_log_probs_in_log_space():
    import math
    from types import SimpleNamespace

    from reward.vlm_judge import VLMJudge

    judge = VLMJudge.__new__(VLMJudge)  # no engine: only the reading of a completion is tested
    judge._yes_ids, judge._no_ids, judge._yes_threshold = {1, 2}, {3}, 0.5

    def completion(lps: dict[int, float]):
        return SimpleNamespace(text="Y", logprobs=[{t: SimpleNamespace(logprob=v) for t, v in lps.items()}])

    r = judge._vqascore(completion({1: math.log(0.2), 2: math.log(0.1), 3: math.log(0.1), 9: 0.0}))
    assert (r.score, r.correct, r.error) == (pytest.approx(0.75), True, None)
    assert judge._vqascore(completion({1: 710.0, 3: 709.0})).score == pytest.approx(1 / (1 + math.exp(-1)))
    for bad in ({1: math.inf, 3: -0.1}, {1: math.nan, 3: -0.1}):
        r = judge._vqascore(completion(bad))
        assert (r.score, r.correct) == (0.0, False) and "non-finite log-prob" in r.error
    assert judge._vqascore(completion({9: 0.0})).error.startswith("no yes/no token")
    assert judge._vqascore(SimpleNamespace(text="", logprobs=[])).error == "engine returned no log-probs"


def test_call_log_records_the_judges_own_seconds_per_call(tmp_path):
    judge = build_judge({"kind": "constant", "delay_s": 0.05, "call_log": tmp_path / "calls.jsonl"})
    judge.score([JudgeItem(IMG, "p")] * 2)
    (call,) = read_call_log(tmp_path / "calls.jsonl")
    assert call["n"] == 2 and call["s"] >= 0.05  # the sleep is inside the judged call
