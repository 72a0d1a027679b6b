"""The judge's fix for an image: one instruction per kind of failure, in the renderer's
templates, and the renderer's own instruction recovered from its wrong renders."""

import numpy as np
import pytest

from examples.shapesworld.fixes import fixing_instruction
from examples.shapesworld.judge import Detection, ShapesJudge
from examples.shapesworld.layout import LAYOUTS
from examples.shapesworld.render import render_correct, render_wrong
from examples.shapesworld.tasks import build_splits, metadata_for_prompt, sample_tasks


def _det(shape, color, x, y, s=12):
    return Detection(shape, color, (x, y, x + s, y + s), s * s, 1.0)


@pytest.mark.parametrize(
    ("prompt", "dets", "fix"),
    [
        ("a photo of a red circle", [_det("circle", "red", 0, 0)], None),
        ("a photo of a red circle", [_det("circle", "blue", 0, 0)], "change the blue circle to red"),
        # The generator drew a shape the prompt does not name: change it, do not add another.
        ("a photo of a circle and a square", [_det("circle", "red", 0, 0), _det("star", "red", 30, 0)],
         "change the star to a square"),
        # Nothing of the shape and nothing to change into it: add one where the relation puts it.
        ("a photo of a star left of a square", [_det("square", "red", 30, 20)], "add a red star to the left of the square"),
        ("a photo of a red circle left of a blue square", [_det("circle", "red", 0, 20)],
         "add a blue square to the right of the red circle"),
        ("a photo of three stars", [_det("star", "red", 0, 0), _det("star", "red", 20, 0)], "add one more star"),
        ("a photo of two stars", [_det("star", "red", x, 0) for x in (0, 20, 40)], "remove one star"),
        ("a photo of a star left of a square", [_det("star", "red", 30, 20), _det("square", "red", 0, 20)],
         "move the star to the left of the square"),
        ("a photo of two stars above a circle",
         [_det("circle", "red", 20, 0), _det("star", "red", 0, 40), _det("star", "red", 30, 40)],
         "move the stars above the circle"),
        # The first failed requirement, in the prompt's order: the circle's colour before the square.
        ("a photo of a red circle and a blue square", [_det("circle", "green", 0, 0)], "change the green circle to red"),
    ],
)  # fmt: skip
def test_one_fix_per_failure(prompt, dets, fix):
    assert fixing_instruction(metadata_for_prompt(prompt), dets) == fix


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recovers_the_renderers_instruction(layout):
    """On 300 wrong renders: the renderer's own instruction, except where it has a free choice
    the image cannot show (the colour of an added uncoloured object; which side of a relation it
    moved); None on every correct render."""
    rng = np.random.default_rng(3)
    judge = ShapesJudge()
    metas = sample_tasks(build_splits().train, 300, rng)
    exact, kinds = [], []
    for m in metas:
        assert fixing_instruction(m, judge.detect(render_correct(m, rng, layout=layout).image)) is None
        wrong = render_wrong(m, rng, layout=layout)
        fix = fixing_instruction(m, judge.detect(wrong.image))
        assert fix is not None and fix.split()[0] == wrong.instruction.split()[0], (
            m["prompt"],
            wrong.instruction,
        )
        uncoloured_add = wrong.kind == "missing" and not all("color" in r for r in m["include"])
        if not uncoloured_add:
            exact.append(fix == wrong.instruction)
            kinds.append(wrong.kind)
    assert len(exact) > 200 and np.mean(exact) >= 0.97, {
        k: np.mean([e for e, kk in zip(exact, kinds, strict=True) if kk == k]) for k in set(kinds)
    }
