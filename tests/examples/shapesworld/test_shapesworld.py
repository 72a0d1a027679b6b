"""ShapesWorld tasks and renderer: GenEval-format space, fixed disjoint splits, correct and
controlled-wrong renders with their fixing instructions."""

import json
import re

import numpy as np
import pytest

from examples.shapesworld.layout import GAP, MARGIN, canonical_objects
from examples.shapesworld.render import (
    WRONG_KINDS,
    applicable_wrong_kinds,
    draw_scene,
    render_correct,
    render_wrong,
    shape_mask,
)
from examples.shapesworld.tasks import (
    COLORS,
    COMPOSITIONAL_TAGS,
    GENEVAL_TAGS,
    SHAPES,
    TAGS,
    all_tasks,
    build_splits,
    metadata_for_prompt,
    relative_position,
    sample_tasks,
    shapes_split,
    write_splits,
)
from rollout.datasets import load_geneval


def test_space_covers_the_brief():
    tasks = all_tasks()
    assert set(GENEVAL_TAGS) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert len(COMPOSITIONAL_TAGS) >= 2 and {t["tag"] for t in tasks} == set(TAGS)
    assert len(SHAPES) >= 4 and len(COLORS) >= 6
    counts = {r["count"] for t in tasks for r in t["include"]}
    assert counts == {1, 2, 3, 4}
    rels = {r["position"][0] for t in tasks for r in t["include"] if "position" in r}
    assert rels == {"left of", "right of", "above", "below"}
    prompts = {t["prompt"] for t in tasks}
    assert len(prompts) == len(tasks)  # no duplicate prompt
    for t in tasks:
        assert set(t) <= {"tag", "include", "exclude", "prompt"} and t["prompt"].startswith("a photo of ")
        for r in t["include"]:
            assert set(r) <= {"class", "count", "color", "position"} and r["class"] in SHAPES


