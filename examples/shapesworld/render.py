"""ShapesWorld renderer: correct images for any task, and controlled wrong images with the one
edit instruction that fixes them (warm-start data for the generator's edit mode and for the
reasoner's reflect answers).

Pure numpy. Shapes are rasterised at pixel centres from a normalised description (`shape_mask`),
which the judge reuses as its shape templates. Correct scenes come from
`examples.shapesworld.layout` ("random" or "canonical": where objects go, with boxes kept apart
so that objects never merge); a mistake is made the same way in both layouts, on a correct scene.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from examples.shapesworld.layout import (
    Scene,
    correct_scene,
    jitter_color,
    layout_valid,
    place_objects,
    relation_constraints,
)
from examples.shapesworld.tasks import INVERSE_RELATION, PALETTE, PLURALS, SHAPES

__all__ = [
    "Rendering",
    "WRONG_KINDS",
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
_MISTAKE_RESTARTS = 200  # correct scenes tried for one that admits the mistake
_CROSS_ARM = 0.34  # half-width of a cross arm, in half-box units


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
    scene = correct_scene(meta, rng, size, noise, layout)
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
    for _ in range(_MISTAKE_RESTARTS):
        good = correct_scene(meta, rng, size, noise, layout)
        made = _MISTAKES[kind](meta, good, rng)
        if made is not None:
            bad, instruction = made
            return Rendering(draw_scene(bad), bad, kind, instruction, draw_scene(good))
    raise RuntimeError(f"could not place a {kind!r} mistake for {meta['prompt']!r} in {_MISTAKE_RESTARTS} scenes")


# --- shape outlines --------------------------------------------------------------------------------


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
    objs[k] = replace(objs[k], color=new, rgb=jitter_color(new, rng))
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
    objs = place_objects(
        [(inc[i]["class"], color, i)],
        list(scene.objects),
        relation_constraints(meta),
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
    flipped = [(a, INVERSE_RELATION[r] if a == i else r, b) for a, r, b in relation_constraints(meta)]
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
        objs = mirrored if layout_valid(mirrored, flipped, scene.size) else None
        if objs is None:
            moved = [(o.shape, o.color, o.req) for o in scene.objects if o.req == mover]
            objs = place_objects(moved, keep, flipped, rng, scene.size, len(scene.objects))
        if objs is not None:
            what = describe_requirement(inc[mover], plural=inc[mover]["count"] > 1)
            where = describe_requirement(inc[other], plural=inc[other]["count"] > 1)
            return replace(scene, objects=tuple(objs)), f"move the {what} {relation_phrase(how)} the {where}"
    # No room beside the kept objects (e.g. three crosses hugging a border): lay out afresh.
    objs = place_objects(
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
