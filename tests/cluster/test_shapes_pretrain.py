"""ShapesWorld warm start: answer formats, data pool, cache paths (pure), and a shortened run of
the real entry point (integration, slow: trains every model a few steps and evaluates them)."""

import json

import numpy as np
import pytest

from cluster.shapes_models import SHAPES_VERSION, shapes_model_path
from cluster.shapes_pretrain import PretrainSettings, make_pool
from cluster.shapes_reasoner import plan_answer, reflect_answer, warmup_cosine
from rollout.parsing import is_stop, parse_answer
from rollout.shapesworld.tasks import build_splits, metadata_for_prompt


def test_answers_are_well_formed_and_stop_only_when_correct():
    meta = metadata_for_prompt("a photo of two circles left of a square")
    plan = parse_answer(plan_answer(meta))
    assert plan.well_formed and plan.answer == meta["prompt"]
    assert plan.think == "as asked."  # short constant think: the 48-token answer budget (shapes_reasoner)
    stop = parse_answer(reflect_answer("", None))
    fix = parse_answer(reflect_answer("color", "change the blue circle to red"))
    assert stop.well_formed and is_stop(stop.answer)
    assert fix.well_formed and not is_stop(fix.answer) and fix.answer == "change the blue circle to red"


def test_pool_pairs_wrong_images_with_their_fix():
    pool = make_pool(build_splits().train, 12, seed=0)
    assert pool.correct.shape == pool.wrong.shape == pool.fixed.shape == (12, 64, 64, 3)
    assert len(pool.instructions) == len(pool.prompts) == 12
    assert all(not np.array_equal(w, f) for w, f in zip(pool.wrong, pool.fixed, strict=True))
    again = make_pool(build_splits().train, 12, seed=0)
    assert np.array_equal(again.wrong, pool.wrong) and again.instructions == pool.instructions


def test_settings_scale_and_schedule():
    s = PretrainSettings(scale=0.01)
    assert s.steps("flow_steps") == 6 and s.steps("vae_steps") == 5
    f = warmup_cosine(100)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(99) < 0.01


def test_model_path_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="known"):
        shapes_model_path("shapes-lm", tmp_path)
    with pytest.raises(ValueError, match="python -m cluster.shapes_pretrain"):
        shapes_model_path("shapes-flux", tmp_path)
    root = tmp_path / SHAPES_VERSION
    (root / "flux").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    assert shapes_model_path("shapes-flux", tmp_path) == root / "flux"


@pytest.mark.integration
@pytest.mark.slow
def test_shortened_warm_start_saves_loadable_models(tmp_path):
    from diffusers import FluxKontextPipeline
    from transformers import Idefics3ForConditionalGeneration

    from cluster.shapes_pretrain import main

    assert main(["--scale", "0.01", "--eval-prompts", "9", "--cache", str(tmp_path)]) == 0
    root = tmp_path / SHAPES_VERSION
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["losses"]["flow"]["steps"] == 6
    assert 0.0 <= manifest["generator_eval"]["t2i_accuracy"] <= 1.0
    assert 0.0 <= manifest["reasoner_eval"]["reflect_stop_accuracy"] <= 1.0
    pipe = FluxKontextPipeline.from_pretrained(str(shapes_model_path("shapes-flux", tmp_path)))
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.scaling_factor != 1.0
    Idefics3ForConditionalGeneration.from_pretrained(shapes_model_path("shapes-vlm", tmp_path))
