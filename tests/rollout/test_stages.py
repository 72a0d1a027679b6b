"""Generate and refine stages against scripted fakes of the worker/judge protocols.

Design: docs/design.md#tree-mode.
"""

import random

import numpy as np
import pytest

from rollout.buffer import BufferEntry
from rollout.datasets import PromptRecord
from rollout.interfaces import JudgeResult
from rollout.stages import INPUT_STAGE, StageSettings, run_generate_stage, run_refine_stage
from tests.rollout.fakes import (
    PLAIN,
    FakeGenerator,
    FakeJudge,
    FakeReasoner,
    fake_image,
    is_reflect,
    user_text,
)

SETTINGS = StageSettings(group_size=3, templates=PLAIN)
RECORDS = [PromptRecord("cats", {"tag": "a"}, "a"), PromptRecord("dogs", {"tag": "b"}, "b")]
PLANS = ["<think>p</think>draw s=0.5", "no think tags", "<think>p</think>draw s=1"]
REFLECTS = ["<think>r</think>fix s=1", "<think>r</think>No further edit needed.", "garbage s=0.25"]


def _roles(script):
    gen = FakeGenerator()
    return FakeReasoner(script), gen, FakeJudge(gen)


def test_generate_stage_groups_share_noise_and_parse_plans():
    reasoner, gen, judge = _roles(lambda req, i, call: PLANS[i])
    trajs = run_generate_stage(RECORDS, reasoner, gen, judge, SETTINGS, random.Random(0))
    (call,) = reasoner.calls
    assert [user_text(r) for r in call] == ["cats", "dogs"] and all(r.n == 3 for r in call)
    assert len({r.seed for r in call}) == 2
    ((requests, sampler),) = gen.calls
    assert sampler == SETTINGS.generate_sampler
    assert [r.prompt for r in requests] == [
        "draw s=0.5",
        "cats",
        "draw s=1",
        "draw s=0.5",
        "dogs",
        "draw s=1",
    ]
    assert len({r.noise_seed for r in requests[:3]}) == 1 and len({r.noise_seed for r in requests[3:]}) == 1
    assert requests[0].noise_seed != requests[3].noise_seed
    assert len({r.seed for r in requests}) == 6
    assert all(r.source_image is None for r in requests)
    (items,) = judge.calls
    assert [it.prompt for it in items] == ["cats"] * 3 + ["dogs"] * 3
    assert items[3].metadata == {"tag": "b"}
    assert [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]
    rounds = [t.rounds[0] for t in trajs]
    assert [r.score for r in rounds] == [0.5, 0.0, 1.0] * 2
    assert [r.correct for r in rounds] == [False, False, True] * 2
    assert [r.well_formed for r in rounds] == [True, False, True] * 2
    assert [r.instruction for r in rounds[:3]] == ["draw s=0.5", "cats", "draw s=1"]
    assert all(r.index == 0 and r.stage == "generate" and not r.stopped for r in rounds)
    assert rounds[0].text.text == PLANS[0] and rounds[0].image.prompt == "draw s=0.5"


def test_refine_stage_edits_and_stops():
    starts = [
        BufferEntry("cats", fake_image(1), 0.5, False, {"tag": "a"}, step=3),
        BufferEntry("dogs", fake_image(2), 1.0, True, {"tag": "b"}, round_index=1),
    ]
    reasoner, gen, judge = _roles(lambda req, i, call: REFLECTS[i])
    trajs = run_refine_stage(starts, reasoner, gen, judge, SETTINGS, random.Random(0), group_offset=5)
    (call,) = reasoner.calls
    assert all(is_reflect(r) and r.n == 3 for r in call)
    assert call[0].messages[-1].images[0] is starts[0].image
    ((requests, sampler),) = gen.calls
    assert sampler == SETTINGS.edit_sampler and sampler.noise_level == 1.0
    assert [r.prompt for r in requests] == ["fix s=1", "Edit the image so that it shows: cats"] + [
        "fix s=1",
        "Edit the image so that it shows: dogs",
    ]
    assert requests[0].source_image is starts[0].image and requests[2].source_image is starts[1].image
    assert requests[0].noise_seed == requests[1].noise_seed != requests[2].noise_seed
    assert [t.group_id for t in trajs] == [5, 5, 5, 6, 6, 6]
    ctx = trajs[0].rounds[0]
    assert ctx.stage == INPUT_STAGE and ctx.score == 0.5 and ctx.image.image is starts[0].image
    rounds = [t.rounds[1] for t in trajs]
    assert [r.index for r in rounds] == [1, 1, 1, 2, 2, 2]
    assert [r.stopped for r in rounds] == [False, True, False] * 2
    assert [r.score for r in rounds] == [1.0, 0.5, 0.0, 1.0, 1.0, 0.0]
    assert [r.well_formed for r in rounds] == [True, True, False] * 2
    stopped = rounds[1]
    assert stopped.image is None and stopped.instruction == "" and not stopped.correct
    assert rounds[4].correct  # stop on a perfect image keeps `correct`
    assert [it.prompt for it in judge.calls[0]] == ["cats", "cats", "dogs", "dogs"]


