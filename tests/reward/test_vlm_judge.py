"""The VLM judge on a real in-process vLLM engine (tiny random Idefics3): the three modes run end to
end and every output, garbage included, maps to a defined result."""

import json
from pathlib import Path

import numpy as np
import pytest

from reward.judge_modes import result_from_checklist
from rollout.interfaces import Judge, JudgeItem

pytestmark = pytest.mark.integration

TIIF = Path(__file__).resolve().parents[2] / "tests" / "data" / "tiif_sample.jsonl"
RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
GENEVAL = {
    "tag": "counting",
    "include": [{"class": "clock", "count": 2}],
    "exclude": [{"class": "clock", "count": 3}],
}


@pytest.fixture(scope="module")
def judge(tiny_models):
    from reward.vlm_judge import VLMJudge

    j = VLMJudge(model_path=str(tiny_models.vlm), mode="checklist", max_tokens=24)
    yield j
    j.shutdown()


def test_checklist_mode(judge):
    assert isinstance(judge, Judge)
    items = [JudgeItem(IMAGES[0], "a photo of two clocks", GENEVAL), JudgeItem(IMAGES[1], "x", {})]
    good, bad = judge.score(items)
    assert good.raw  # the random model wrote something, which is then parsed like any answer
    assert good == result_from_checklist(good.raw)
    assert good.score in (0.0, 1.0) and (good.error is None or good.score == 0.0)
    assert (bad.score, bad.correct) == (0.0, False) and bad.error.startswith("bad GenEval metadata")


def test_questions_mode_on_tiif(judge):
    row = json.loads(TIIF.read_text().splitlines()[1])
    (r,) = judge.with_mode("questions").score([JudgeItem(IMAGES[0], row.get("short_description", "p"), row)])
    assert len(r.details["parsed"]) == len(row["yn_question_list"])
    assert r.details["expected"] == [a.strip().lower() == "yes" for a in row["yn_answer_list"]]
    assert 0.0 <= r.score <= 1.0
    if r.error is not None:
        assert r.error == "no parseable yes/no answer" and r.score == 0.0


def test_vqascore_mode_is_smooth_and_image_dependent(judge):
    vqa = judge.with_mode("vqascore")
    batch = vqa.score([JudgeItem(img, "a photo of a cat") for img in (IMAGES[0], IMAGES[1], IMAGES[0])])
    (single,) = vqa.score([JudgeItem(IMAGES[1], "a photo of a cat")])
    assert all(r.error is None and 0.0 < r.score < 1.0 for r in batch)
    assert batch[0].score == pytest.approx(batch[2].score, abs=1e-6)
    assert batch[1].score == pytest.approx(single.score, abs=1e-5)
    assert batch[0].score != pytest.approx(batch[1].score, abs=1e-9)
    assert batch[0].details == {"p_yes": batch[0].score}


def test_bad_image_and_bad_mode_raise(judge):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        judge.score([JudgeItem(np.zeros((8, 8, 4), np.uint8), "p")])
    with pytest.raises(ValueError, match="unknown judge mode"):
        judge.with_mode("vqa")
