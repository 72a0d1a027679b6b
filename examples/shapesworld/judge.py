"""Exact ShapesWorld judge: colour segmentation, connected components, template shape
classification, then GenEval's rules on counts, colours and relative positions.

Pipeline per image (H, W, 3) uint8:
1. every pixel takes the nearest of {background, palette colours} (background = median of the
   border pixels; pixels farther than `color_distance` from all of them are ignored);
2. same-colour pixels form 8-connected components; a component counts as an object when it has
   at least `min_area` pixels and one pixel whose 3 × 3 neighbourhood is all that colour (thin
   anti-aliasing rims of blurry generated images are not objects);
3. its shape is the template (`examples.shapesworld.render.shape_mask_uv`, fitted to the component's
   box) with the highest IoU, `None` below `min_iou`;
4. GenEval's evaluation: an include needs ≥ count objects of its class; with a colour, ≥ count of
   them in that colour (GenEval asks the top-count detections to have it; colour is part of an
   object's identity here, so any count of them will do); a position needs every matched object
   to stand in the relation (GenEval's `relative_position` on boxes) to every object matched by
   the target include, which must itself be matched; an exclude forbids ≥ count of its class.
   Matched objects are the largest ones (GenEval takes the most confident detections).

`score` = fraction of checklist items satisfied (count, colour, position per include; one per
exclude); `correct` = all satisfied, i.e. GenEval's verdict. Given `fix_of` (the plugin's judge
passes `examples.shapesworld.fixes.fixing_edit`), a wrong image's result also names the edit that
would fix it (`details["fixes"]`, `rollout.judge_fixes`), for the reflect stage's instruction reward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from examples.shapesworld.render import shape_mask_uv
from examples.shapesworld.tasks import (
    PALETTE,
    POSITION_THRESHOLD,
    SHAPES,
    metadata_for_prompt,
    relative_position,
)
from rollout.interfaces import JudgeItem, JudgeResult
from rollout.judge_fixes import FIXES_KEY, JudgeFix

__all__ = ["Detection", "ShapesJudge", "build_shapes_judge", "evaluate_detections"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One object found; `box` = (x0, y0, x1, y1) with exclusive ends, in pixels."""

    shape: str | None
    color: str
    box: tuple[int, int, int, int]
    area: int
    iou: float


