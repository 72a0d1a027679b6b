"""ShapesWorld renderer: correct images for any task, and controlled wrong images with the one
edit instruction that fixes them (warm-start data for the generator's edit mode and for the
reasoner's reflect answers).

Pure numpy. Shapes are rasterised at pixel centres from a normalised description (`shape_mask`),
which the judge reuses as its shape templates. Scenes keep every object's box clear of the others
by `GAP` pixels and of the border by `MARGIN`, so objects never merge and the border shows only
background. Relations are placed with a margin over GenEval's rule (`relative_position` at
threshold 0.2 instead of 0.1) so that one-pixel measurement errors cannot flip them.

Two layouts of correct scenes: "random" (random sizes, places, colour jitter and background: the
judge's and the reasoner's test bed) and "canonical" (`canonical_objects`: each object's place,
size and colour follow from the task's structure alone, on a fixed grey background). A prompt has
exactly one canonical image, so a small generator trained on canonical renders learns a function
of the text instead of a wide distribution (examples.shapesworld.pretrain); mistakes are made the same
way in both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from examples.shapesworld.tasks import INVERSE_RELATION, PALETTE, PLURALS, SHAPES, relative_position

__all__ = [
    "ShapeObject",
    "Scene",
    "Rendering",
    "WRONG_KINDS",
    "LAYOUTS",
    "canonical_objects",
    "shape_mask",
    "shape_mask_uv",
    "draw_scene",
    "render_correct",
    "render_wrong",
    "applicable_wrong_kinds",
    "describe_requirement",
    "with_article",
    "relation_phrase",
    "placement_phrase",
]

WRONG_KINDS: tuple[str, ...] = ("color", "count", "position", "missing", "shape")
MARGIN = 2  # pixels of pure background along the border
GAP = 2  # pixels between any two object boxes
_ROBUST_THRESHOLD = 0.2  # placement margin over GenEval's 0.1
_CROSS_ARM = 0.34  # half-width of a cross arm, in half-box units
LAYOUTS: tuple[str, ...] = ("random", "canonical")
CANONICAL_BACKGROUND = (225, 225, 225)


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape; (cx, cy) is the box centre and `size` the box side, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int]
    req: int = -1  # index of the include entry it serves (-1: none)

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    noise_seed: int
    noise: float
    size: int


@dataclass(frozen=True)
class Rendering:
    """`image` (size, size, 3) uint8. For a wrong rendering, `instruction` is the edit that turns
    it into `fixed_image` (the correct scene it was derived from); for a correct one both are None."""

    image: np.ndarray
    scene: Scene
    kind: str  # "correct" or one of WRONG_KINDS
    instruction: str | None = None
    fixed_image: np.ndarray | None = None


def shape_mask(shape: str, cx: float, cy: float, w: float, h: float, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of `shape` filling the box centred at (cx, cy) of size w × h."""
    xs = (np.arange(width) + 0.5 - cx) / (w / 2)
    ys = (np.arange(height) + 0.5 - cy) / (h / 2)
    return shape_mask_uv(shape, xs[None, :], ys[:, None])


