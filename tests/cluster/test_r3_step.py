"""One R3 step as pure composition: stages + shaping + group advantages + batches.

Design: docs/design.md#a-training-step.

Scripted fakes of the worker/judge protocols (pure logic); expected values are hand-computed.
"""

import math

import numpy as np
import pytest

from cluster.r3_step import R3StepSettings, run_chain_step, run_r3_step, run_tree_step, tree_stages
from rollout.buffer import BufferEntry, RolloutBuffer
from rollout.datasets import PromptRecord
from rollout.stages import StageSettings
from rollout.trajectory import read_trajectories, write_trajectories
from tests.rollout.fakes import (
    PLAIN,
    FakeGenerator,
    FakeJudge,
    FakeReasoner,
    fake_image,
    is_reflect,
    user_text,
)

STOP = "<think>ok</think>no further edit needed"
PROMPTS = [PromptRecord("cats", {"tag": "a"}, "a"), PromptRecord("dogs", {"tag": "b"}, "b")]
PLANS = {
    "cats": ["<think>t</think>s=1", "<think>t</think>s=0.5", "bad", "<think>t</think>s=0"],
    "dogs": ["<think>t</think>s=0.5"] * 4,
}
REFLECTS = [STOP, "<think>t</think>fix s=0.5", "<think>t</think>fix s=1", "garbage"]


def _script(req, i, call):
    return REFLECTS[i] if is_reflect(req) else PLANS[user_text(req)][i]


def _roles(script=_script):
    gen = FakeGenerator()
    return FakeReasoner(script), gen, FakeJudge(gen)


def _settings(**kw):
    return R3StepSettings(stage=StageSettings(group_size=4, templates=PLAIN), refine_groups=1, **kw)


def _finite(metrics):
    return all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_generate_step_rewards_advantages_batches_and_buffer():
    buf = RolloutBuffer(seed=0)
    res = run_tree_step(0, PROMPTS, *_roles(), buf, _settings())
    assert res.stages == ["generate"]
    rounds = [t.rounds[0] for t in res.trajectories]
    assert [r.text_reward for r in rounds] == pytest.approx([2.0, 1.5, 0.0, 1.0] + [1.5] * 4)
    assert [r.text_advantage for r in rounds] == pytest.approx([0.875, 0.375, -1.125, -0.125] + [0.0] * 4)
    assert [r.image_reward for r in rounds] == pytest.approx([1.0, 0.5, 0.0, 0.0] + [0.5] * 4)
    assert [r.image_advantage for r in rounds] == pytest.approx([0.625, 0.125, -0.375, -0.375] + [0.0] * 4)
    assert len(res.text_batch) == 8 and len(res.image_batch) == 8
    assert res.text_batch[0].images == () and res.text_batch[0].sample is rounds[0].text
    assert res.image_batch[1].sample is rounds[1].image and res.image_batch[1].advantage == pytest.approx(
        0.125
    )
    assert (len(buf), buf.num_perfect) == (8, 1)
    m = res.metrics
    assert m["generate/score_mean"] == pytest.approx(0.4375) and m["format_rate"] == pytest.approx(7 / 8)
    assert (m["text_zero_var_groups"], m["image_zero_var_groups"], m["stop_rate"]) == (1.0, 1.0, 0.0)
    assert m["text_adv/abs_max"] == pytest.approx(1.125) and _finite(m)


def test_drop_zero_variance_groups():
    res = run_tree_step(0, PROMPTS, *_roles(), RolloutBuffer(), _settings(drop_zero_variance=True))
    assert len(res.text_batch) == 4 and len(res.image_batch) == 4
    assert {i.group for i in res.text_batch} == {0}


def test_refine_step_delta_rewards_and_stopped_attempts():
    buf = RolloutBuffer(seed=0)
    start = fake_image(9)
    buf.add(BufferEntry("cats", start, 1.0, True, {"tag": "a"}))
    res = run_tree_step(1, PROMPTS, *_roles(), buf, _settings())
    assert res.stages == ["refine"]
    rounds = [t.rounds[1] for t in res.trajectories]
    assert [r.stopped for r in rounds] == [True, False, False, False]
    assert [r.text_reward for r in rounds] == pytest.approx([2.0, 0.5, 1.0, 0.0])
    assert [r.text_advantage for r in rounds] == pytest.approx([1.125, -0.375, 0.125, -0.875])
    assert [r.image_reward for r in rounds] == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert [r.image_advantage for r in rounds] == pytest.approx([0.0, -0.125, 0.375, -0.625])
    assert [i.advantage for i in res.image_batch] == pytest.approx([-0.125, 0.375, -0.625])
    assert all(i.images[0] is start for i in res.text_batch) and len(res.text_batch) == 4
    m = res.metrics
    assert m["refine/stop_rate"] == 0.25 and m["stop_rate"] == 0.25
    assert m["refine/delta_mean"] == pytest.approx(-0.125) and _finite(m)
    assert len(buf) == 1  # refined images stay out unless buffer_refined


