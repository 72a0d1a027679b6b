"""ShapesWorld's judge names the fix of a wrong image, with its kind, object and attribute, and the
reflect stage's instruction reward uses it: the fix itself scores 1, the renderer's own instruction
matches it in kind, and in a refine step with the real warm-start reasoner and generator the reward
is nonzero where the instruction names the fix and moves the text advantages off the paper's."""

import numpy as np
import pytest
import torch

from examples.shapesworld.fixes import fixing_edit, fixing_instruction
from examples.shapesworld.judge import Detection, ShapesJudge
from examples.shapesworld.render import render_correct, render_wrong
from examples.shapesworld.tasks import build_splits, metadata_for_prompt, sample_tasks
from reward.instruction_match import best_match, instruction_kind
from reward.registry import build_judge
from rollout.interfaces import JudgeItem
from rollout.judge_fixes import FIXES_KEY, fixes_in

PLUGIN = "examples.shapesworld"


def _det(shape, color, x, y, s=12):
    return Detection(shape, color, (x, y, x + s, y + s), s * s, 1.0)


@pytest.mark.parametrize(
    ("prompt", "dets", "fix"),
    [
        ("a photo of a red circle", [_det("circle", "blue", 0, 0)], ("change", "circle", "red")),
        ("a photo of a circle and a square", [_det("circle", "red", 0, 0), _det("star", "red", 30, 0)],
         ("change", "star", "square")),
        ("a photo of a star left of a square", [_det("square", "red", 30, 20)], ("add", "star", "red")),
        ("a photo of three stars", [_det("star", "red", 0, 0), _det("star", "red", 20, 0)], ("add", "star", "")),
        ("a photo of two stars", [_det("star", "red", x, 0) for x in (0, 20, 40)], ("remove", "star", "")),
        ("a photo of a star left of a square", [_det("star", "red", 30, 20), _det("square", "red", 0, 20)],
         ("move", "star", "left of the square")),
        ("a photo of a red circle", [_det("circle", "red", 0, 0)], None),
    ],
)  # fmt: skip
def test_fixing_edit_fields(prompt, dets, fix):
    got = fixing_edit(metadata_for_prompt(prompt), dets)
    assert (got if got is None else (got.kind, got.object, got.attribute)) == fix
    assert fixing_instruction(metadata_for_prompt(prompt), dets) == (None if got is None else got.text)


def test_plugin_judge_names_the_fix_that_scores_one_and_the_renderers_instruction_matches_its_kind():
    judge = build_judge({"kind": "shapes", "plugins": [PLUGIN]})
    rng = np.random.default_rng(5)
    metas = sample_tasks(build_splits().train, 120, rng)
    kinds_agree = 0
    for m in metas:
        (good,) = judge.score([JudgeItem(render_correct(m, rng).image, m["prompt"], m)])
        assert good.correct and FIXES_KEY not in good.details
        wrong = render_wrong(m, rng)
        (bad,) = judge.score([JudgeItem(wrong.image, m["prompt"], m)])
        fixes = fixes_in(bad.details)
        assert not bad.correct and len(fixes) == 1 and fixes[0].kind is not None
        assert best_match(fixes[0].text, fixes).score == 1.0
        assert best_match("", fixes).score == 0.0
        kinds_agree += instruction_kind(wrong.instruction) == fixes[0].kind
    assert kinds_agree >= 0.9 * len(metas)  # the renderer's instruction is the judge's fix, up to free choices
    assert ShapesJudge().score([JudgeItem(render_wrong(metas[0], rng).image, "", metas[0])])[0].details.get(
        FIXES_KEY) is None  # the bare judge names no fix: the paper's reward  # fmt: skip


@pytest.mark.integration
def test_refine_step_with_the_warm_start_earns_the_instruction_reward():
    from actors.diffusion_worker import DiffusionWorker
    from actors.hf_text_worker import HFTextWorker
    from cluster.config import load_config
    from cluster.r3_step import run_tree_step
    from cluster.session import resolve_model_path
    from cluster.settings import step_settings
    from learners.algos import group_advantages
    from reward.shaping import refine_rewards
    from rollout.buffer import BufferEntry, RolloutBuffer
    from rollout.plugins import load_plugins

    load_plugins([PLUGIN])
    cfg = load_config("examples/shapesworld/configs/shapes_cpu.yaml", [
        "r3.instruction_reward_weight=1.0", "r3.group_size=4", "r3.prompts_per_step=3",
        "r3.tree_schedule=alternate", "flow_grpo.edit_num_steps=2"])  # fmt: skip
    settings = step_settings(cfg)
    judge = build_judge({"kind": "shapes", "plugins": [PLUGIN]})
    rng = np.random.default_rng(11)
    buffer = RolloutBuffer(p_perfect=0.0, seed=0)
    for m in sample_tasks(build_splits().train, 3, rng):
        image = render_wrong(m, rng).image
        (r,) = judge.score([JudgeItem(image, m["prompt"], m)])
        buffer.add(BufferEntry(m["prompt"], image, r.score, r.correct, m, fixes=r.details[FIXES_KEY]))
    reasoner = HFTextWorker(resolve_model_path(cfg.models.reasoner.path), max_model_len=1024, seed=0)
    generator = DiffusionWorker(resolve_model_path(cfg.models.generator.path), max_sequence_length=20)
    torch.manual_seed(0)
    res = run_tree_step(1, [], reasoner, generator, judge, buffer, settings)

    assert res.stages == ["refine"]
    inputs, rounds = [t.rounds[0] for t in res.trajectories], [t.rounds[1] for t in res.trajectories]
    matches = [best_match(r.instruction, fixes_in(i.judge_details)).score for i, r in zip(inputs, rounds, strict=True)]
    paper = refine_rewards([i.score for i in inputs], [r.score for r in rounds], [r.well_formed for r in rounds],
                           [r.stopped for r in rounds], format_weight=cfg.r3.format_weight,
                           wrong_stop_penalty=cfg.r3.wrong_stop_penalty)
    assert [r.text_reward for r in rounds] == pytest.approx(
        [p + m * r.well_formed for p, m, r in zip(paper.text, matches, rounds, strict=True)])
    assert any(m > 0 and r.well_formed for m, r in zip(matches, rounds, strict=True)), [r.instruction for r in rounds]
    paper_adv = group_advantages(torch.tensor(paper.text, dtype=torch.float64), 4, "none", 1e-6).tolist()
    assert [r.text_advantage for r in rounds] != pytest.approx(paper_adv)
    m = res.metrics
    assert m["refine/instruction_judged"] == 12.0 and m["refine/instruction_score_mean"] == pytest.approx(
        sum(matches) / 12)
