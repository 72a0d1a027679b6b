"""Multi-round evaluation: per-round/per-category table, and a stop freezes image and score.

Design: docs/design.md#evaluation.
"""

import json

import pytest

from rollout.datasets import PromptRecord
from rollout.evaluation import EvalSettings, evaluate, summarize
from tests.rollout.fakes import PLAIN, FakeGenerator, FakeJudge, FakeReasoner, is_reflect, user_text

STOP = "<think>done</think>No further edit needed."
# prompt -> (plan answer, round-1 answer, round-2 answer); the judge scores the "s=" in the image prompt
SCRIPT = {
    "p0": ("<think>t</think>s=1", STOP, None),
    "p1": ("<think>t</think>s=0", "<think>t</think>fix s=1", STOP),
    "p2": ("<think>t</think>s=0.5", "<think>t</think>fix s=0.25", "<think>t</think>fix s=0.25"),
    "p3": ("<think>t</think>s=0", "<think>t</think>fix s=0", "<think>t</think>fix s=0.5"),
    "p4": ("<think>t</think>s=1", "<think>t</think>fix s=0.5", STOP),
    "p5": ("malformed plan", STOP, None),
    "p6": ("<think>t</think>s=0.5", "<think>t</think>fix s=0.5", "<think>t</think>fix s=1"),
    "p7": ("<think>t</think>s=0.5", "<think>t</think>fix s=1", "<think>t</think>fix s=1"),
}
RECORDS = [
    PromptRecord(p, {"tag": "A" if i < 4 else "B"}, "A" if i < 4 else "B") for i, p in enumerate(SCRIPT)
]


def _script(req, i, call):
    answer = SCRIPT[user_text(req)][call]
    assert answer is not None, f"{user_text(req)} was asked again after it stopped"
    assert is_reflect(req) == (call > 0)
    return answer


def _evaluate():
    gen = FakeGenerator()
    reasoner = FakeReasoner(_script)
    report = evaluate(
        RECORDS, reasoner, gen, FakeJudge(gen), EvalSettings(max_rounds=3, templates=PLAIN, seed=1)
    )
    return report, reasoner, gen


def _cols(rows, *names):
    return [getattr(r, n) for r in rows for n in names]


def _flat(rows):
    return pytest.approx([x for row in rows for x in row])


def test_per_round_table_overall_and_per_category():
    report, _, _ = _evaluate()
    assert report.num_prompts == 8 and report.max_rounds == 3
    overall = report.overall
    assert _cols(overall, "accuracy", "mean_score") == _flat(
        [(0.25, 0.4375), (0.375, 0.53125), (0.5, 0.65625)]
    )
    assert (overall[0].improved, overall[0].worse, overall[0].unchanged) == (None, None, None)
    assert _cols(overall[1:], "improved", "worse", "unchanged") == _flat(
        [(0.25, 0.25, 0.5), (0.25, 0.0, 0.75)]
    )
    assert _cols(overall, "finish_rate", "mean_rounds") == _flat([(0.0, 1.0), (0.25, 1.75), (0.5, 2.25)])
    a, b = report.categories["A"], report.categories["B"]
    assert _cols(a, "accuracy", "mean_score") == _flat([(0.25, 0.375), (0.5, 0.5625), (0.5, 0.6875)])
    assert _cols(b, "accuracy", "mean_score") == _flat([(0.25, 0.5), (0.25, 0.5), (0.5, 0.625)])
    assert _cols(b[1:], "improved", "worse", "unchanged") == _flat([(0.25, 0.25, 0.5), (0.25, 0.0, 0.75)])
    assert _cols(a, "finish_rate", "mean_rounds") == _flat([(0.0, 1.0), (0.25, 1.75), (0.5, 2.25)])
    assert report.category_mean_accuracy == pytest.approx([0.25, 0.375, 0.5])
    assert all(r.n == 4 for r in a + b)


def test_stop_freezes_image_and_score():
    report, reasoner, gen = _evaluate()
    # p0 stopped in round 1, p5 too: they are not asked in round 2 and never edited
    assert sorted(user_text(r) for r in reasoner.calls[2]) == ["p1", "p2", "p3", "p4", "p6", "p7"]
    edited_sources = [r.source_image for r in gen.made if r.source_image is not None]
    p0 = report.trajectories[0]
    assert len(p0.rounds) == 2 and p0.rounds[1].stopped and p0.rounds[1].image is None
    assert not any(src is p0.rounds[0].image.image for src in edited_sources)
    p1 = report.trajectories[1]
    assert [r.score for r in p1.rounds] == [0.0, 1.0, 1.0] and p1.rounds[2].stopped


def test_evaluation_is_deterministic_ode_and_low_temperature():
    first, reasoner, gen = _evaluate()
    second, _, _ = _evaluate()
    assert first.to_json() == second.to_json()
    assert all(s.stochastic == "none" for _, s in gen.calls)
    assert all(r.temperature == 0.1 and r.n == 1 for call in reasoner.calls for r in call)
    assert [(r.seed, r.noise_seed) for r in gen.made] == [(r.seed, r.noise_seed) for r in _evaluate()[2].made]


def test_markdown_and_json_outputs():
    report, _, _ = _evaluate()
    data = json.loads(report.to_json())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["overall"][2]["accuracy"] == 0.5 and set(data["categories"]) == {"A", "B"}
    md = report.to_markdown()
    assert "| overall | 1 | 8 | 0.3750 | 0.5312 | 0.250 | 0.250 | 0.500 | 0.250 | 1.750 |" in md
    assert "| B | 0 | 4 | 0.2500 | 0.5000 | – | – | – | 0.000 | 1.000 |" in md
    assert md.count("\n| A |") == 3


def test_summarize_validates():
    report, _, _ = _evaluate()
    with pytest.raises(ValueError, match="categories"):
        summarize(report.trajectories, ["A"], 3)
    with pytest.raises(ValueError, match="rounds"):
        summarize(report.trajectories, [r.category for r in RECORDS], 1)


def test_judge_errors_are_counted_per_round():
    from dataclasses import replace

    gen = FakeGenerator()
    judge = FakeJudge(gen)
    real = judge.score

    def flaky(items):  # images drawn from "fix s=0.25" (p2, rounds 1 and 2) and from "s=0" (p1, p3) score NaN
        return [replace(r, score=float("nan")) if r.details["made_from"] in ("fix s=0.25", "s=0") else r
                for r in real(items)]

    judge.score = flaky
    report = evaluate(RECORDS, FakeReasoner(_script), gen, judge, EvalSettings(max_rounds=3, templates=PLAIN, seed=1))
    assert [s.errors for s in report.overall] == [2, 1, 1]
    assert [s.errors for s in report.categories["A"]] == [2, 1, 1] and [s.errors for s in report.categories["B"]] == [0] * 3
    p1 = report.trajectories[1]
    assert p1.rounds[0].score == 0.0 and "non-finite" in p1.rounds[0].judge_details["error"]
    assert report.to_dict()["overall"][0]["errors"] == 2
    md = report.to_markdown()
    assert "| finish rate | mean rounds | judge errors |" in md
    assert "| overall | 0 | 8 | 0.2500 | 0.4375 | – | – | – | 0.000 | 1.000 | 2 |" in md


def test_error_free_evaluation_reports_zero_errors():
    report, _, _ = _evaluate()
    assert all(s.errors == 0 for rows in [report.overall, *report.categories.values()] for s in rows)
