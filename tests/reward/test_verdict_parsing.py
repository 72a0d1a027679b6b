"""Every malformed judge answer has one defined result (checklist and yes/no parsing, VQAScore)."""

import math

import pytest

from reward.judge_modes import result_from_answers, result_from_checklist, result_from_yes_probability
from reward.verdict_parsing import normalised_yes, parse_yes_no, yes_probability

OK1 = ("ok", 1.0, True)
OK0 = ("ok", 0.0, False)


def err(fragment):
    return ("error", 0.0, False, fragment)


# (model output, expected outcome) — outcome ("ok", score, correct) or ("error", 0, False, msg part)
CHECKLIST_CASES = [
    ('{"correct": 1}', OK1),
    ('{"correct": 0, "reason": "no dog"}', OK0),
    ('```json\n{"correct": 1}\n```', OK1),
    ('```\n{"correct": 0}\n```', OK0),
    ('Sure! Here is my verdict: {"correct": 1} Hope this helps.', OK1),
    ('<think>I see {two} clocks</think>{"correct": 1}', OK1),
    ('{"Correct": 1}', OK1),
    ('{"correct": true}', OK1),
    ('{"correct": "0"}', OK0),
    ("{'correct': 1, 'reason': 'fine'}", OK1),
    ('{"correct": 1, "reason": "the dog is on the le', ("ok", 1.0, True)),
    ('{"reason": "the dog is on the left", "corr', err("truncated JSON")),
    ('{"answer": 1}', err("missing key 'correct'")),
    ('{"verdict": {"correct": 1}}', err("missing key 'correct'")),
    ('{"correct": 2}', err("not 0 or 1")),
    ('{"correct": 0.7}', err("not 0 or 1")),
    ('{"correct": null}', err("not 0 or 1")),
    ('{"correct": 1} {"correct": 0}', err("conflicting verdicts")),
    ('{"correct": 1} and again {"correct": 1}', OK1),
    ('[{"correct": 1}]', OK1),
    ("[1, 0]", err("JSON array")),
    ("The image shows two clocks, so it is correct.", err("no JSON object")),
    ("", err("empty output")),
    ("   \n ", err("empty output")),
    ("\ufffd\ufffdp af are", err("no JSON object")),
    ("{correct: 1}", err("no JSON object")),
]


@pytest.mark.parametrize(("text", "expected"), CHECKLIST_CASES)
def test_checklist_output_has_defined_result(text, expected):
    r = result_from_checklist(text)
    assert r.raw == text
    assert (r.score, r.correct) == expected[1:3]
    if expected[0] == "ok":
        assert r.error is None
    else:
        assert r.error is not None and expected[3] in r.error


def test_at_least_fifteen_malformed_cases():
    malformed = [
        t for t, e in CHECKLIST_CASES if t not in ('{"correct": 1}', '{"correct": 0, "reason": "no dog"}')
    ]
    assert len(malformed) >= 15


def test_salvaged_and_reason_details():
    r = result_from_checklist('{"correct": 1, "reason": "the dog is on the le')
    assert r.details["note"] == "salvaged from truncated JSON"
    assert r.details["reason"] == "the dog is on the le"
    assert result_from_checklist('{"correct": 0, "reason": "no dog"}').details == {"reason": "no dog"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", True),
        ("no.", False),
        ("  YES, there is a cat", True),
        ("No, but there is a yes sign", False),
        ("I think the answer is yes", True),
        ("<think>no idea</think>Yes", True),
        ("maybe", None),
        ("the answer is yes or no", None),
        ("", None),
        ("\ufffdare a", None),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_questions_fraction_and_unparsed():
    r = result_from_answers(["Yes", "garbage", "no"], [True, True, True])
    assert r.score == pytest.approx(1 / 3) and not r.correct and r.error is None
    assert r.details["unparsed"] == [1]
    r = result_from_answers(["yes", "No"], [True, False])
    assert (r.score, r.correct) == (1.0, True)
    r = result_from_answers(["af", "are"], [True, False])
    assert (r.score, r.correct, r.error) == (0.0, False, "no parseable yes/no answer")
    assert result_from_answers(["yes"], [True, False]).error == "1 answers for 2 questions"


def test_yes_probability_normalises_over_variants():
    lps = {"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2), "maybe": math.log(0.4)}
    assert yes_probability(lps) == pytest.approx(0.4 / 0.6)
    assert yes_probability({"maybe": 0.0}) is None
    assert normalised_yes([-math.inf], [-math.inf]) is None
    assert normalised_yes([math.log(0.2)], []) == pytest.approx(1.0)


def test_vqascore_result():
    r = result_from_yes_probability(0.8, raw="Yes")
    assert (r.score, r.correct, r.error, r.details) == (0.8, True, None, {"p_yes": 0.8})
    r = result_from_yes_probability(None, raw="af")
    assert (r.score, r.correct) == (0.0, False) and "no yes/no token" in r.error


def test_normalised_yes_is_computed_in_log_space():
    # hand-computed: P(Yes) = sigmoid(Y - N) with Y, N the logsumexp of each side
    assert normalised_yes([math.log(0.3), math.log(0.1)], [math.log(0.2)]) == pytest.approx(0.4 / 0.6, abs=1e-12)
    # log-probs far above 709 overflowed math.exp before; in log space only the difference matters
    assert normalised_yes([1000.0], [999.0]) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-12)
    assert normalised_yes([-1000.0], [-1001.0, -1001.0]) == pytest.approx(1 / (1 + 2 * math.exp(-1.0)), abs=1e-12)
    assert normalised_yes([-800.0], [0.0]) == pytest.approx(math.exp(-800.0), rel=1e-9)  # no underflow to 0
    assert normalised_yes([-math.inf], [math.log(0.5)]) == 0.0
    assert normalised_yes([], [math.log(0.5)]) == 0.0
    assert normalised_yes([math.log(0.5)], [-math.inf]) == 1.0
    assert normalised_yes([], []) is None


@pytest.mark.parametrize(("yes", "no"), [([math.inf], [math.log(0.5)]), ([math.nan], [0.0]),
                                         ([math.log(0.5)], [math.inf]), ([0.0], [math.log(0.1), math.nan])])
def test_nan_or_plus_inf_log_probs_are_refused_not_scored(yes, no):
    with pytest.raises(ValueError, match="non-finite yes/no log-prob"):
        normalised_yes(yes, no)
    with pytest.raises(ValueError, match="non-finite"):
        yes_probability({"Yes": yes[0], "No": no[-1]})
