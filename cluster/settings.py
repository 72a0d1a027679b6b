"""Config -> the settings objects of the pure R3 code, and the prompt sets of a run."""

from __future__ import annotations

import logging
from typing import Any

from cluster.config import R3Config

__all__ = ["step_settings", "eval_settings", "build_templates", "load_prompt_sets"]

log = logging.getLogger(__name__)


def step_settings(cfg: R3Config) -> Any:
    from cluster.r3_step import R3StepSettings
    from rollout.interfaces import SamplerSettings
    from rollout.stages import StageSettings

    f, g, m = cfg.flow_grpo, cfg.grpo, cfg.models.generator
    templates = build_templates(cfg)
    common = dict(guidance=f.guidance, cfg_scale=f.train_cfg_scale, height=m.height, width=m.width, sde=f.sde)
    stochastic = "none" if f.algorithm == "nft" else f.stochastic  # DiffusionNFT trains on ODE rollouts' final latents
    stage = StageSettings(
        group_size=cfg.r3.group_size, share_group_noise=f.share_group_noise,
        temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens,
        generate_sampler=SamplerSettings(num_steps=f.num_steps, noise_level=f.noise_level, stochastic=stochastic,
                                         window_lo=f.window[0], window_hi=f.window[1], **common),
        edit_sampler=SamplerSettings(num_steps=f.edit_num_steps, noise_level=f.edit_noise_level, stochastic=stochastic,
                                     window_lo=f.edit_window[0], window_hi=f.edit_window[1], **common),
        templates=templates,
    )
    return R3StepSettings(tree_schedule=cfg.r3.tree_schedule,
        mode=cfg.r3.mode, stage=stage, refine_groups=cfg.r3.prompts_per_step, max_rounds=cfg.r3.max_rounds,
        discount=cfg.r3.discount, format_weight=cfg.r3.format_weight, adv_std=cfg.r3.adv_std, seed=cfg.train.seed,
        wrong_stop_penalty=cfg.r3.wrong_stop_penalty, adv_eps=cfg.r3.adv_eps, image_adv_std=f.adv_std,
        image_drop_zero_variance=None if f.zero_variance_groups is None else f.zero_variance_groups == "drop",
        instruction_weight=cfg.r3.instruction_reward_weight,
        drop_zero_variance=cfg.r3.drop_zero_variance, buffer_refined=cfg.r3.buffer_refined,
        null_advantages=cfg.train.null_advantages,
    )


def eval_settings(cfg: R3Config) -> Any:
    from rollout.evaluation import EvalSettings
    from rollout.interfaces import SamplerSettings

    f, m = cfg.flow_grpo, cfg.models.generator
    common = dict(guidance=f.guidance, cfg_scale=f.train_cfg_scale, height=m.height, width=m.width, stochastic="none",
                  keep_training_data=False)
    return EvalSettings(
        max_rounds=cfg.train.eval_rounds, temperature=cfg.grpo.eval_temperature, max_tokens=cfg.grpo.max_tokens,
        generate_sampler=SamplerSettings(num_steps=f.eval_num_steps, noise_level=0.0, **common),
        edit_sampler=SamplerSettings(num_steps=f.edit_num_steps, noise_level=0.0, **common),
        templates=build_templates(cfg), seed=cfg.train.seed,
    )


def build_templates(cfg: R3Config) -> Any:
    """`rollout.templates.Templates` from `r3.stop_phrase`, `r3.stop_match` and `r3.templates` overrides."""
    from dataclasses import fields

    from rollout.templates import Templates

    known = {f.name for f in fields(Templates)}
    unknown = sorted(set(cfg.r3.templates) - known)
    if unknown:
        raise ValueError(f"r3.templates has unknown keys {unknown}; known: {sorted(known)}")
    return Templates(**{"stop_phrase": cfg.r3.stop_phrase, "stop_match": cfg.r3.stop_match, **cfg.r3.templates})


def load_prompt_sets(cfg: R3Config) -> tuple[list[Any], list[Any]]:
    from rollout.datasets import (
        balance_categories,
        cycle_categories,
        load_prompt_source,
        remove_overlap,
        spread_over_categories,
    )

    # Names that plugins register resolve here: load_config loaded cfg.plugins in this process.
    train, test = load_prompt_source(cfg.data.train), load_prompt_source(cfg.data.test)
    if cfg.data.exclude_test_overlap:
        before = len(train)
        train = remove_overlap(train, test)
        log.info("removed %d train prompts that appear in the test set", before - len(train))
    if cfg.data.limit:
        train = train[: cfg.data.limit]
    if cfg.data.balance_categories:
        train = balance_categories(train)
    if cfg.data.eval_limit:
        test = spread_over_categories(test, cfg.data.eval_limit)
    if cfg.data.eval_per_category:
        test = cycle_categories(test, cfg.data.eval_per_category)
    if not train:
        raise ValueError(f"data.train={cfg.data.train!r} leaves no prompts (after overlap removal and data.limit)")
    return train, test
