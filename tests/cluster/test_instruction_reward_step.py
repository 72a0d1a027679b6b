"""The instruction reward inside a tree-mode step (`r3.instruction_reward_weight`): the judge's fixes of a
generated image reach the buffer and the refine round that starts from it; reflect answers earn w_i·m on
top of Δ, which moves their advantages; with weight 0, or a judge that names no fix, the paper's rewards.

Scripted fakes of the worker/judge protocols (pure logic); expected values are hand-computed.
"""

from dataclasses import replace

import pytest

from cluster.r3_step import R3StepSettings, run_tree_step
from rollout.buffer import BufferEntry, RolloutBuffer
from rollout.datasets import PromptRecord
from rollout.judge_fixes import FIXES_KEY, JudgeFix
from rollout.stages import StageSettings
from tests.rollout.fakes import PLAIN, FakeGenerator, FakeJudge, FakeReasoner, fake_image, is_reflect

FIX = JudgeFix("change", "circle", "blue", "change the red circle to blue")
REFLECTS = [
    "<think>ok</think>no further edit needed",  # stop: Δ 0, m 0
    "<think>t</think>change the circle to blue s=0.5",  # Δ 0, m = (1 + 1 + 1) / 3
    "<think>t</think>add a blue square s=0.5",  # Δ 0, m = (0 + 0 + 1) / 3
    "<think>t</think>remove the circle s=1",  # Δ 0.5, m = (0 + 1 + 0) / 3
]


class FixingJudge(FakeJudge):
    """FakeJudge whose wrong images carry FIX, as a judge that names fixes does."""

    def score(self, items):
        return [r if r.correct else replace(r, details={**r.details, FIXES_KEY: [FIX.to_json()]})
                for r in super().score(items)]


def _roles(judge_cls=FixingJudge):
    gen = FakeGenerator()
    script = lambda req, i, call: REFLECTS[i] if is_reflect(req) else "<think>t</think>s=0.5"  # noqa: E731
    return FakeReasoner(script), gen, judge_cls(gen)


def _refine(weight: float, fixes: list[dict]):
    buf = RolloutBuffer(seed=0)
    buf.add(BufferEntry("cats", fake_image(9), 0.5, False, {"tag": "a"}, fixes=fixes))
    settings = R3StepSettings(stage=StageSettings(group_size=4, templates=PLAIN), refine_groups=1,
                              instruction_weight=weight)
    res = run_tree_step(1, [], *_roles(), buf, settings)
    assert res.stages == ["refine"]
    return [t.rounds[1] for t in res.trajectories], res.metrics


def test_generated_images_enter_the_buffer_with_their_fixes_and_the_refine_round_shows_them():
    buf = RolloutBuffer(seed=0)
    settings = R3StepSettings(stage=StageSettings(group_size=4, templates=PLAIN), refine_groups=1,
                              tree_schedule="both")
    res = run_tree_step(0, [PromptRecord("cats", {"tag": "a"}, "a")], *_roles(), buf, settings)
    assert all(e.fixes == [FIX.to_json()] for e in buf._imperfect) and len(buf._imperfect) == 4
    refine = [t for t in res.trajectories if len(t.rounds) == 2]
    assert refine and all(t.rounds[0].judge_details[FIXES_KEY] == [FIX.to_json()] for t in refine)


def test_matching_instructions_earn_the_weighted_reward_and_move_the_advantages():
    paper, paper_metrics = _refine(0.0, [FIX.to_json()])
    shaped, metrics = _refine(0.6, [FIX.to_json()])
    assert [r.text for r in shaped] == [r.text for r in paper]  # same seeds, same answers
    assert [r.text_reward for r in paper] == pytest.approx([1.0, 1.0, 1.0, 1.5])
    assert [r.text_advantage for r in paper] == pytest.approx([-0.125, -0.125, -0.125, 0.375])
    assert [r.text_reward for r in shaped] == pytest.approx([1.0, 1.6, 1.2, 1.7])
    assert [r.text_advantage for r in shaped] == pytest.approx([-0.375, 0.225, -0.175, 0.325])
    assert [r.image_advantage for r in shaped] == pytest.approx([r.image_advantage for r in paper])
    want = {"refine/instruction_judged": 4.0, "refine/instruction_score_mean": 5 / 12,
            "refine/instruction_kind_match": 0.25, "refine/instruction_object_match": 0.5,
            "refine/instruction_attribute_match": 0.5}
    assert {k: metrics[k] for k in want} == pytest.approx(want)
    assert {k: paper_metrics[k] for k in want} == pytest.approx(want)  # logged at weight 0 too


def test_an_image_without_fixes_keeps_the_papers_rewards():
    paper, _ = _refine(0.0, [])
    shaped, metrics = _refine(5.0, [])
    assert [r.text_reward for r in shaped] == pytest.approx([r.text_reward for r in paper])
    assert metrics["refine/instruction_judged"] == 0.0


def test_config_key_reaches_the_step_and_chain_mode_is_refused():
    from cluster.config import ConfigError, load_config
    from cluster.settings import step_settings

    assert step_settings(load_config(None, [])).instruction_weight == 0.0  # the paper by default
    assert step_settings(load_config(None, ["r3.instruction_reward_weight=0.5"])).instruction_weight == 0.5
    with pytest.raises(ConfigError, match="instruction_reward_weight=0.5 acts on tree mode's refine stage"):
        load_config(None, ["r3.mode=chain", "r3.instruction_reward_weight=0.5"])
    with pytest.raises(ConfigError, match="instruction_reward_weight"):
        load_config(None, ["r3.instruction_reward_weight=-1"])