def test_wrong_stop_penalty_charges_only_stops_on_imperfect_images():
    def refine_rewards(penalty: float) -> list[float]:
        buf = RolloutBuffer(seed=0)
        buf.add(BufferEntry("cats", fake_image(9), 0.5, False, {"tag": "a"}))
        res = run_tree_step(1, PROMPTS, *_roles(), buf, _settings(wrong_stop_penalty=penalty))
        assert [t.rounds[1].stopped for t in res.trajectories] == [True, False, False, False]
        return [t.rounds[1].text_reward for t in res.trajectories]

    free, charged = refine_rewards(0.0), refine_rewards(0.5)
    assert free[0] == pytest.approx(1.0) and charged[0] == pytest.approx(0.5)  # w_f + Δ, Δ = 0 vs -0.5
    assert charged[1:] == pytest.approx(free[1:])


def test_step_trajectories_round_trip_through_parquet(tmp_path):
    buf = RolloutBuffer()
    res = run_tree_step(0, PROMPTS, *_roles(), buf, _settings(tree_schedule="both"))
    write_trajectories(tmp_path / "t.parquet", res.trajectories)
    back = read_trajectories(tmp_path / "t.parquet")
    assert [len(t.rounds) for t in back] == [len(t.rounds) for t in res.trajectories]
    assert [r.image_advantage for t in back for r in t.rounds] == pytest.approx(
        [r.image_advantage for t in res.trajectories for r in t.rounds]
    )


def test_schedules():
    buf = RolloutBuffer()
    s = _settings()
    assert tree_stages(0, s, buf) == ["generate"]
    assert tree_stages(1, s, buf) == ["generate"]  # buffer empty: refine impossible
    buf.add(BufferEntry("cats", fake_image(), 0.5))
    assert tree_stages(1, s, buf) == ["refine"] and tree_stages(2, s, buf) == ["generate"]
    both = run_tree_step(0, PROMPTS, *_roles(), RolloutBuffer(), _settings(tree_schedule="both"))
    assert both.stages == ["generate", "refine"]
    assert sorted({t.group_id for t in both.trajectories}) == [0, 1, 2]
    assert "generate/score_mean" in both.metrics and "refine/delta_mean" in both.metrics
    with pytest.raises(ValueError, match="no prompts"):
        run_tree_step(0, [], *_roles(), RolloutBuffer(), s)


def test_group_std_option():
    res = run_tree_step(0, PROMPTS, *_roles(), RolloutBuffer(), _settings(adv_std="group"))
    adv = [r.text_advantage for t in res.trajectories[:4] for r in t.rounds]
    raw = np.array([2.0, 1.5, 0.0, 1.0])
    assert adv == pytest.approx(list((raw - raw.mean()) / (raw.std() + 1e-6)), rel=1e-5)


def test_steps_are_deterministic_per_seed_and_step():
    def seeds(step, seed):
        reasoner, gen, judge = _roles()
        run_tree_step(step, PROMPTS, reasoner, gen, judge, RolloutBuffer(), _settings(seed=seed))
        return [(r.seed, r.noise_seed) for r in gen.made]

    assert seeds(0, 1) == seeds(0, 1)
    assert seeds(0, 1) != seeds(2, 1) and seeds(0, 1) != seeds(0, 2)


def _chain_script():
    answers = {1: iter(["<think>t</think>fix s=1", STOP]), 2: iter([STOP])}

    def script(req, i, call):
        return ["<think>t</think>s=0.5", "<think>t</think>s=1"][i] if call == 0 else next(answers[call])

    return script


def _chain_settings(**kw):
    return R3StepSettings(
        mode="chain", stage=StageSettings(group_size=2, templates=PLAIN), max_rounds=3, **kw
    )


