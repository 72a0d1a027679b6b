"""OCR judge for text rendering (Flow-GRPO's OCR reward) on RapidOCR's PP-OCRv4 ONNX models.

The models ship inside the `rapidocr-onnxruntime` wheel, so nothing is downloaded. The target
text is the first quoted span of the prompt ("..." or “...”), or `metadata["text"]` when given.
Like Flow-GRPO, spaces are removed and case is ignored (both configurable); with L the target's
length and d the edit distance to the recognised text:

    reward = 1                  if the target is contained in the recognised text
             1 - min(d, L) / L  otherwise
"""

from __future__ import annotations

import logging
import re
from typing import Any

from reward.judge_modes import error_result
from reward.vlm_judge import validate_items
from rollout.interfaces import JudgeItem, JudgeResult

__all__ = ["OCRJudge", "extract_target_text", "edit_distance", "ocr_reward"]

log = logging.getLogger(__name__)

_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def extract_target_text(prompt: str) -> str | None:
    """The first non-empty double-quoted span of `prompt` (straight or curly quotes), else None."""
    for m in _QUOTED.finditer(prompt):
        text = m.group(1) or m.group(2)
        if text and text.strip():
            return text
    return None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_reward(recognised: str, target: str) -> float:
    """1 if `target` is in `recognised`, else 1 - min(edit distance, L) / L (L = len(target) > 0)."""
    if not target:
        raise ValueError("target text must be non-empty")
    if target in recognised:
        return 1.0
    length = len(target)
    return 1.0 - min(edit_distance(recognised, target), length) / length


class OCRJudge:
    """Scores how well the quoted text of the prompt is rendered in the image.

    Args:
        case_sensitive: compare letter case (Flow-GRPO: no).
        ignore_spaces: drop all whitespace before comparing (Flow-GRPO: yes).
        min_confidence: recognised lines below this confidence are ignored.
        num_threads: onnxruntime intra-op threads (-1: onnxruntime's default).
    """

    def __init__(
        self,
        *,
        case_sensitive: bool = False,
        ignore_spaces: bool = True,
        min_confidence: float = 0.0,
        num_threads: int = -1,
    ) -> None:
        from rapidocr_onnxruntime import RapidOCR

        self._engine = RapidOCR(intra_op_num_threads=num_threads)
        self._case_sensitive = case_sensitive
        self._ignore_spaces = ignore_spaces
        self._min_confidence = min_confidence

    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item; OCR failures and prompts without quoted text become error results.

        Raises:
            ValueError: an item whose image is not an (H, W, 3) uint8 array.
        """
        validate_items(items)
        return [self._score_one(item) for item in items]

    def _score_one(self, item: JudgeItem) -> JudgeResult:
        target = item.metadata.get("text") or extract_target_text(item.prompt)
        if not target:
            return error_result(f"no quoted target text in prompt {item.prompt!r}")
        try:
            lines = self._read(item.image)
        except Exception as e:  # the OCR engine failed on this image
            log.exception("OCR engine failed")
            return error_result(f"ocr error: {type(e).__name__}: {e}")
        recognised = "".join(lines)
        norm_target, norm_read = self._normalise(target), self._normalise(recognised)
        if not norm_target:
            return error_result(f"target text {target!r} is empty after normalisation")
        score = ocr_reward(norm_read, norm_target)
        details: dict[str, Any] = {"target": target, "recognised": recognised, "lines": lines}
        return JudgeResult(score=score, correct=score >= 1.0, details=details, raw=recognised)

    def _read(self, image) -> list[str]:
        result, _ = self._engine(image[:, :, ::-1].copy())  # RapidOCR expects BGR like OpenCV
        if not result:
            return []
        return [text for _box, text, conf in result if float(conf) >= self._min_confidence]

    def _normalise(self, text: str) -> str:
        if self._ignore_spaces:
            text = re.sub(r"\s+", "", text)
        return text if self._case_sensitive else text.lower()
