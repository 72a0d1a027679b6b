"""Dense colour rewards on ShapesWorld images.

Rewards that a generator can raise a little with every update (unlike the exact judge's
all-or-nothing verdict): for checking that an RL setting learns at all
(tests/examples/shapesworld/test_shapes_sanity.py) and for measuring how fast each image algorithm
learns (bench/image_learning.py). The `examples.shapesworld` plugin registers them as `judge.kind`:

- `shapes-colour-share`: the share of foreground pixels drawn in the colour(s) the prompt asks for
  (the warm start is already at about 0.9 on the colour prompts: little room to learn);
- `shapes-colour-area`: the share of all pixels drawn in the asked colour(s) (the warm start's canonical
  objects cover a small part of the image: room to grow by drawing more of the asked colour).

Pixels are classified as `examples.shapesworld.judge.ShapesJudge` does (nearest palette colour or the
background, the median of the border).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

SHARE, AREA = "shapes-colour-share", "shapes-colour-area"


class ColourShareJudge:
    """score = pixels of the asked colour(s) / the foreground's pixels (`over="foreground"`) or the
    image's (`over="image"`); 0 without foreground or for a prompt that names no colour.
    `correct`: score >= `correct_at`."""

    def __init__(self, over: Literal["foreground", "image"] = "foreground", correct_at: float = 0.95) -> None:
        from examples.shapesworld.judge import ShapesJudge

        if over not in ("foreground", "image"):
            raise ValueError(f"over={over!r}; allowed: 'foreground', 'image'")
        self.over, self.correct_at = over, correct_at
        self._pixels = ShapesJudge()

    def score(self, items: list[Any]) -> list[Any]:
        return [self._score_one(item) for item in items]

    def _score_one(self, item: Any) -> Any:
        from rollout.interfaces import JudgeResult

        colours = {inc["color"] for inc in item.metadata.get("include", []) if inc.get("color")}
        image = item.image
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                and min(image.shape[:2]) >= 3):  # fmt: skip
            got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
            return JudgeResult(0.0, False, error=f"image must be an (H, W, 3) uint8 array, got {got}")
        cls = self._pixels._classify_pixels(image)  # (H, W): 0 background, k palette colour k - 1
        names = self._pixels._colors
        asked = sum(int((cls == names.index(c) + 1).sum()) for c in colours if c in names)
        total = int((cls > 0).sum()) if self.over == "foreground" else cls.size
        share = asked / total if total else 0.0
        return JudgeResult(float(share), share >= self.correct_at, {"total": total, "asked": asked})
