"""The exact ShapesWorld judge: ≥ 99 % correct on ground-truth renders, ≤ 1 % "correct" on
controlled wrong renders (1,000 each over every tag), GenEval's rules, partial credit, and no
exception on bad input."""

import numpy as np
import pytest

from examples.shapesworld.judge import Detection, ShapesJudge, build_shapes_judge, evaluate_detections
from examples.shapesworld.layout import LAYOUTS, Scene, ShapeObject
from examples.shapesworld.render import draw_scene, render_correct, render_wrong
from examples.shapesworld.tasks import PALETTE, TAGS, build_splits, metadata_for_prompt, sample_tasks
from rollout.interfaces import Judge, JudgeItem

N = 1000


@pytest.fixture(scope="module")
def judge():
    return ShapesJudge()


@pytest.fixture(scope="module")
def tasks():
    splits = build_splits()
    return sample_tasks(splits.train + splits.test, N, np.random.default_rng(1234))


def _items(renders, tasks):
    return [JudgeItem(r.image, m["prompt"], m) for r, m in zip(renders, tasks, strict=True)]


def test_is_a_judge_and_builds_from_kwargs():
    j = build_shapes_judge(min_area=10)
    assert isinstance(j, Judge) and j.min_area == 10
    with pytest.raises(ValueError, match="min_iou"):
        ShapesJudge(min_iou=1.5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ground_truth_renders_are_judged_correct(judge, tasks, layout):
    rng = np.random.default_rng(0)
    renders = [render_correct(m, rng, layout=layout) for m in tasks]
    results = judge.score(_items(renders, tasks))
    assert {m["tag"] for m in tasks} == set(TAGS)
    acc = np.mean([r.correct for r in results])
    assert acc >= 0.99, [
        (m["prompt"], r.details["checklist"]) for m, r in zip(tasks, results, strict=True) if not r.correct
    ][:3]
    assert all(r.error is None and (r.score == 1.0) == r.correct for r in results)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrong_renders_are_judged_wrong(judge, tasks, layout):
    rng = np.random.default_rng(1)
    renders = [render_wrong(m, rng, layout=layout) for m in tasks]
    assert {r.kind for r in renders} == {"color", "count", "position", "missing", "shape"}
    results = judge.score(_items(renders, tasks))
    false_ok = [(m["prompt"], w.kind) for m, w, r in zip(tasks, renders, results, strict=True) if r.correct]
    assert len(false_ok) <= 0.01 * N, false_ok[:5]
    # The fixed images (what the instruction asks for) are correct again.
    fixed = judge.score(
        [JudgeItem(w.fixed_image, m["prompt"], m) for w, m in zip(renders[:200], tasks[:200], strict=True)]
    )
    assert np.mean([r.correct for r in fixed]) >= 0.99
    # Partial credit: most mistakes leave some checklist items satisfied.
    assert 0.0 < np.mean([r.score for r in results]) < 1.0


def test_detects_a_drawn_scene(judge):
    objs = (
        ShapeObject("circle", "red", 16.0, 16.0, 14.0, PALETTE["red"]),
        ShapeObject("triangle", "blue", 46.0, 18.0, 16.0, PALETTE["blue"]),
        ShapeObject("star", "yellow", 20.0, 46.0, 17.0, PALETTE["yellow"]),
        ShapeObject("cross", "black", 46.0, 46.0, 15.0, PALETTE["black"]),
    )
    img = draw_scene(Scene(objs, (230, 232, 226), 0, 2.0, 64))
    dets = judge.detect(img)
    assert sorted((d.shape, d.color) for d in dets) == [
        ("circle", "red"),
        ("cross", "black"),
        ("star", "yellow"),
        ("triangle", "blue"),
    ]
    circle = next(d for d in dets if d.shape == "circle")
    assert all(abs(a - b) <= 1 for a, b in zip(circle.box, (9, 9, 23, 23), strict=True))


def _det(shape, color, x, y, s=10):
    return Detection(shape, color, (x, y, x + s, y + s), s * s, 1.0)


def test_geneval_rules_and_partial_credit():
    meta = metadata_for_prompt("a photo of a red circle and a blue square")
    ok, score, checklist = evaluate_detections(
        meta, [_det("circle", "red", 0, 0), _det("square", "blue", 30, 0)]
    )
    assert ok and score == 1.0 and len(checklist) == 4
    # Wrong colour on one of four items: count circle ✓, red circle ✗, count square ✓, blue square ✓.
    ok, score, _ = evaluate_detections(meta, [_det("circle", "green", 0, 0), _det("square", "blue", 30, 0)])
    assert not ok and score == pytest.approx(0.75)
    # Counting is "exactly n" through the exclude: 3 of 2 fails only the exclude item.
    meta = metadata_for_prompt("a photo of two stars")
    three = [_det("star", "red", 0, 0), _det("star", "red", 20, 0), _det("star", "red", 40, 0)]
    ok, score, _ = evaluate_detections(meta, three)
    assert not ok and score == pytest.approx(0.5)
    assert evaluate_detections(meta, three[:2])[0]
    # Position: the star must be left of the square; if the square is missing the relation fails too.
    meta = metadata_for_prompt("a photo of a star left of a square")
    assert evaluate_detections(meta, [_det("star", "red", 0, 20), _det("square", "red", 30, 20)])[0]
    ok, score, _ = evaluate_detections(meta, [_det("star", "red", 30, 20), _det("square", "red", 0, 20)])
    assert not ok and score == pytest.approx(2 / 3)
    ok, score, _ = evaluate_detections(meta, [_det("star", "red", 0, 20)])
    assert not ok and score == pytest.approx(1 / 3)
    # Extra objects that no rule forbids are fine (GenEval).
    assert evaluate_detections(
        metadata_for_prompt("a photo of a circle"), [_det("circle", "red", 0, 0), _det("cross", "red", 30, 0)]
    )[0]


def test_never_raises_on_bad_input(judge):
    good = render_correct(metadata_for_prompt("a photo of a circle"), np.random.default_rng(0)).image
    bad_images = [
        good.astype(np.float32),
        good[:, :, 0],
        np.zeros((2, 2, 3), np.uint8),
        None,
        "img",
        np.zeros((0, 5, 3), np.uint8),
    ]
    results = judge.score([JudgeItem(im, "a photo of a circle", {}) for im in bad_images])
    assert all(r.error and r.score == 0.0 and not r.correct for r in results)
    # Blank and noise images are scored, not errors.
    blank = np.full((64, 64, 3), 240, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for im in (blank, noise):
        (r,) = judge.score([JudgeItem(im, "a photo of a circle", {})])
        assert r.error is None and not r.correct
    # Metadata may be left out for ShapesWorld prompts; unknown prompts give an error.
    (r,) = judge.score([JudgeItem(good, "a photo of a circle", {})])
    assert r.correct and r.error is None
    (r,) = judge.score([JudgeItem(good, "a photo of a dog", {})])
    assert r.error and "not a ShapesWorld prompt" in r.error
