"""The ShapesWorld config through the plugin: its prompt sources as a run loads them (a fixed
partition, tag-balanced training and evaluation)."""

from collections import Counter

from cluster.config import load_config
from cluster.settings import load_prompt_sets
from examples.shapesworld.run import DEFAULT_CONFIG as CONFIG


def test_eval_per_category_repeats_small_tags_of_the_held_out_split():
    base = ["data.eval_limit=null", "data.eval_per_category=null"]
    _, distinct = load_prompt_sets(load_config(CONFIG, base))
    _, test = load_prompt_sets(load_config(CONFIG, [*base, "data.eval_per_category=30"]))
    counts = Counter(t.category for t in test)
    assert len(counts) == 9 and set(counts.values()) == {30}
    sizes = Counter(t.category for t in distinct)
    assert min(sizes.values()) < 30 < max(sizes.values())  # some tags repeated, some cut
    for tag, n in sizes.items():  # each tag's distinct prompts, all of them when it has at most 30
        assert len({t.prompt for t in test if t.category == tag}) == min(n, 30)


def test_shapes_split_does_not_follow_the_training_seed():
    """The warm start learns from the fixed partition's train side; train.seed=1 must not evaluate
    on another partition's test side (it would hold prompts the warm start was trained on)."""
    _, test0 = load_prompt_sets(load_config(CONFIG, ["data.eval_per_category=null"]))
    train1, test1 = load_prompt_sets(load_config(CONFIG, ["train.seed=1", "data.eval_per_category=null"]))
    assert [t.prompt for t in test1] == [t.prompt for t in test0]
    assert not {t.prompt for t in test1} & {t.prompt for t in train1}


def test_balanced_shapes_train_prompts_cover_every_tag_equally():
    cfg = load_config(CONFIG, ["data.balance_categories=true"])
    raw, _ = load_prompt_sets(load_config(CONFIG, ["data.balance_categories=false"]))
    train, test = load_prompt_sets(cfg)
    counts = Counter(t.category for t in train)
    assert len(counts) == 9 and len(set(counts.values())) == 1  # every tag equally often
    assert {t.prompt for t in train} == {t.prompt for t in raw}  # nothing dropped or invented
    assert not {t.prompt for t in test} & {t.prompt for t in train}


def test_the_demo_config_is_the_experiment_made_short():
    """`make demo` runs the experiment's settings on the shipped warm start (paths checked), with
    fewer prompts per step, fewer prompts drawn in all and a smaller tag-balanced evaluation."""
    demo = load_config(CONFIG.parent / "demo.yaml", check_paths=True)
    full = load_config(CONFIG)
    for section in ("models", "grpo", "flow_grpo", "judge"):
        assert getattr(demo, section) == getattr(full, section), section
    assert demo.r3.model_copy(update={"prompts_per_step": full.r3.prompts_per_step}) == full.r3
    assert demo.r3.prompts_per_step < full.r3.prompts_per_step
    assert demo.r3.prompts_per_step * demo.train.steps < full.r3.prompts_per_step * full.train.steps
    _, test = load_prompt_sets(demo)
    assert set(Counter(t.category for t in test).values()) == {demo.data.eval_per_category}