def shape_mask_uv(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`shape` in normalised box coordinates: the box is [-1, 1]², v points down; u and v
    broadcast against each other (e.g. (1, W) and (H, 1))."""
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "triangle":  # apex up, base along the bottom
        return inside & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        return inside & ((np.abs(u) <= _CROSS_ARM) | (np.abs(v) <= _CROSS_ARM))
    if shape == "star":
        return inside & _inside_polygon(u, v, _STAR)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def draw_scene(scene: Scene) -> np.ndarray:
    """Rasterise a scene: background tint, flat-coloured shapes, then Gaussian pixel noise."""
    s = scene.size
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = scene.background
    for o in scene.objects:
        x0, y0 = max(int(o.cx - o.size / 2) - 1, 0), max(int(o.cy - o.size / 2) - 1, 0)
        x1, y1 = min(int(o.cx + o.size / 2) + 2, s), min(int(o.cy + o.size / 2) + 2, s)
        mask = shape_mask(o.shape, o.cx - x0, o.cy - y0, o.size, o.size, y1 - y0, x1 - x0)
        img[y0:y1, x0:x1][mask] = o.rgb
    if scene.noise > 0:
        img += np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_correct(
    meta: dict[str, Any], rng: np.random.Generator, size: int = 64, noise: float = 2.0, layout: str = "random"
) -> Rendering:
    """An image that satisfies the task `meta` (GenEval format) by GenEval's rules, in `layout`
    (one of `LAYOUTS`; "canonical" uses `rng` only for the pixel noise)."""
    scene = _correct_scene(meta, rng, size, noise, layout)
    return Rendering(draw_scene(scene), scene, "correct")


def applicable_wrong_kinds(meta: dict[str, Any]) -> tuple[str, ...]:
    """Which kinds of controlled mistake `meta` admits (each one makes the image incorrect)."""
    inc = meta["include"]
    kinds = []
    if any("color" in r for r in inc):
        kinds.append("color")
    if any(_count_variants(meta, i) for i in range(len(inc))):
        kinds.append("count")
    if any("position" in r for r in inc):
        kinds.append("position")
    if any(r["count"] == 1 for r in inc):
        kinds.append("missing")
    kinds.append("shape")
    return tuple(kinds)


def render_wrong(
    meta: dict[str, Any],
    rng: np.random.Generator,
    kind: str | None = None,
    size: int = 64,
    noise: float = 2.0,
    layout: str = "random",
) -> Rendering:
    """A correct scene (in `layout`) with exactly one controlled mistake of `kind` (random
    applicable kind when None), the instruction that undoes it, and the correct image as
    `fixed_image`.

    Raises:
        ValueError: `kind` is unknown or not applicable to `meta`.
    """
    kinds = applicable_wrong_kinds(meta)
    if kind is None:
        kind = kinds[int(rng.integers(0, len(kinds)))]
    if kind not in kinds:
        raise ValueError(f"kind={kind!r} not applicable to {meta['prompt']!r}; allowed: {list(kinds)}")
    for _ in range(_RESTARTS):
        good = _correct_scene(meta, rng, size, noise, layout)
        made = _MISTAKES[kind](meta, good, rng)
        if made is not None:
            bad, instruction = made
            return Rendering(draw_scene(bad), bad, kind, instruction, draw_scene(good))
    raise RuntimeError(f"could not place a {kind!r} mistake for {meta['prompt']!r} in {_RESTARTS} scenes")


# --- scene construction ------------------------------------------------------------------------

_RESTARTS = 200
_TRIES_PER_OBJECT = 60


def _star_polygon() -> np.ndarray:
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, 0.45)
    ang = -np.pi / 2 + k * np.pi / 5
    pts = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)  # (10, 2)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return (pts - (lo + hi) / 2) / ((hi - lo) / 2)  # stretched to fill [-1, 1]²


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _jitter(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(PALETTE[color]) + rng.integers(-10, 11, size=3)
    return tuple(int(c) for c in np.clip(base, 0, 255))


def _size_range(size: int, n_objects: int) -> tuple[float, float]:
    hi = 0.3 if n_objects <= 2 else 0.26 if n_objects <= 4 else 0.22
    return 0.2 * size, hi * size


def _constraints(meta: dict[str, Any]) -> list[tuple[int, str, int]]:
    """(req a, relation, req b): every object of a stands `relation` to every object of b."""
    return [
        (i, r["position"][0], int(r["position"][1])) for i, r in enumerate(meta["include"]) if "position" in r
    ]


def _fits(obj: ShapeObject, placed: list[ShapeObject], rels: list[tuple[int, str, int]], size: int) -> bool:
    x0, y0, x1, y1 = obj.box
    if x0 < MARGIN or y0 < MARGIN or x1 > size - MARGIN or y1 > size - MARGIN:
        return False
    for p in placed:
        px0, py0, px1, py1 = p.box
        if x0 < px1 + GAP and px0 < x1 + GAP and y0 < py1 + GAP and py0 < y1 + GAP:
            return False
    for a, rel, b in rels:
        for p in placed:
            if (
                obj.req == a
                and p.req == b
                and rel not in relative_position(obj.box, p.box, _ROBUST_THRESHOLD)
            ):
                return False
            if (
                obj.req == b
                and p.req == a
                and rel not in relative_position(p.box, obj.box, _ROBUST_THRESHOLD)
            ):
                return False
    return True


def _valid(objs: list[ShapeObject], rels: list[tuple[int, str, int]], size: int) -> bool:
    return all(_fits(o, objs[:k], rels, size) for k, o in enumerate(objs))


def _place(
    todo: list[tuple[str, str, int]],
    placed: list[ShapeObject],
    rels: list[tuple[int, str, int]],
    rng: np.random.Generator,
    size: int,
    n_total: int,
) -> list[ShapeObject] | None:
    """Place (shape, color, req) items one by one next to `placed`; None when one does not fit."""
    lo, hi = _size_range(size, n_total)
    out = list(placed)
    for shape, color, req in todo:
        for _ in range(_TRIES_PER_OBJECT):
            s = float(rng.uniform(lo, hi))
            cx, cy = rng.uniform(MARGIN + s / 2, size - MARGIN - s / 2, size=2)
            obj = ShapeObject(shape, color, float(cx), float(cy), s, (0, 0, 0), req)
            if _fits(obj, out, rels, size):
                out.append(replace(obj, rgb=_jitter(color, rng)))
                break
        else:
            return None
    return out


def _correct_scene(
    meta: dict[str, Any], rng: np.random.Generator, size: int, noise: float, layout: str = "random"
) -> Scene:
    if layout == "canonical":
        objs = canonical_objects(meta, size)
        return Scene(tuple(objs), CANONICAL_BACKGROUND, int(rng.integers(2**31)), noise, size)
    if layout != "random":
        raise ValueError(f"layout={layout!r}; allowed: {list(LAYOUTS)}")
    todo = []
    for i, r in enumerate(meta["include"]):
        for _ in range(r["count"]):
            color = r.get("color") or str(rng.choice(list(PALETTE)))
            todo.append((r["class"], color, i))
    n_total = len(todo) + 1  # leave room for one added object (count mistakes)
    for _ in range(_RESTARTS):
        objs = _place(todo, [], _constraints(meta), rng, size, n_total)
        if objs is not None:
            g = rng.uniform(205, 245)
            bg = np.clip(g + rng.uniform(-10, 10, size=3), 0, 255)
            return Scene(tuple(objs), tuple(int(c) for c in bg), int(rng.integers(2**31)), noise, size)
    raise RuntimeError(f"could not place {meta['prompt']!r} at size {size} in {_RESTARTS} tries")


def canonical_objects(meta: dict[str, Any], size: int = 64) -> list[ShapeObject]:
    """The one canonical scene of `meta`. Without a relation, all objects in include order on
    fixed slots (1: centre; 2 or 3: a row; 4: a 2 × 2 grid). With "A rel B", A's and B's groups
    in two lines across the relation's axis (left and right columns, or top and bottom rows),
    each group spread along its line. Colour: the asked one, else a fixed colour per shape.
    Every canonical scene passes the renderer's own placement check (tested over all tasks)."""
    inc = meta["include"]
    k = size / 64  # slots are laid out for 64 px and scaled

    def color(r: dict[str, Any]) -> str:
        return r.get("color") or _COLORS[SHAPES.index(r["class"]) % len(_COLORS)]

    def obj(r: dict[str, Any], req: int, x: float, y: float, side: float) -> ShapeObject:
        return ShapeObject(r["class"], color(r), x * k, y * k, side * k, PALETTE[color(r)], req)

    rels = _constraints(meta)
    if len(rels) > 1 or (rels and len(inc) > 2):
        raise ValueError(f"no canonical layout for {meta['prompt']!r}: only one relation between two groups")
    if not rels:
        items = [(i, r) for i, r in enumerate(inc) for _ in range(r["count"])]
        side = 16.0 if len(items) < 3 else 14.0
        return [obj(r, i, x, y, side) for (i, r), (x, y) in zip(items, _SLOTS[len(items)], strict=True)]
    a, rel, b = rels[0]
    first, second = (a, b) if rel in ("left of", "above") else (b, a)
    objs = []
    for g, across in ((first, 16.0), (second, 48.0)):
        n = inc[g]["count"]
        for along in _LINE[n]:
            x, y = (across, along) if rel in ("left of", "right of") else (along, across)
            objs.append(obj(inc[g], g, x, y, 14.0 if n < 4 else 12.0))
    return objs


_COLORS = list(PALETTE)
_SLOTS = {
    1: [(32, 32)],
    2: [(18, 32), (46, 32)],
    3: [(14, 32), (32, 32), (50, 32)],
    4: [(20, 20), (44, 20), (20, 44), (44, 44)],
}
_LINE = {1: [32], 2: [21, 43], 3: [14, 32, 50], 4: [11, 25, 39, 53]}


# --- instruction phrases; mistakes: each returns (wrong scene, instruction) or None to retry -----


def describe_requirement(req: dict[str, Any], color: str | None = None, plural: bool = False) -> str:
    """"red square(s)" / "square(s)": how instructions name an include's objects."""
    color = color or req.get("color")
    noun = PLURALS[req["class"]] if plural else req["class"]
    return f"{color} {noun}" if color else noun


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def relation_phrase(rel: str) -> str:
    return f"to the {rel}" if rel in ("left of", "right of") else rel


def placement_phrase(inc: list[dict[str, Any]], i: int) -> str:
    """" <relation> the <objects>" placing include `i` against the include it relates to (either
    direction), or "" when it relates to none: where an added object must go."""
    if "position" in inc[i]:
        rel, j = inc[i]["position"][0], int(inc[i]["position"][1])
        return f" {relation_phrase(rel)} the {describe_requirement(inc[j], plural=inc[j]['count'] > 1)}"
    for r in inc:
        if "position" in r and int(r["position"][1]) == i:
            rel = INVERSE_RELATION[r["position"][0]]
            return f" {relation_phrase(rel)} the {describe_requirement(r, plural=r['count'] > 1)}"
    return ""


def _count_variants(meta: dict[str, Any], i: int) -> list[str]:
    r = meta["include"][i]
    out = ["fewer"] if r["count"] >= 2 else []
    if any(
        e["class"] == r["class"] and e["count"] == r["count"] + 1 and "color" not in e
        for e in meta.get("exclude", [])
    ):
        out.append("more")
    return out


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(0, len(items)))]


