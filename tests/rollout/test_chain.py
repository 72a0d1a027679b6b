"""Chain mode: whole trajectories of up to K rounds with a learned stop (docs/design.md#chain-mode)."""

import random

import numpy as np
import pytest

from rollout.chain import current_state, is_finished, run_chain
from rollout.datasets import PromptRecord
from rollout.stages import StageSettings
from tests.rollout.fakes import PLAIN, FakeGenerator, FakeJudge, FakeReasoner, is_reflect, user_text

RECORDS = [PromptRecord("cats"), PromptRecord("dogs")]
SETTINGS = StageSettings(group_size=2, templates=PLAIN)


def _script(req, i, call):
    if not is_reflect(req):
        return "<think>plan</think>draw s=0.5"
    if user_text(req) == "cats":
        return "<think>looks right</think>no further edit needed"
    return {1: "<think>r</think>fix s=0.75", 2: "<think>r</think>fix s=1"}[call]


def _run(max_rounds=3, seed=0):
    gen = FakeGenerator()
    reasoner, judge = FakeReasoner(_script), FakeJudge(gen)
    trajs = run_chain(RECORDS, reasoner, gen, judge, SETTINGS, random.Random(seed), max_rounds)
    return trajs, reasoner, gen


def test_trajectories_stop_or_run_to_k_rounds():
    trajs, reasoner, gen = _run()
    assert [t.group_id for t in trajs] == [0, 0, 1, 1]
    cats, dogs = trajs[:2], trajs[2:]
    for t in cats:
        assert [r.stage for r in t.rounds] == ["generate", "refine"]
        assert t.rounds[1].stopped and t.rounds[1].image is None and t.rounds[1].score == 0.5
        assert is_finished(t)
    for t in dogs:
        assert [r.score for r in t.rounds] == [0.5, 0.75, 1.0]
        assert [r.index for r in t.rounds] == [0, 1, 2]
        assert t.rounds[2].correct and not is_finished(t)
    # one batched call per round over the active trajectories, n = 1 each
    assert [len(c) for c in reasoner.calls] == [2, 4, 2]
    assert all(r.n == 1 for r in reasoner.calls[1])
    assert [user_text(r) for r in reasoner.calls[2]] == ["dogs", "dogs"]
    # round 2 edits the round-1 image of the same trajectory
    round2_requests, _ = gen.calls[2]
    assert round2_requests[0].source_image is dogs[0].rounds[1].image.image
    assert reasoner.calls[2][1].messages[-1].images[0] is dogs[1].rounds[1].image.image


def test_current_state_after_a_stop_is_the_last_image():
    trajs, _, _ = _run()
    s = current_state(trajs[0])
    assert s.image is trajs[0].rounds[0].image.image and s.score == 0.5 and s.round_index == 1


def test_one_round_is_generation_only_and_bad_k_raises():
    trajs, reasoner, _ = _run(max_rounds=1)
    assert all(len(t.rounds) == 1 for t in trajs) and len(reasoner.calls) == 1
    with pytest.raises(ValueError, match="max_rounds"):
        _run(max_rounds=0)


def test_chain_is_deterministic():
    a, _, ga = _run(seed=4)
    b, _, gb = _run(seed=4)
    assert [(r.seed, r.noise_seed) for r in ga.made] == [(r.seed, r.noise_seed) for r in gb.made]
    assert all(np.array_equal(x.rounds[-1].score, y.rounds[-1].score) for x, y in zip(a, b, strict=True))
