"""OCR judge on RapidOCR's packaged PP-OCRv4 models: exact read, one-letter change, blank image."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from reward.ocr_judge import OCRJudge, edit_distance, extract_target_text, ocr_reward
from rollout.interfaces import JudgeItem


def render(text: str, size: int = 256) -> np.ndarray:
    """Black text on white, 256 px, Pillow's bundled font (no system font needed)."""
    img = Image.new("RGB", (size, size), "white")
    font = ImageFont.load_default(size=40)
    ImageDraw.Draw(img).text((20, 100), text, fill="black", font=font)
    return np.asarray(img)


@pytest.fixture(scope="module")
def judge():
    return OCRJudge(num_threads=1)


def test_pure_helpers():
    assert extract_target_text('a sign that says "OPEN 24h" on a door') == "OPEN 24h"
    assert extract_target_text("a neon “Café” sign") == "Café"
    assert extract_target_text('no quotes "" here') is None
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert ocr_reward("xxhelloxx", "hello") == 1.0
    assert ocr_reward("hella", "hello") == pytest.approx(0.8)
    assert ocr_reward("", "hello") == 0.0
    assert ocr_reward("completely different text", "hi") == 0.0


def test_reads_rendered_text_exactly(judge):
    (r,) = judge.score([JudgeItem(render("HELLO"), 'a poster with the words "HELLO"')])
    assert r.error is None, r.error
    assert r.details["recognised"].replace(" ", "").upper() == "HELLO"
    assert (r.score, r.correct) == (1.0, True)


def test_one_letter_change_scores_by_formula(judge):
    (r,) = judge.score([JudgeItem(render("HELLA"), 'a poster with the words "HELLO"')])
    assert r.error is None
    assert 0.0 < r.score < 1.0
    assert r.score == pytest.approx(1 - 1 / 5)
    assert not r.correct


def test_blank_image_scores_zero_and_missing_target_is_an_error(judge):
    blank = np.full((256, 256, 3), 255, np.uint8)
    r, bad = judge.score([JudgeItem(blank, 'a poster "HELLO"'), JudgeItem(blank, "no quotes at all")])
    assert (r.score, r.correct, r.error, r.details["recognised"]) == (0.0, False, None, "")
    assert bad.score == 0.0 and "no quoted target text" in bad.error


def test_metadata_text_overrides_prompt_and_bad_image_raises(judge):
    (r,) = judge.score([JudgeItem(render("WORLD"), "anything", {"text": "world"})])
    assert r.score == 1.0
    with pytest.raises(ValueError, match="uint8"):
        judge.score([JudgeItem(np.zeros((8, 8), np.float32), '"x"')])
