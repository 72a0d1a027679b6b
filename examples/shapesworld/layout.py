"""ShapesWorld layouts: where a correct scene's objects go and what colour they are.

Two layouts (`LAYOUTS`). "random": random sizes, places, colour jitter and background tint (the
judge's and the reasoner's test bed). "canonical" (`canonical_objects`): each object's place, size
and colour follow from the task's structure alone, on a fixed grey background, so a prompt has
exactly one image. In both, every object's box keeps `GAP` pixels clear of the others and `MARGIN`
of the border, and relations hold with a margin over GenEval's rule (`relative_position` at
threshold 0.2 instead of 0.1) so that one-pixel measurement errors cannot flip them.
`examples.shapesworld.render` draws the scenes and derives the controlled mistakes from them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from examples.shapesworld.tasks import PALETTE, SHAPES, relative_position

__all__ = [
    "ShapeObject",
    "Scene",
    "LAYOUTS",
    "MARGIN",
    "GAP",
    "CANONICAL_BACKGROUND",
    "correct_scene",
    "canonical_objects",
    "place_objects",
    "layout_valid",
    "relation_constraints",
    "jitter_color",
]

MARGIN = 2  # pixels of pure background along the border
GAP = 2  # pixels between any two object boxes
_ROBUST_THRESHOLD = 0.2  # placement margin over GenEval's 0.1
LAYOUTS: tuple[str, ...] = ("random", "canonical")
CANONICAL_BACKGROUND = (225, 225, 225)
_RESTARTS = 200  # fresh layouts tried before giving up on a task
_TRIES_PER_OBJECT = 60


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


def jitter_color(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(PALETTE[color]) + rng.integers(-10, 11, size=3)
    return tuple(int(c) for c in np.clip(base, 0, 255))


def _size_range(size: int, n_objects: int) -> tuple[float, float]:
    hi = 0.3 if n_objects <= 2 else 0.26 if n_objects <= 4 else 0.22
    return 0.2 * size, hi * size


def relation_constraints(meta: dict[str, Any]) -> list[tuple[int, str, int]]:
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


def layout_valid(objs: list[ShapeObject], rels: list[tuple[int, str, int]], size: int) -> bool:
    return all(_fits(o, objs[:k], rels, size) for k, o in enumerate(objs))


def place_objects(
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
                out.append(replace(obj, rgb=jitter_color(color, rng)))
                break
        else:
            return None
    return out


def correct_scene(
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
        objs = place_objects(todo, [], relation_constraints(meta), rng, size, n_total)
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

    rels = relation_constraints(meta)
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