def test_prompt_phrasing_and_metadata_like_geneval():
    assert metadata_for_prompt("a photo of two red circles") == {
        "tag": "color_count",
        "include": [{"class": "circle", "count": 2, "color": "red"}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "a photo of two red circles",
    }
    assert metadata_for_prompt("a photo of four crosses")["exclude"] == [{"class": "cross", "count": 5}]
    assert metadata_for_prompt("A photo of  an orange star")["include"] == [
        {"class": "star", "count": 1, "color": "orange"}
    ]
    pos = metadata_for_prompt("a photo of a star left of a square")
    assert pos["tag"] == "position"
    assert pos["include"] == [
        {"class": "square", "count": 1},
        {"class": "star", "count": 1, "position": ["left of", 0]},
    ]
    with pytest.raises(ValueError, match="not a ShapesWorld prompt"):
        metadata_for_prompt("a photo of a dog")


def test_splits_are_fixed_disjoint_and_cover_every_tag():
    a, b = build_splits(seed=0), build_splits(seed=0)
    assert a == b
    train = {t["prompt"] for t in a.train}
    test = {t["prompt"] for t in a.test}
    assert not train & test
    assert len(train) + len(test) == len(all_tasks())
    for tag in TAGS:
        assert any(t["tag"] == tag for t in a.test) and any(t["tag"] == tag for t in a.train)
    # Paraphrases of one relation stay on one side.
    for t in a.test:
        if t["tag"] == "position":
            obj, tgt = t["include"][1], t["include"][0]
            inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            para = f"a photo of a {tgt['class']} {inverse[obj['position'][0]]} a {obj['class']}"
            assert para in test
    assert build_splits(seed=1).test != a.test


def test_sample_tasks_balances_tags():
    tasks = build_splits().train
    got = sample_tasks(tasks, 900, np.random.default_rng(0))
    tags = [t["tag"] for t in got]
    assert min(tags.count(t) for t in TAGS) > 60  # ~100 each, although color_position is most of the space
    with pytest.raises(ValueError):
        sample_tasks([], 3, np.random.default_rng(0))


def test_write_splits_is_readable_by_the_geneval_loader(tmp_path):
    train_path, test_path = write_splits(tmp_path)
    recs = load_geneval(test_path)
    assert [r.metadata for r in recs] == build_splits().test
    assert json.loads(train_path.read_text().splitlines()[0])["tag"] == "single_object"


def _geneval_relative_position(box_a, box_b, threshold=0.1):
    """GenEval's numpy formulation, as a reference for the scalar one."""
    boxes = np.array([box_a, box_b], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {
        r
        for r, ok in (
            ("left of", dx < -0.5),
            ("right of", dx > 0.5),
            ("above", dy < -0.5),
            ("below", dy > 0.5),
        )
        if ok
    }


def test_relative_position_follows_geneval():
    a, b = (0, 0, 10, 10), (20, 0, 30, 10)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    # dx = -5 shrinks by 0.1 * (10 + 10) = 2 to -3; -3 / 5 = -0.6 < -0.5.
    assert relative_position((0, 0, 10, 10), (5, 0, 15, 10)) == {"left of"}
    # dx = -4 shrinks to -2; -2 / 4 = -0.5 is not < -0.5.
    assert relative_position((0, 0, 10, 10), (4, 0, 14, 10)) == set()
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    rng = np.random.default_rng(0)
    for _ in range(500):
        xy = rng.uniform(0, 60, size=(2, 2))
        wh = rng.uniform(4, 20, size=(2, 2))
        a, b = (tuple(np.concatenate([p, p + s])) for p, s in zip(xy, wh, strict=True))
        assert relative_position(a, b) == _geneval_relative_position(a, b)


def test_shape_masks_fill_their_box():
    for shape in SHAPES:
        m = shape_mask(shape, 16.0, 16.0, 20.0, 20.0, 32, 32)
        ys, xs = np.nonzero(m)
        assert xs.min() >= 6 and xs.max() <= 25 and ys.min() >= 6 and ys.max() <= 25, shape
        assert ys.max() - ys.min() >= 16 and xs.max() - xs.min() >= 16, shape  # star tips are thin
    fills = {s: shape_mask(s, 50.0, 50.0, 80.0, 80.0, 100, 100).mean() * 100 * 100 / 6400 for s in SHAPES}
    assert fills["square"] == pytest.approx(1.0, abs=0.01)
    assert fills["circle"] == pytest.approx(np.pi / 4, abs=0.01)
    assert fills["diamond"] == pytest.approx(0.5, abs=0.02) and fills["triangle"] == pytest.approx(
        0.5, abs=0.02
    )
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("hexagon", 5, 5, 4, 4, 10, 10)


@pytest.mark.parametrize("size", [64, 96])
def test_render_correct_is_seeded_and_sized(size):
    meta = metadata_for_prompt("a photo of three blue squares")
    a = render_correct(meta, np.random.default_rng(7), size=size)
    b = render_correct(meta, np.random.default_rng(7), size=size)
    assert a.image.shape == (size, size, 3) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image) and a.kind == "correct" and a.instruction is None
    objs = a.scene.objects
    assert len(objs) == 3 and {o.shape for o in objs} == {"square"} and {o.color for o in objs} == {"blue"}
    assert not np.array_equal(a.image, render_correct(meta, np.random.default_rng(8), size=size).image)


def test_canonical_layout_hand_checked():
    def where(prompt):
        return [(o.shape, o.color, o.cx, o.cy, o.size) for o in canonical_objects(metadata_for_prompt(prompt))]

    assert where("a photo of a red circle left of a blue square") == [
        ("circle", "red", 16.0, 32.0, 14.0),
        ("square", "blue", 48.0, 32.0, 14.0),
    ]
    # "A below B": B's group is the top row, A's the bottom row, each spread along its row.
    assert where("a photo of two stars below a cross") == [
        ("cross", COLORS[SHAPES.index("cross")], 32.0, 16.0, 14.0),
        ("star", COLORS[SHAPES.index("star")], 21.0, 48.0, 14.0),
        ("star", COLORS[SHAPES.index("star")], 43.0, 48.0, 14.0),
    ]
    assert [(x, y) for *_, x, y, _ in where("a photo of four green diamonds")] == [
        (20.0, 20.0), (44.0, 20.0), (20.0, 44.0), (44.0, 44.0)
    ]  # fmt: skip
    assert [o.cx for o in canonical_objects(metadata_for_prompt("a photo of a circle"), size=128)] == [64.0]


def test_canonical_layout_is_one_valid_image_per_prompt():
    """Every task's canonical scene is what the prompt asks, inside the margin, with boxes GAP
    apart and relations holding at the renderer's robust threshold; the rng only adds pixel noise."""
    for meta in all_tasks():
        objs = canonical_objects(meta)
        for i, r in enumerate(meta["include"]):
            mine = [o for o in objs if o.req == i]
            assert len(mine) == r["count"] and {o.shape for o in mine} == {r["class"]}
            assert r.get("color") is None or {o.color for o in mine} == {r["color"]}
            if "position" in r:
                rel, j = r["position"][0], int(r["position"][1])
                assert all(
                    rel in relative_position(a.box, b.box, 0.2) for a in mine for b in objs if b.req == j
                ), meta["prompt"]
        for k, a in enumerate(objs):
            assert min(a.box) >= MARGIN and max(a.box) <= 64 - MARGIN, meta["prompt"]
            for b in objs[:k]:
                ax0, ay0, ax1, ay1 = a.box
                bx0, by0, bx1, by1 = b.box
                assert ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0
    meta = metadata_for_prompt("a photo of two circles above a star")
    a, b = (render_correct(meta, np.random.default_rng(s), noise=0.0, layout="canonical") for s in (1, 2))
    assert np.array_equal(a.image, b.image) and a.scene.background == b.scene.background
    for seed in range(5):  # a mistake is made on the canonical scene, and undone back to it
        wrong = render_wrong(meta, np.random.default_rng(seed), noise=0.0, layout="canonical")
        assert np.array_equal(wrong.fixed_image, a.image) and not np.array_equal(wrong.image, a.image)
    with pytest.raises(ValueError, match="layout='grid'"):
        render_correct(meta, np.random.default_rng(0), layout="grid")
    three = {"include": [*meta["include"], {"class": "cross", "count": 1, "position": ["left of", 0]}], "prompt": "x"}
    with pytest.raises(ValueError, match="only one relation between two groups"):
        canonical_objects(three)


def test_render_correct_places_relations_with_margin():
    meta = metadata_for_prompt("a photo of two circles above a star")
    for seed in range(20):
        objs = render_correct(meta, np.random.default_rng(seed)).scene.objects
        star = next(o for o in objs if o.shape == "star")
        for c in (o for o in objs if o.shape == "circle"):
            assert "above" in relative_position(c.box, star.box, 0.2)


def test_applicable_wrong_kinds_per_tag():
    kinds = {
        "a photo of a circle": ("missing", "shape"),
        "a photo of two circles": ("count", "shape"),
        "a photo of a red circle": ("color", "missing", "shape"),
        "a photo of a circle above a star": ("position", "missing", "shape"),
        "a photo of three green stars": ("color", "count", "shape"),
    }
    for prompt, want in kinds.items():
        assert applicable_wrong_kinds(metadata_for_prompt(prompt)) == want
    assert set(WRONG_KINDS) == {"color", "count", "position", "missing", "shape"}
    with pytest.raises(ValueError, match="not applicable"):
        render_wrong(metadata_for_prompt("a photo of a circle"), np.random.default_rng(0), kind="color")


def test_wrong_renders_carry_the_fixing_instruction():
    rng = np.random.default_rng(3)
    cases = [
        ("a photo of a red square", "color", r"change the (\w+) square to red"),
        ("a photo of three circles", "count", r"(add one more circle|remove one circle)"),
        (
            "a photo of a circle left of a square",
            "position",
            r"(move the circle to the left of the square|move the square to the right of the circle)",
        ),
        ("a photo of a blue star and a green cross", "missing", r"add an? (blue star|green cross)"),
        ("a photo of a triangle", "shape", r"change the (\w+) to a triangle"),
        (
            "a photo of a circle below a star",
            "missing",
            r"add an? \w+ (circle below the star|star above the circle)",
        ),
    ]
    for prompt, kind, pattern in cases:
        r = render_wrong(metadata_for_prompt(prompt), rng, kind=kind)
        assert r.kind == kind and re.fullmatch(pattern, r.instruction), (prompt, r.instruction)
        assert r.fixed_image.shape == r.image.shape and not np.array_equal(r.fixed_image, r.image)
        # The fixed image is the correct scene drawn with the same background and noise.
        assert np.array_equal(draw_scene(r.scene), r.image)


def test_wrong_color_changes_exactly_one_object():
    meta = metadata_for_prompt("a photo of four purple diamonds")
    r = render_wrong(meta, np.random.default_rng(0), kind="color")
    colors = [o.color for o in r.scene.objects]
    assert len(colors) == 4 and colors.count("purple") == 3
    other = next(c for c in colors if c != "purple")
    assert r.instruction == f"change the {other} diamond to purple"


def test_shapes_split_gives_prompt_records():
    test = shapes_split("test")
    assert sorted(r.prompt for r in test) == sorted(t["prompt"] for t in build_splits().test)
    assert {r.category for r in test[: len(TAGS)]} == set(TAGS)  # any prefix is tag-balanced
    assert test[0].category == test[0].metadata["tag"] and test[0].prompt == test[0].metadata["prompt"]
    assert not {r.prompt for r in shapes_split("train")} & {r.prompt for r in test}
    with pytest.raises(ValueError, match="allowed: 'train', 'test'"):
        shapes_split("val")