def _mistake_color(meta, scene, rng):
    inc = meta["include"]
    i = _pick(rng, [i for i, r in enumerate(inc) if "color" in r])
    k = _pick(rng, [k for k, o in enumerate(scene.objects) if o.req == i])
    want = inc[i]["color"]
    new = _pick(rng, [c for c in PALETTE if c != want])
    objs = list(scene.objects)
    objs[k] = replace(objs[k], color=new, rgb=_jitter(new, rng))
    return replace(scene, objects=tuple(objs)), f"change the {new} {inc[i]['class']} to {want}"


def _mistake_count(meta, scene, rng):
    inc = meta["include"]
    i = _pick(rng, [i for i in range(len(inc)) if _count_variants(meta, i)])
    variant = _pick(rng, _count_variants(meta, i))
    mine = [k for k, o in enumerate(scene.objects) if o.req == i]
    if variant == "fewer":
        drop = _pick(rng, mine)
        objs = tuple(o for k, o in enumerate(scene.objects) if k != drop)
        return replace(scene, objects=objs), f"add one more {describe_requirement(inc[i])}"
    color = inc[i].get("color") or scene.objects[mine[0]].color
    objs = _place(
        [(inc[i]["class"], color, i)],
        list(scene.objects),
        _constraints(meta),
        rng,
        scene.size,
        len(scene.objects) + 1,
    )
    if objs is None:
        return None
    return replace(scene, objects=tuple(objs)), f"remove one {describe_requirement(inc[i])}"


