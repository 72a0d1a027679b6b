"""ShapesWorld reasoner warm start, pure parts: answer formats fit the RL answer budget and parse,
reflect batches are balanced, degradations are seeded and bounded, the loss weights sit on the
answer (and the decision token), and the fast training encoding equals the processor's."""

import numpy as np
import pytest
import torch

from examples.shapesworld.reasoner import (
    PLAN_THINK,
    balanced_reflect_batch,
    build_shapes_vlm,
    describe_scene,
    plan_answer,
    reflect_answer,
)
from examples.shapesworld.reasoner_sft import answer_example, prompt_ids
from examples.shapesworld.recipe import degrade_images, image_pixels, make_pool
from examples.shapesworld.tasks import build_splits, metadata_for_prompt
from rollout.parsing import is_stop, parse_answer
from rollout.templates import Templates

ANSWER_BUDGET = 40  # grpo.max_tokens in examples/shapesworld/configs/shapes_cpu.yaml: longer answers get truncated


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from examples.shapesworld.reasoner import ReasonerRecipe

    # A 1-layer sibling is enough: the processor does not depend on the model's size.
    r = ReasonerRecipe(text_hidden=32, text_layers=1, text_heads=1, vision_hidden=32, vision_layers=1, vision_heads=1)
    return AutoProcessor.from_pretrained(build_shapes_vlm(tmp_path_factory.mktemp("vlm"), seed=0, recipe=r))


@pytest.fixture(scope="module")
def pool():
    return make_pool(build_splits(seed=0).train, 300, seed=3)


def test_plan_copies_the_prompt_and_reflect_answers_parse():
    meta = metadata_for_prompt("a photo of two circles left of a square")
    plan = parse_answer(plan_answer(meta))
    assert plan.well_formed and plan.answer == meta["prompt"] and plan.think == PLAN_THINK
    stop = parse_answer(reflect_answer("red circle.", None))
    fix = parse_answer(reflect_answer("blue circle.", "change the blue circle to red"))
    assert stop.well_formed and is_stop(stop.answer) and stop.think == "red circle."
    assert fix.well_formed and not is_stop(fix.answer) and fix.answer == "change the blue circle to red"
    assert fix.think == "blue circle."


def test_scene_description_lists_objects_along_the_prompts_axis():
    from examples.shapesworld.layout import Scene, ShapeObject

    def obj(shape, color, cx, cy):
        return ShapeObject(shape, color, cx, cy, 10.0, (0, 0, 0))

    scene = Scene((obj("square", "blue", 40, 10), obj("circle", "red", 10, 50), obj("star", "green", 25, 30)),
                  (255, 255, 255), 0, 0.0, 64)  # fmt: skip
    beside = metadata_for_prompt("a photo of two circles left of a square")
    above = metadata_for_prompt("a photo of a circle above a diamond")
    assert describe_scene(scene, beside) == "red circle, green star, blue square."  # left to right
    assert describe_scene(scene, above) == "blue square, green star, red circle."  # top to bottom
    assert describe_scene(Scene((), (0, 0, 0), 0, 0.0, 64), beside) == "nothing."


def test_every_answer_fits_the_rl_token_budget(processor, pool):
    tok = processor.tokenizer
    answers = [plan_answer(m) for m in pool.metas]
    answers += [
        reflect_answer(describe_scene(sc, m), None) for sc, m in zip(pool.correct_scenes, pool.metas, strict=True)
    ]
    answers += [
        reflect_answer(describe_scene(sc, m), i)
        for sc, m, i in zip(pool.wrong_scenes, pool.metas, pool.instructions, strict=True)
    ]
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + <end_of_utterance>
    assert longest <= ANSWER_BUDGET


def test_reflect_batches_are_half_correct_and_reject_odd_sizes():
    gen = torch.Generator().manual_seed(0)
    idx, correct = balanced_reflect_batch(50, 16, gen)
    assert len(idx) == 16 and sum(correct) == 8 and all(0 <= i < 50 for i in idx)
    shown_correct = sorted(i for i, ok in zip(idx, correct, strict=True) if ok)
    assert shown_correct == sorted(i for i, ok in zip(idx, correct, strict=True) if not ok)  # paired
    with pytest.raises(ValueError, match="even"):
        balanced_reflect_batch(50, 7, gen)


