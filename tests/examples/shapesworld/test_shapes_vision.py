"""Patch labels for the reasoner's vision pretraining, hand-checked on built scenes; and a few
pretraining steps on a small VLM lower the loss (the labels are learnable, the head is wired)."""

import numpy as np
import pytest

from examples.shapesworld.layout import Scene, ShapeObject
from examples.shapesworld.tasks import COLORS, SHAPES
from examples.shapesworld.vision import scene_patch_labels


def _scene(*objs):
    return Scene(tuple(ShapeObject(s, c, cx, cy, size, (0, 0, 0)) for s, c, cx, cy, size in objs), (250, 250, 250), 0, 0.0, 32)


def test_a_square_filling_one_patch_labels_exactly_that_patch():
    colour, shape = scene_patch_labels(_scene(("square", "red", 12.0, 12.0, 8.0)), 8)
    want = np.zeros((4, 4), dtype=int)
    want[1, 1] = 1 + COLORS.index("red")
    assert np.array_equal(colour, want)
    assert shape[1, 1] == 1 + SHAPES.index("square") and shape.sum() == shape[1, 1]


def test_quarter_cover_threshold_and_later_objects_on_top():
    # 4x4 square in the corner of patch (0, 0): 16 of 64 px = exactly a quarter -> labelled;
    # a 2x2 square in patch (3, 3): 4 px -> background.
    colour, _ = scene_patch_labels(_scene(("square", "blue", 2.0, 2.0, 4.0), ("square", "green", 29.0, 29.0, 2.0)), 8)
    assert colour[0, 0] == 1 + COLORS.index("blue") and colour[3, 3] == 0
    # a square straddling patches (1, 1) and (1, 2), half each, under a later square over (1, 2)
    colour, shape = scene_patch_labels(
        _scene(("square", "red", 16.0, 12.0, 8.0), ("circle", "yellow", 20.0, 12.0, 8.0)), 8
    )
    assert colour[1, 1] == 1 + COLORS.index("red")
    assert colour[1, 2] == 1 + COLORS.index("yellow") and shape[1, 2] == 1 + SHAPES.index("circle")


def test_empty_scene_and_bad_patch():
    colour, shape = scene_patch_labels(_scene(), 8)
    assert colour.shape == (4, 4) and not colour.any() and not shape.any()
    with pytest.raises(ValueError, match="patch=5"):
        scene_patch_labels(_scene(), 5)


def test_pretraining_lowers_the_patch_loss(tmp_path):
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from examples.shapesworld.reasoner import ReasonerRecipe, build_shapes_vlm
    from examples.shapesworld.recipe import make_pool
    from examples.shapesworld.tasks import build_splits
    from examples.shapesworld.vision import pretrain_vision

    r = ReasonerRecipe(text_hidden=32, text_layers=1, text_heads=1, vision_hidden=32, vision_layers=1, vision_heads=1)
    path = build_shapes_vlm(tmp_path, seed=0, recipe=r)
    model = Idefics3ForConditionalGeneration.from_pretrained(path)
    pool = make_pool(build_splits().train, 40, seed=0)
    torch.manual_seed(0)
    losses = pretrain_vision(
        model, AutoProcessor.from_pretrained(path), pool, 60, 16, 3e-3, r.patch,
        np.random.default_rng(0), torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