def test_refine_all_stopped_skips_generator_and_judge():
    reasoner, gen, judge = _roles(lambda req, i, call: "<think>x</think>no further edit needed")
    trajs = run_refine_stage(
        [BufferEntry("cats", fake_image(), 0.3)], reasoner, gen, judge, SETTINGS, random.Random(0)
    )
    assert gen.calls == [] and judge.calls == []
    assert all(t.rounds[1].stopped and t.rounds[1].score == 0.3 for t in trajs)


def _varied(req, i, call):
    return f"<think>x</think>draw s={random.Random(req.seed + i).choice([0, 0.5, 1])}"


def test_stages_are_deterministic_given_the_rng():
    runs = []
    for seed in (7, 7, 8):
        reasoner, gen, judge = _roles(_varied)
        trajs = run_generate_stage(RECORDS, reasoner, gen, judge, SETTINGS, random.Random(seed))
        runs.append(
            ([(r.seed, r.noise_seed, r.prompt) for r in gen.made], [t.rounds[0].score for t in trajs])
        )
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_protocol_violations_raise():
    reasoner, gen, judge = _roles(lambda req, i, call: PLANS[0])
    short = FakeReasoner(lambda req, i, call: PLANS[0])
    short.generate = lambda requests: [[] for _ in requests]
    with pytest.raises(ValueError, match="reasoner returned"):
        run_generate_stage(RECORDS, short, gen, judge, SETTINGS, random.Random(0))
    judge.score = lambda items: [JudgeResult(0.5, False)]
    with pytest.raises(ValueError, match="judge returned 1 results for 6"):
        run_generate_stage(RECORDS, reasoner, gen, judge, SETTINGS, random.Random(0))
    judge.score = lambda items: [JudgeResult(1.5, True) for _ in items]
    with pytest.raises(ValueError, match="outside"):
        run_generate_stage(RECORDS, reasoner, gen, judge, SETTINGS, random.Random(0))
    with pytest.raises(ValueError, match="at least one"):
        run_generate_stage([], reasoner, gen, judge, SETTINGS, random.Random(0))


def test_judge_errors_are_kept_in_details():
    reasoner, gen, judge = _roles(lambda req, i, call: PLANS[0])
    judge.score = lambda items: [JudgeResult(0.0, False, {"why": "x"}, "", "timeout") for _ in items]
    trajs = run_generate_stage(RECORDS[:1], reasoner, gen, judge, SETTINGS, random.Random(0))
    assert trajs[0].rounds[0].judge_details == {"why": "x", "error": "timeout"}


def test_settings_validation():
    with pytest.raises(ValueError, match="group_size"):
        StageSettings(group_size=0)
    with pytest.raises(ValueError, match="top_p"):
        StageSettings(top_p=0.0)
    assert np.array_equal(fake_image(3), fake_image(3))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_judge_score_becomes_an_error_result(value):
    reasoner, gen, judge = _roles(lambda req, i, call: PLANS[0])
    judge.score = lambda items: [JudgeResult(value, True, {"why": "x"}, "raw") for _ in items]
    trajs = run_generate_stage(RECORDS[:1], reasoner, gen, judge, SETTINGS, random.Random(0))
    for t in trajs:
        r = t.rounds[0]
        assert (r.score, r.correct) == (0.0, False)
        assert r.judge_details == {"why": "x", "error": f"judge returned a non-finite score ({value!r})"}


def test_finite_judge_result_keeps_finite_results_and_the_judges_own_error():
    from rollout.interfaces import finite_judge_result

    ok = JudgeResult(0.5, False, {"a": 1}, "r")
    assert finite_judge_result(ok) is ok
    bad = finite_judge_result(JudgeResult(float("nan"), True, {"a": 1}, "r", error="timeout"))
    assert (bad.score, bad.correct, bad.details, bad.raw) == (0.0, False, {"a": 1}, "r")
    assert bad.error == "judge returned a non-finite score (nan); its own error: timeout"
