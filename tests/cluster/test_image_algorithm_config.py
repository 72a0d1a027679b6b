"""Config of the generator's objective: DiffusionNFT, updates per batch, EMA (refusals and what the
workers and learners are given)."""

import pytest

from cluster.config import ConfigError, load_config


def test_defaults_keep_flow_grpo_one_update_no_ema():
    f = load_config("configs/cpu_tiny.yaml", []).flow_grpo
    assert (f.algorithm, f.updates_per_batch, f.ema_decay) == ("flow_grpo", 1, 0.0)


def test_nft_rollouts_use_the_ode_and_the_learner_gets_the_fields():
    from cluster.roles import ModelPaths, diffusion_learner_kwargs
    from cluster.settings import step_settings

    cfg = load_config("configs/cpu_tiny.yaml", ["flow_grpo.algorithm=nft", "flow_grpo.share_group_noise=false",
                                                "flow_grpo.updates_per_batch=3",
                                                "flow_grpo.ema_decay=0.9", "train.async_one_step_off=true"])
    stage = step_settings(cfg).stage
    assert stage.generate_sampler.stochastic == stage.edit_sampler.stochastic == "none"
    kw = diffusion_learner_kwargs(cfg, ModelPaths("r", "g", None))
    assert (kw["algorithm"], kw["updates_per_batch"], kw["ema_decay"], kw["keep_previous_weights"]) == (
        "nft", 3, 0.9, True)
    plain = load_config("configs/cpu_tiny.yaml", [])
    assert step_settings(plain).stage.generate_sampler.stochastic == "one"


@pytest.mark.parametrize("overrides, match", [
    (["flow_grpo.ema_decay=0.9", "flow_grpo.zero_stage=3"], "zero_stage 3"),
    (["flow_grpo.algorithm=nft", "flow_grpo.share_group_noise=false", "flow_grpo.updates_per_batch=2",
      "flow_grpo.zero_stage=3"], "zero_stage 3"),
    (["flow_grpo.algorithm=nft"], "share_group_noise=false"),
    (["flow_grpo.algorithm=nft", "flow_grpo.share_group_noise=false", "train.async_one_step_off=true",
      "flow_grpo.zero_stage=3"], "async_one_step_off"),
    (["flow_grpo.ema_decay=1"], "ema_decay"),
    (["flow_grpo.updates_per_batch=0"], "updates_per_batch"),
    (["flow_grpo.algorithm=dpo"], "algorithm"),
    (["flow_grpo.nft_beta=0"], "nft_beta"),
])
def test_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/cpu_tiny.yaml", overrides)