class ShapesJudge:
    """Implements `rollout.interfaces.Judge` for ShapesWorld tasks (GenEval-format metadata).

    Never raises on bad input: an image that is not (H, W, 3) uint8, or metadata that is neither
    GenEval-format nor recoverable from a ShapesWorld prompt, gives score 0 with `error` set.
    """

    def __init__(
        self,
        *,
        min_area: int = 12,
        min_iou: float = 0.5,
        color_distance: float = 120.0,
        position_threshold: float = POSITION_THRESHOLD,
        fix_of: Callable[[dict[str, Any], list[Detection]], JudgeFix | None] | None = None,
    ) -> None:
        if min_area < 1 or not 0.0 <= min_iou < 1.0 or color_distance <= 0 or position_threshold < 0:
            raise ValueError(
                f"min_area={min_area}, min_iou={min_iou}, color_distance={color_distance}, "
                f"position_threshold={position_threshold}; need min_area >= 1, 0 <= min_iou < 1, "
                "color_distance > 0, position_threshold >= 0"
            )
        self.min_area = min_area
        self.min_iou = min_iou
        self.color_distance = color_distance
        self.position_threshold = position_threshold
        self.fix_of = fix_of
        self._colors = list(PALETTE)
        self._rgb = np.array([PALETTE[c] for c in self._colors], dtype=np.float32)  # (K, 3)

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item; details = {"tag", "detections", "checklist"} (+ "fixes" with `fix_of`)."""
        return [self._score_one(item) for item in items]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Objects in a (H, W, 3) uint8 image, largest first.

        Raises:
            ValueError: the image is not (H, W, 3) uint8 with H, W >= 3.
        """
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
            raise ValueError(f"image must be an (H, W, 3) uint8 array, got {got}")
        if min(image.shape[:2]) < 3:
            raise ValueError(f"image of shape {image.shape} is too small; need H, W >= 3")
        cls = self._classify_pixels(image)
        labels = _label_components(cls)
        core = _core(cls)
        dets = []
        for lab in np.unique(labels[labels >= 0]):
            mask = labels == lab
            area = int(mask.sum())
            if area < self.min_area or not core[mask].any():
                continue
            color = self._colors[int(cls[mask][0]) - 1]
            shape, iou, box = self._classify_shape(mask)
            dets.append(Detection(shape, color, box, area, iou))
        dets.sort(key=lambda d: -d.area)
        return dets

    # -- helpers --------------------------------------------------------------------------------

    def _score_one(self, item: JudgeItem) -> JudgeResult:
        try:
            meta = item.metadata if item.metadata.get("include") else metadata_for_prompt(item.prompt)
            dets = self.detect(item.image)
            correct, score, checklist = evaluate_detections(meta, dets, self.position_threshold)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            logger.debug("shapes judge could not score %r: %s", item.prompt, e)
            return JudgeResult(0.0, False, {}, error=f"{type(e).__name__}: {e}")
        details = {
            "tag": meta.get("tag", ""),
            "detections": [asdict(d) for d in dets],
            "checklist": checklist,
        }
        fix = None if correct or self.fix_of is None else self.fix_of(meta, dets)
        if fix is not None:
            details[FIXES_KEY] = [fix.to_json()]
        return JudgeResult(score, correct, details)

    def _classify_pixels(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int: 0 = background or unknown, k = palette colour k - 1."""
        img = image.astype(np.float32)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H + 2W, 3)
        centres = np.concatenate([np.median(border, axis=0)[None], self._rgb])  # (K + 1, 3)
        # |x - c|² = |x|² - 2 x·c + |c|²; the |x|² term does not change the argmin.
        rel = (centres**2).sum(-1) - 2.0 * img @ centres.T  # (H, W, K + 1)
        cls = rel.argmin(-1)
        far = rel.min(-1) + (img**2).sum(-1) > self.color_distance**2
        cls[far] = 0
        return cls

    def _classify_shape(self, mask: np.ndarray) -> tuple[str | None, float, tuple[int, int, int, int]]:
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        h, w = mask.shape
        wx0, wy0, wx1, wy1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w), min(y1 + 1, h)
        window = mask[wy0:wy1, wx0:wx1]
        cx, cy = (x0 + x1) / 2 - wx0, (y0 + y1) / 2 - wy0
        best, best_iou = None, -1.0
        for grow in _TEMPLATE_GROWTH:  # pixel-centre sampling makes the box up to 1 px short
            u = ((np.arange(wx1 - wx0) + 0.5 - cx) / ((x1 - x0 + grow) / 2))[None, :]  # (1, w)
            v = ((np.arange(wy1 - wy0) + 0.5 - cy) / ((y1 - y0 + grow) / 2))[:, None]  # (h, 1)
            for shape in SHAPES:
                t = shape_mask_uv(shape, u, v)
                iou = float((t & window).sum() / max((t | window).sum(), 1))
                if iou > best_iou:
                    best, best_iou = shape, iou
        return (best if best_iou >= self.min_iou else None), round(best_iou, 4), (x0, y0, x1, y1)


def evaluate_detections(
    meta: dict[str, Any], dets: list[Detection], position_threshold: float = POSITION_THRESHOLD
) -> tuple[bool, float, list[dict[str, Any]]]:
    """GenEval's verdict on detections, plus partial credit: (correct, score, checklist)."""
    checklist: list[dict[str, Any]] = []

    def check(item: str, ok: bool, reason: str) -> None:
        checklist.append({"item": item, "passed": bool(ok), "reason": "" if ok else reason})

    groups: list[list[Detection] | None] = []
    for req in meta["include"]:
        cls, n, color = req["class"], int(req["count"]), req.get("color")
        of_class = [d for d in dets if d.shape == cls]
        matched = len(of_class) >= n
        check(f"{n} {cls}", matched, f"expected {cls} >= {n}, found {len(of_class)}")
        found = of_class
        if color is not None:
            found = [d for d in of_class if d.color == color]
            ok = len(found) >= n
            check(
                f"{color} {cls}", ok, f"expected {color} {cls} >= {n}, found {len(found)} of {len(of_class)}"
            )
            matched = matched and ok
        found = found[:n]
        if "position" in req:
            rel, j = req["position"][0], int(req["position"][1])
            target = groups[j] if j < len(groups) else None
            if not matched or target is None:
                ok, why = False, f"no {cls} or no target for {cls} to be {rel}"
            else:
                bad = [
                    (a.box, b.box)
                    for a in found
                    for b in target
                    if rel not in relative_position(a.box, b.box, position_threshold)
                ]
                ok, why = not bad, f"expected {cls} {rel} target, boxes {bad[:1]}"
            check(f"{cls} {rel} #{j}", ok, why)
            matched = matched and ok
        groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        cls, n, color = req["class"], int(req["count"]), req.get("color")
        k = sum(1 for d in dets if d.shape == cls and (color is None or d.color == color))
        check(f"fewer than {n} {cls}", k < n, f"expected {cls} < {n}, found {k}")
    passed = sum(c["passed"] for c in checklist)
    return passed == len(checklist), passed / max(len(checklist), 1), checklist


def build_shapes_judge(**kwargs: Any) -> ShapesJudge:
    """Factory for the judge registry (config string "shapes"); kwargs go to `ShapesJudge`."""
    return ShapesJudge(**kwargs)


# --- image helpers -----------------------------------------------------------------------------

_TEMPLATE_GROWTH = (0.0, 0.5, 1.0)
_SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(a: np.ndarray, dy: int, dx: int, fill: int) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx], `fill` outside."""
    p = np.pad(a, 1, constant_values=fill)
    h, w = a.shape
    return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _label_components(cls: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-zero class: (H, W) label = the component's smallest
    flat pixel index, -1 elsewhere. Min-label propagation with pointer jumping (a pixel's label
    is a pixel of its own component, so label-of-label is valid and only ever smaller)."""
    h, w = cls.shape
    fg = cls > 0
    sentinel = cls.size
    same = [(_shifted(cls, dy, dx, 0) == cls) & fg for dy, dx in _SHIFTS]
    lab = np.where(fg, np.arange(cls.size).reshape(h, w), sentinel)
    padded = np.full((h + 2, w + 2), sentinel)
    while True:
        padded[1:-1, 1:-1] = lab
        new = lab.copy()
        for (dy, dx), ok in zip(_SHIFTS, same, strict=True):
            np.minimum(new, np.where(ok, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], sentinel), out=new)
        new = np.append(new.ravel(), sentinel)[new]  # pointer jumping
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, lab, -1)


def _core(cls: np.ndarray) -> np.ndarray:
    """Pixels whose whole 3 × 3 neighbourhood has their (non-zero) class."""
    ok = cls > 0
    for dy, dx in _SHIFTS:
        ok &= _shifted(cls, dy, dx, 0) == cls
    return ok
