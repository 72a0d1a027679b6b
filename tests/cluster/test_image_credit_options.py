"""The image side's own advantage std, zero-variance policy and group noise, through a real step
against the scripted fakes (the text side keeps the r3.* settings).

Design: docs/design.md#advantages, docs/design.md#stochastic-steps.
"""

import random

import numpy as np
import pytest

from cluster.config import load_config
from cluster.r3_step import R3StepSettings, run_tree_step
from cluster.settings import step_settings
from rollout.buffer import RolloutBuffer
from rollout.datasets import PromptRecord
from rollout.stages import StageSettings, run_generate_stage
from tests.rollout.fakes import PLAIN, FakeGenerator, FakeJudge, FakeReasoner, user_text

PROMPTS = [PromptRecord("cats", {"tag": "a"}, "a"), PromptRecord("dogs", {"tag": "b"}, "b")]
# image rewards (scores): cats [1, .5, 0, 0], dogs [.5] * 4 (flat); text rewards cats [2, 1.5, 0, 1], dogs flat
PLANS = {
    "cats": ["<think>t</think>s=1", "<think>t</think>s=0.5", "bad", "<think>t</think>s=0"],
    "dogs": ["<think>t</think>s=0.5"] * 4,
}


def _roles():
    gen = FakeGenerator()
    return FakeReasoner(lambda req, i, call: PLANS[user_text(req)][i]), gen, FakeJudge(gen)


def _step(**kw):
    settings = R3StepSettings(stage=StageSettings(group_size=4, templates=PLAIN), refine_groups=1, **kw)
    return run_tree_step(0, PROMPTS, *_roles(), RolloutBuffer(seed=0), settings)


def test_image_side_drops_flat_groups_while_text_keeps_them():
    res = _step(image_drop_zero_variance=True)
    assert len(res.text_batch) == 8 and len(res.image_batch) == 4
    assert {i.group for i in res.image_batch} == {0}
    kept = _step(drop_zero_variance=True, image_drop_zero_variance=False)  # and the other way round
    assert len(kept.text_batch) == 4 and len(kept.image_batch) == 8
    inherited = _step(drop_zero_variance=True)  # None: as the text side
    assert len(inherited.text_batch) == 4 and len(inherited.image_batch) == 4


def test_image_side_std_per_group_or_over_the_batch():
    raw = np.array([1.0, 0.5, 0.0, 0.0])
    centred = raw - raw.mean()  # [.625, .125, −.375, −.375]
    group = _step(image_adv_std="group")
    image_adv = [r.image_advantage for t in group.trajectories[:4] for r in t.rounds]
    assert image_adv == pytest.approx(list(centred / (raw.std() + 1e-6)), rel=1e-5)
    text_adv = [r.text_advantage for t in group.trajectories[:4] for r in t.rounds]
    assert text_adv == pytest.approx([0.875, 0.375, -1.125, -0.125])  # r3.adv_std none: unnormalised
    batch = _step(image_adv_std="global")  # the std of all 8 image rewards of the stage
    all_rewards = np.concatenate([raw, [0.5] * 4])
    image_adv = [r.image_advantage for t in batch.trajectories[:4] for r in t.rounds]
    assert image_adv == pytest.approx(list(centred / (all_rewards.std() + 1e-6)), rel=1e-5)
    assert all_rewards.std() == pytest.approx(0.29974, abs=1e-5)  # sqrt(.71875 / 8)


def test_settings_reject_an_unknown_image_std():
    with pytest.raises(ValueError, match="image_adv_std='batch'"):
        R3StepSettings(image_adv_std="batch")


def test_generate_groups_share_initial_noise_only_when_asked():
    def noise_seeds(share):
        reasoner, gen, judge = _roles()
        settings = StageSettings(group_size=4, templates=PLAIN, share_group_noise=share)
        run_generate_stage(PROMPTS, reasoner, gen, judge, settings, random.Random(0))
        ((requests, _),) = gen.calls
        return [r.noise_seed for r in requests], [r.seed for r in requests]

    shared, shared_seeds = noise_seeds(True)
    assert len(set(shared[:4])) == 1 and len(set(shared[4:])) == 1 and shared[0] != shared[4]
    own, own_seeds = noise_seeds(False)
    assert len(set(own)) == 8 and len(set(own_seeds)) == 8
    assert noise_seeds(False) == (own, own_seeds)  # still a function of the RNG


def test_config_fields_reach_the_step_settings():
    default = step_settings(load_config("configs/cpu_tiny.yaml"))
    assert default.stage.share_group_noise is True and default.stage.generate_sampler.sde == "flow_grpo"
    assert (default.image_std, default.image_zero_variance) == (default.adv_std, "keep")
    s = step_settings(load_config("configs/cpu_tiny.yaml", [
        "flow_grpo.share_group_noise=false", "flow_grpo.sde=cps", "flow_grpo.noise_level=0.5",
        "flow_grpo.adv_std=global", "flow_grpo.zero_variance_groups=drop", "r3.adv_std=group"]))
    assert s.stage.share_group_noise is False
    assert (s.stage.generate_sampler.sde, s.stage.edit_sampler.sde) == ("cps", "cps")
    assert (s.adv_std, s.image_std, s.drop_zero_variance, s.image_zero_variance) == ("group", "global", False, "drop")


def test_cps_config_limits_are_refused_before_engines_start():
    from cluster.config import ConfigError

    for overrides, match in (
        (["flow_grpo.sde=cps", "flow_grpo.noise_level=1.5"], "noise_level=1.5 is above 1"),
        (["flow_grpo.sde=cps", "flow_grpo.noise_level=0.7", "flow_grpo.edit_noise_level=1.2"], "edit_noise_level"),
        (["flow_grpo.sde=cps", "flow_grpo.noise_level=0.7", "flow_grpo.num_steps=4", "flow_grpo.window=[0,4]"],
         "includes the last step"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config("configs/cpu_tiny.yaml", overrides)
    cfg = load_config("configs/cpu_tiny.yaml", ["flow_grpo.noise_level=1.5"])  # flow_grpo: any level >= 0
    assert cfg.flow_grpo.sde == "flow_grpo"