def _mistake_position(meta, scene, rng):
    """Put the dependent objects on the wrong side of the target (or the target on the wrong side
    of them): by mirroring them about the other side's centre, else by re-placing them, else by a
    fresh layout; the instruction moves back what was moved."""
    inc = meta["include"]
    i = _pick(rng, [i for i, r in enumerate(inc) if "position" in r])
    rel, j = inc[i]["position"][0], int(inc[i]["position"][1])
    flipped = [(a, INVERSE_RELATION[r] if a == i else r, b) for a, r, b in _constraints(meta)]
    for mover, other, how in ((i, j, rel), (j, i, INVERSE_RELATION[rel])):
        keep = [o for o in scene.objects if o.req != mover]
        pivot = np.mean([(o.cx, o.cy) for o in keep if o.req == other], axis=0)
        axis = 0 if rel in ("left of", "right of") else 1
        mirrored = list(keep)
        for o in scene.objects:
            if o.req == mover:
                c = [o.cx, o.cy]
                c[axis] = 2 * pivot[axis] - c[axis]
                mirrored.append(replace(o, cx=float(c[0]), cy=float(c[1])))
        objs = mirrored if _valid(mirrored, flipped, scene.size) else None
        if objs is None:
            moved = [(o.shape, o.color, o.req) for o in scene.objects if o.req == mover]
            objs = _place(moved, keep, flipped, rng, scene.size, len(scene.objects))
        if objs is not None:
            what = describe_requirement(inc[mover], plural=inc[mover]["count"] > 1)
            where = describe_requirement(inc[other], plural=inc[other]["count"] > 1)
            return replace(scene, objects=tuple(objs)), f"move the {what} {relation_phrase(how)} the {where}"
    # No room beside the kept objects (e.g. three crosses hugging a border): lay out afresh.
    objs = _place(
        [(o.shape, o.color, o.req) for o in scene.objects], [], flipped, rng, scene.size, len(scene.objects)
    )
    if objs is None:
        return None
    what = describe_requirement(inc[i], plural=inc[i]["count"] > 1)
    return replace(scene, objects=tuple(objs)), f"move the {what} {relation_phrase(rel)} the {describe_requirement(inc[j])}"


def _mistake_missing(meta, scene, rng):
    inc = meta["include"]
    i = _pick(rng, [i for i, r in enumerate(inc) if r["count"] == 1])
    gone = next(o for o in scene.objects if o.req == i)
    objs = tuple(o for o in scene.objects if o.req != i)
    color = inc[i].get("color") or gone.color
    what = with_article(f"{color} {inc[i]['class']}")
    return replace(scene, objects=objs), f"add {what}{placement_phrase(inc, i)}"


def _mistake_shape(meta, scene, rng):
    inc = meta["include"]
    used = {r["class"] for r in inc}
    k = int(rng.integers(0, len(scene.objects)))
    old = scene.objects[k]
    new = _pick(rng, [s for s in SHAPES if s not in used])
    objs = list(scene.objects)
    objs[k] = replace(old, shape=new, req=-1)
    return replace(scene, objects=tuple(objs)), f"change the {new} to {with_article(old.shape)}"


_MISTAKES = {
    "color": _mistake_color,
    "count": _mistake_count,
    "position": _mistake_position,
    "missing": _mistake_missing,
    "shape": _mistake_shape,
}
