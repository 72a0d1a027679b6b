"""Config -> settings of the pure R3 code, and the prompt sets a run uses."""

import json
from collections import Counter

import pytest

from cluster.config import load_config
from cluster.settings import build_templates, eval_settings, load_prompt_sets, step_settings


def test_step_and_eval_settings_follow_the_config():
    cfg = load_config("configs/cpu_tiny.yaml", ["flow_grpo.num_steps=6", "flow_grpo.window=[1,3]", "r3.group_size=3",
                                                  "r3.stop_phrase=done editing", "r3.stop_match=done",
                                                  "flow_grpo.train_cfg_scale=2.5", "r3.wrong_stop_penalty=0.25"])
    s = step_settings(cfg)
    assert s.wrong_stop_penalty == 0.25 and step_settings(load_config("configs/cpu_tiny.yaml")).wrong_stop_penalty == 0
    assert s.stage.group_size == 3 and s.stage.generate_sampler.num_steps == 6
    assert (s.stage.generate_sampler.window_lo, s.stage.generate_sampler.window_hi) == (1, 3)
    assert s.stage.edit_sampler.noise_level == cfg.flow_grpo.edit_noise_level
    assert s.stage.templates.stop_phrase == "done editing" and s.stage.templates.stop_match == "done"
    e = eval_settings(cfg)
    assert e.stage_settings().generate_sampler.stochastic == "none" and e.temperature == cfg.grpo.eval_temperature
    # the workers sample with the CFG scale the learner rescores with (else the first ratio is not 1)
    samplers = (s.stage.generate_sampler, s.stage.edit_sampler, e.generate_sampler, e.edit_sampler)
    assert [x.cfg_scale for x in samplers] == [2.5] * 4


def test_advantage_and_buffer_settings_follow_the_config():
    default = step_settings(load_config("configs/cpu_tiny.yaml"))
    assert (default.adv_eps, default.drop_zero_variance, default.buffer_refined) == (1e-6, False, False)
    s = step_settings(load_config("configs/cpu_tiny.yaml", [
        "r3.adv_std=group", "r3.adv_eps=0.01", "r3.drop_zero_variance=true", "r3.buffer_refined=true"]))
    assert (s.adv_std, s.adv_eps, s.drop_zero_variance, s.buffer_refined) == ("group", 0.01, True, True)


def test_unknown_template_key_is_refused():
    cfg = load_config("configs/cpu_tiny.yaml", ["r3.templates.plann=x"])
    with pytest.raises(ValueError, match="plann"):
        build_templates(cfg)


def test_prompt_sets_drop_test_overlap_and_spread_eval_over_tags(tmp_path):
    cfg = load_config("configs/cpu_tiny.yaml", ["data.eval_limit=12"])
    train, _ = load_prompt_sets(cfg)
    assert len(train) == 553  # the tiny config trains on the test prompts themselves (no overlap filter)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(t.metadata) + "\n" for t in train[:40]))
    cfg = load_config("configs/cpu_tiny.yaml", ["data.eval_limit=12", "data.exclude_test_overlap=true",
                                                 f"data.test={test_file}"])
    train, test = load_prompt_sets(cfg)
    assert len(train) == 553 - 40
    assert not {t.prompt for t in test} & {t.prompt for t in train}
    cfg = load_config("configs/cpu_tiny.yaml", ["data.eval_limit=12"])
    _, test = load_prompt_sets(cfg)
    assert Counter(t.category for t in test) == {c: 2 for c in
        ["single_object", "two_object", "counting", "colors", "position", "color_attr"]}
