"""The reasoner's own-image stage, pure parts: the judge's detections become the think and its
fix the answer; images with objects the judge cannot name are left out; batches are balanced
between correct and wrong images."""

import logging

import numpy as np
import pytest
import torch

from examples.shapesworld.judge import Detection, ShapesJudge
from examples.shapesworld.own_images import OwnImage, OwnReflectData, caption_of_detections, label_own_images
from examples.shapesworld.reasoner import describe_scene
from examples.shapesworld.render import render_correct, render_wrong
from examples.shapesworld.tasks import metadata_for_prompt
from rollout.parsing import STOP_PHRASE


def _det(shape, color, x0, y0):
    return Detection(shape, color, (x0, y0, x0 + 10, y0 + 10), 100, 0.9)


def test_caption_lists_detections_along_the_prompts_axis_by_box_centre():
    beside = metadata_for_prompt("a photo of two circles left of a square")
    above = metadata_for_prompt("a photo of a circle above a diamond")
    dets = [_det("square", "blue", 40, 0), _det("circle", "red", 0, 40), _det("star", "green", 20, 20)]
    assert caption_of_detections(dets, beside) == "red circle, green star, blue square."
    assert caption_of_detections(dets, above) == "blue square, green star, red circle."
    assert caption_of_detections([], beside) == "nothing."
    with pytest.raises(ValueError, match="no shape"):
        caption_of_detections([_det(None, "red", 0, 0)], beside)


def test_labels_are_the_judges_reading_and_unnamed_objects_are_left_out():
    meta = metadata_for_prompt("a photo of a red circle left of a blue square")
    rng = np.random.default_rng(0)
    good = render_correct(meta, rng, layout="canonical")
    bad = render_wrong(meta, rng, kind="shape", layout="canonical")
    blob = np.full((64, 64, 3), 255, np.uint8)
    blob[10:50, 10:18] = blob[42:50, 10:50] = (255, 0, 0)  # a red "L": no shape the judge knows
    assert ShapesJudge().detect(blob)[0].shape is None
    rows, unnamed = label_own_images([meta, meta, meta], [good.image, bad.image, blob])
    assert unnamed == 1 and len(rows) == 2
    assert rows[0].fix is None and rows[0].caption == describe_scene(good.scene, meta)
    assert rows[1].fix == bad.instruction and rows[1].caption == describe_scene(bad.scene, meta)
    assert rows[1].prompt == meta["prompt"]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from examples.shapesworld.reasoner import ReasonerRecipe, build_shapes_vlm

    r = ReasonerRecipe(text_hidden=32, text_layers=1, text_heads=1, vision_hidden=32, vision_layers=1, vision_heads=1)
    return AutoProcessor.from_pretrained(build_shapes_vlm(tmp_path_factory.mktemp("vlm"), seed=0, recipe=r))


def _rows(n_correct: int, n_wrong: int) -> list[OwnImage]:
    meta = metadata_for_prompt("a photo of a red circle")
    image = np.full((64, 64, 3), 255, np.uint8)
    return [OwnImage(meta, image, "red circle.", None)] * n_correct + [
        OwnImage(meta, image, "blue circle.", "change the blue circle to red")
    ] * n_wrong


def _answers(processor, batch) -> list[str]:
    tok = processor.tokenizer
    return [
        tok.decode([t for t in row.tolist() if t != -100], skip_special_tokens=True) for row in batch["labels"]
    ]


def test_own_batches_are_half_correct_half_wrong(processor):
    batch = OwnReflectData(processor, _rows(3, 20)).batch(8, 5.0, torch.Generator().manual_seed(0))
    answers = _answers(processor, batch)
    assert sum(a.endswith(STOP_PHRASE) for a in answers) == 4
    assert sum(a.endswith("change the blue circle to red") for a in answers) == 4
    assert batch["pixel_values"].shape[0] == 8 and batch["weights"].max() == 5.0


def test_one_kind_only_is_said_and_batches_use_it(processor, caplog):
    with caplog.at_level(logging.WARNING, logger="examples.shapesworld.own_images"):
        data = OwnReflectData(processor, _rows(0, 5))
    assert "0 correct and 5 wrong" in caplog.text
    answers = _answers(processor, data.batch(6, 1.0, torch.Generator().manual_seed(0)))
    assert len(answers) == 6 and all(a.endswith("change the blue circle to red") for a in answers)
    with pytest.raises(ValueError, match="no own images"):
        OwnReflectData(processor, [])