def test_degradation_is_seeded_bounded_and_only_on_the_chosen_share(pool):
    images = pool.correct[:40]
    assert np.array_equal(degrade_images(images, np.random.default_rng(0), 0.0), images)
    a = degrade_images(images, np.random.default_rng(1), 1.0)
    b = degrade_images(images, np.random.default_rng(1), 1.0)
    assert a.dtype == np.uint8 and a.shape == images.shape and np.array_equal(a, b)
    changed = [not np.array_equal(x, y) for x, y in zip(a, images, strict=True)]
    assert all(changed)
    diff = np.abs(a.astype(int) - images.astype(int)).mean()
    assert 1.0 < diff < 40.0  # degraded, not destroyed


def test_loss_weights_cover_the_answer_and_the_decision_token(processor):
    prompt = [5, 6, 7]
    ids, labels, weights = answer_example(processor, prompt, reflect_answer("red star.", None), decision_weight=4.0)
    tok = processor.tokenizer
    n_think = len(tok("<think>red star.</think>", add_special_tokens=False)["input_ids"])
    assert labels[:3] == [-100] * 3 and labels[3:] == ids[3:] and weights[:3] == [0.0] * 3
    assert weights[3 + n_think] == 4.0
    wrong_ids, _, _ = answer_example(processor, prompt, reflect_answer("red star.", "add one more star"))
    assert ids[: 3 + n_think] == wrong_ids[: 3 + n_think]  # the weighted token is where they part
    assert ids[3 + n_think] != wrong_ids[3 + n_think]
    assert ids[-1] == tok.convert_tokens_to_ids("<end_of_utterance>")
    assert sum(w == 1.0 for w in weights) == len(ids) - 3 - 1


def test_training_encoding_equals_the_processor_on_the_worker_chat(processor, pool):
    from PIL import Image

    from examples.shapesworld.reasoner_sft import chat_dicts

    messages = Templates().reflect_messages(pool.prompts[0], pool.wrong[0])
    text = processor.apply_chat_template(chat_dicts(messages), tokenize=False, add_generation_prompt=True)
    ref = processor(text=text, images=[[Image.fromarray(pool.wrong[0])]], return_tensors="pt", add_special_tokens=False)
    assert prompt_ids(processor, messages) == ref["input_ids"][0].tolist()
    n_image_tokens = ref["input_ids"][0].tolist().count(processor.image_token_id)
    assert n_image_tokens == 16  # one 64 px tile of 8 px patches, pixel-shuffled by 2
    pixels, mask = image_pixels(processor, [pool.wrong[0]])
    assert torch.equal(pixels, ref["pixel_values"]) and torch.equal(mask, ref["pixel_attention_mask"])
    assert pixels.shape == (1, 1, 3, 64, 64)


def test_shared_prefix_loss_equals_the_plain_loss(processor, pool, tmp_path):
    from transformers import Idefics3ForConditionalGeneration

    from examples.shapesworld.reasoner import ReasonerRecipe, plan_example
    from examples.shapesworld.reasoner_sft import pad_examples, weighted_loss

    r = ReasonerRecipe(text_hidden=32, text_layers=2, text_heads=2, vision_hidden=32, vision_layers=1, vision_heads=1)
    model = Idefics3ForConditionalGeneration.from_pretrained(build_shapes_vlm(tmp_path, seed=1, recipe=r))
    t = Templates()
    examples = [
        answer_example(processor, prompt_ids(processor, t.reflect_messages(p, im)), reflect_answer("a.", i), 3.0)
        for p, im, i in zip(pool.prompts[:3], pool.wrong[:3], pool.instructions[:3], strict=True)
    ]
    reflect = pad_examples(examples, processor.tokenizer.pad_token_id)
    reflect["pixel_values"], reflect["pixel_attention_mask"] = image_pixels(processor, list(pool.wrong[:3]))
    plans = pad_examples([plan_example(processor, p, m) for p, m in zip(pool.prompts[:3], pool.metas[:3], strict=True)],
                 processor.tokenizer.pad_token_id)
    for batch in (reflect, plans):
        results = []
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            loss = weighted_loss(model, batch, share_prefix=share)
            loss.backward()
            patch = model.model.vision_model.embeddings.patch_embedding.weight.grad
            results.append((loss.detach(), model.lm_head.weight.grad.clone(), patch))
        (loss0, head0, patch0), (loss1, head1, patch1) = results
        torch.testing.assert_close(loss0, loss1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head0, head1, atol=1e-5, rtol=1e-4)
        if batch is reflect:  # the image features get the same gradient through the shared cache
            torch.testing.assert_close(patch0, patch1, atol=1e-6, rtol=1e-4)

