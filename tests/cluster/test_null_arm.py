"""`train.null_advantages`: the learner batches of a step get their advantages shuffled, nothing else changes.

Scripted fakes of the worker/judge protocols (pure logic), as in test_r3_step.py.
"""

import pytest

from cluster.r3_step import R3StepSettings, run_chain_step, run_tree_step
from learners.null_advantages import null_seed, shuffle_advantages
from rollout.buffer import RolloutBuffer
from rollout.stages import StageSettings
from tests.cluster.test_r3_step import PROMPTS, _roles
from tests.rollout.fakes import PLAIN


def _settings(**kw):
    return R3StepSettings(stage=StageSettings(group_size=4, templates=PLAIN), refine_groups=1, **kw)


def _steps(null: bool, schedule: str = "both"):
    buf = RolloutBuffer(seed=0)
    s = _settings(null_advantages=null, tree_schedule=schedule, seed=7)
    return [run_tree_step(i, PROMPTS, *_roles(), buf, s) for i in range(2)]


def test_null_step_shuffles_each_batch_and_keeps_everything_else():
    real, null = _steps(False), _steps(True)
    for step, (r, n) in enumerate(zip(real, null, strict=True)):
        for side in ("text", "image"):
            rb, nb = getattr(r, f"{side}_batch"), getattr(n, f"{side}_batch")
            assert len(nb) == len(rb) and [i.reward for i in nb] == [i.reward for i in rb]
            real_adv = [i.advantage for i in rb]
            expected = shuffle_advantages(_t(real_adv), null_seed(7, step, side)).tolist()
            assert [i.advantage for i in nb] == pytest.approx(expected)
            assert sorted(i.advantage for i in nb) == pytest.approx(sorted(real_adv))
        # the trajectories keep the real advantages: the record shows the signal the learners were denied
        assert [rd.text_advantage for t in n.trajectories for rd in t.rounds] == pytest.approx(
            [rd.text_advantage for t in r.trajectories for rd in t.rounds]
        )
        assert r.metrics["null_advantages"] == 0.0 and n.metrics["null_advantages"] == 1.0
        assert n.metrics["text_adv/std"] == pytest.approx(r.metrics["text_adv/std"])
    # step 0's generate batch: 8 text items with advantages [0.875, 0.375, -1.125, -0.125, 0, 0, 0, 0]
    assert [i.advantage for i in null[0].text_batch] != [i.advantage for i in real[0].text_batch]


def test_null_chain_step_shuffles_too():
    s_real, s_null = (R3StepSettings(mode="chain", stage=StageSettings(group_size=4, templates=PLAIN),
                                     max_rounds=2, null_advantages=v) for v in (False, True))
    r, n = (run_chain_step(0, PROMPTS, *_roles(), s) for s in (s_real, s_null))
    real_adv = [i.advantage for i in r.text_batch]
    assert [i.advantage for i in n.text_batch] == pytest.approx(
        shuffle_advantages(_t(real_adv), null_seed(0, 0, "text")).tolist()
    )
    assert n.metrics["null_advantages"] == 1.0


def test_config_field_reaches_the_step_settings():
    from cluster.config import load_config
    from cluster.settings import step_settings

    assert step_settings(load_config(None, ["train.null_advantages=true"])).null_advantages is True
    assert step_settings(load_config(None, [])).null_advantages is False


def _t(values):
    import torch

    return torch.tensor(values, dtype=torch.float64)