def test_chain_step_per_round_rewards_and_cell_advantages():
    res = run_chain_step(0, PROMPTS[:1], *_roles(_chain_script()), _chain_settings())
    m0, m1 = res.trajectories
    assert [r.score for r in m0.rounds] == [0.5, 1.0, 1.0] and [r.stopped for r in m1.rounds] == [False, True]
    assert [r.text_reward for r in m0.rounds] == pytest.approx([1.5, 1.5, 2.0])
    assert [r.text_reward for r in m1.rounds] == pytest.approx([2.0, 2.0])
    assert [r.text_advantage for r in m0.rounds] == pytest.approx([-0.25, -0.25, 0.0])
    assert [r.text_advantage for r in m1.rounds] == pytest.approx([0.25, 0.25])
    assert [r.image_advantage for r in m0.rounds] == pytest.approx([-0.25, 0.0, 0.0])
    assert [r.image_advantage for r in m1.rounds] == pytest.approx([0.25, 0.0])
    assert len(res.text_batch) == 5 and len(res.image_batch) == 3
    shown = [i.images for i in res.text_batch if i.sample is m0.rounds[2].text][0]
    assert shown[0] is m0.rounds[1].image.image
    m = res.metrics
    assert (m["text_zero_var_groups"], m["image_zero_var_groups"]) == (1.0, 2.0)
    assert m["chain/rounds_mean"] == 2.5 and m["stop_rate"] == pytest.approx(2 / 3) and _finite(m)


def test_chain_step_discounted_credit():
    res = run_r3_step(
        0, PROMPTS[:1], *_roles(_chain_script()), RolloutBuffer(), _chain_settings(discount=0.5)
    )
    m0, m1 = res.trajectories
    # credits m0 [2.75, 2.5, 2.0], m1 [3.0, 2.0] -> per-round cells
    assert [r.text_advantage for r in m0.rounds] == pytest.approx([-0.125, 0.25, 0.0])
    assert [r.text_advantage for r in m1.rounds] == pytest.approx([0.125, -0.25])
    assert [r.text_reward for r in m0.rounds] == pytest.approx([1.5, 1.5, 2.0])


def test_settings_validation():
    for kw in (dict(mode="ring"), dict(adv_std="batch"), dict(tree_schedule="random"), dict(refine_groups=0)):
        with pytest.raises(ValueError):
            R3StepSettings(**kw)


class _NonFiniteJudge:
    """FakeJudge, but the image drawn from "s=0.5" of the cats prompt scores `value` (NaN or ±inf)."""

    def __init__(self, judge, value):
        self.judge, self.value = judge, value

    def score(self, items):
        from dataclasses import replace

        out = self.judge.score(items)
        return [replace(r, score=self.value) if r.details["made_from"] == "s=0.5" and it.prompt == "cats" else r
                for it, r in zip(items, out, strict=True)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_judge_score_is_an_error_result_counted_and_never_a_reward(value):
    reasoner, gen, judge = _roles()
    res = run_tree_step(0, PROMPTS, reasoner, gen, _NonFiniteJudge(judge, value), RolloutBuffer(seed=0), _settings())
    rounds = [t.rounds[0] for t in res.trajectories]
    assert [r.score for r in rounds[:4]] == [1.0, 0.0, 0.0, 0.0] and not rounds[1].correct
    assert rounds[1].judge_details["error"] == f"judge returned a non-finite score ({value!r})"
    # cats: text rewards r·f + f = [2, 1, 0, 1] (mean 1), image rewards [1, 0, 0, 0] (mean 0.25)
    assert [r.text_advantage for r in rounds[:4]] == pytest.approx([1.0, 0.0, -1.0, 0.0])
    assert [r.image_advantage for r in rounds[:4]] == pytest.approx([0.75, -0.25, -0.25, -0.25])
    m = res.metrics
    assert (m["generate/judge_errors"], m["judge/errors"]) == (1.0, 1.0) and _finite(m)


def test_judge_errors_of_both_stages_add_up():
    buf = RolloutBuffer(seed=0)
    reasoner, gen, judge = _roles()
    res = run_tree_step(0, PROMPTS, reasoner, gen, _NonFiniteJudge(judge, math.nan), buf,
                        _settings(tree_schedule="both"))
    m = res.metrics
    assert (m["generate/judge_errors"], m["refine/judge_errors"], m["judge/errors"]) == (1.0, 0.0, 1.0)


def test_non_finite_advantages_are_reported_not_raised():
    """A huge format weight overflows the group mean: the step still returns, counts the non-finite
    advantages and hands them to the learners, which skip that update."""
    res = run_tree_step(0, PROMPTS, *_roles(), RolloutBuffer(seed=0), _settings(format_weight=1e308))
    adv = [it.advantage for it in res.text_batch]
    bad = sum(not math.isfinite(a) for a in adv)
    assert bad > 0 and res.metrics["text_adv/nonfinite"] == float(bad)
    assert res.metrics["image_adv/nonfinite"] == 0.0
    assert not math.isfinite(res.metrics["text_adv/mean"])
