"""Config -> settings of the pure R3 code, and the prompt sets a run uses."""

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


def test_unknown_template_key_is_refused():
    cfg = load_config("configs/cpu_tiny.yaml", ["r3.templates.plann=x"])
    with pytest.raises(ValueError, match="plann"):
        build_templates(cfg)


def test_prompt_sets_drop_test_overlap_and_spread_eval_over_tags():
    cfg = load_config("configs/cpu_tiny.yaml", ["data.eval_limit=12"])
    train, test = load_prompt_sets(cfg)
    assert len(train) == 12359 - 370  # R3's GenEval train set (12,359 records) holds 370 of the 553 test prompts
    assert not {t.prompt for t in test} & {t.prompt for t in train}
    assert Counter(t.category for t in test) == {c: 2 for c in
        ["single_object", "two_object", "counting", "colors", "position", "color_attr"]}


def test_eval_per_category_repeats_small_tags_of_the_held_out_split():
    base = ["data.eval_limit=null", "data.eval_per_category=null"]
    _, distinct = load_prompt_sets(load_config("configs/shapes_cpu.yaml", base))
    _, test = load_prompt_sets(load_config("configs/shapes_cpu.yaml", [*base, "data.eval_per_category=30"]))
    counts = Counter(t.category for t in test)
    assert len(counts) == 9 and set(counts.values()) == {30}
    sizes = Counter(t.category for t in distinct)
    assert min(sizes.values()) < 30 < max(sizes.values())  # some tags repeated, some cut
    for tag, n in sizes.items():  # each tag's distinct prompts, all of them when it has at most 30
        assert len({t.prompt for t in test if t.category == tag}) == min(n, 30)


def test_shapes_split_does_not_follow_the_training_seed():
    """The warm start learns from the fixed partition's train side; train.seed=1 must not evaluate
    on another partition's test side (it would hold prompts the warm start was trained on)."""
    _, test0 = load_prompt_sets(load_config("configs/shapes_cpu.yaml", ["data.eval_per_category=null"]))
    train1, test1 = load_prompt_sets(load_config("configs/shapes_cpu.yaml", ["train.seed=1", "data.eval_per_category=null"]))
    assert [t.prompt for t in test1] == [t.prompt for t in test0]
    assert not {t.prompt for t in test1} & {t.prompt for t in train1}


def test_balanced_shapes_train_prompts_cover_every_tag_equally():
    cfg = load_config("configs/shapes_cpu.yaml", ["data.balance_categories=true"])
    raw, _ = load_prompt_sets(load_config("configs/shapes_cpu.yaml", ["data.balance_categories=false"]))
    train, test = load_prompt_sets(cfg)
    counts = Counter(t.category for t in train)
    assert len(counts) == 9 and len(set(counts.values())) == 1  # every tag equally often
    assert {t.prompt for t in train} == {t.prompt for t in raw}  # nothing dropped or invented
    assert not {t.prompt for t in test} & {t.prompt for t in train}
