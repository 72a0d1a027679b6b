"""The three ways a vision-language judge is asked, shared by the local VLM and the remote client.

- `checklist`: GenEval metadata -> checklist -> one question asking for strict JSON
  `{"correct": 0|1}`; score 1.0 / 0.0. The items the judge lists as `"failed"` (numbers or text)
  become the result's fixes as text (`details["fixes"]`, `rollout.judge_fixes`), for the reflect
  stage's instruction reward.
- `questions`: yes/no questions with expected answers (TIIF's `yn_question_list` /
  `yn_answer_list`) -> one question each; score = fraction answered as expected.
- `vqascore`: "Does this image show {prompt}?" -> P(Yes) from the first answer token's
  log-probs, normalised over yes/no variants in log space (VQAScore, Lin et al. 2024); a smooth
  score. A NaN or +inf log-prob is an error result, never a score.

A backend turns `queries_for(...)` into answers (text, or first-token log-probs for vqascore) and
hands them to the matching `result_from_*`. Model output never raises: it becomes
`JudgeResult(score=0.0, correct=False, error=reason)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from reward.checklist import checklist_items, checklist_text
from reward.verdict_parsing import normalised_yes, parse_json_verdict, parse_yes_no, yes_probability
from rollout.interfaces import JudgeItem, JudgeResult
from rollout.judge_fixes import FIXES_KEY, JudgeFix

__all__ = [
    "JudgeMode",
    "MODES",
    "JudgePrompts",
    "check_mode",
    "queries_for",
    "expected_answers",
    "result_from_checklist",
    "asked_checklist",
    "result_from_answers",
    "result_from_yes_probability",
    "result_from_yes_no_logprobs",
    "result_from_token_logprobs",
    "error_result",
    "failure_kind",
]

JudgeMode = Literal["checklist", "questions", "vqascore"]
MODES: tuple[str, ...] = ("checklist", "questions", "vqascore")

DEFAULT_CHECKLIST_TEMPLATE = (
    'You are a strict judge of generated images. The image was generated for the prompt "{prompt}".\n'
    "Check every item of this list against the image:\n{checklist}\n"
    'Reply with JSON only: {{"correct": 1}} if every item holds, otherwise {{"correct": 0}}. '
    'You may add a short "reason" field, and a "failed" field listing the numbers of the items that do not hold.'
)
DEFAULT_QUESTION_TEMPLATE = "{question} Please answer yes or no."
DEFAULT_VQASCORE_TEMPLATE = 'Does this image show "{prompt}"? Please answer yes or no.'


@dataclass(frozen=True)
class JudgePrompts:
    """Prompt templates (str.format fields in braces; literal braces doubled).

    checklist: fields `{prompt}`, `{checklist}`; question: `{question}`; vqascore: `{prompt}`.
    """

    checklist: str = DEFAULT_CHECKLIST_TEMPLATE
    question: str = DEFAULT_QUESTION_TEMPLATE
    vqascore: str = DEFAULT_VQASCORE_TEMPLATE

    def __post_init__(self) -> None:
        for name, fields in (
            ("checklist", {"prompt": "p", "checklist": "c"}),
            ("question", {"question": "q"}),
            ("vqascore", {"prompt": "p"}),
        ):
            template = getattr(self, name)
            try:
                template.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"prompt template {name!r} = {template!r} is invalid ({e!r}); allowed fields: "
                    f"{sorted(fields)}, literal braces doubled"
                ) from e


def check_mode(mode: str) -> str:
    """Return `mode` or raise ValueError naming the allowed modes."""
    if mode not in MODES:
        raise ValueError(f"unknown judge mode {mode!r}; known: {list(MODES)}")
    return mode


def queries_for(item: JudgeItem, mode: str, prompts: JudgePrompts) -> list[str] | JudgeResult:
    """The texts to ask about `item.image` (one per model call), or an error result for metadata
    the mode cannot use (so one bad item never sinks a served batch)."""
    if mode == "checklist":
        try:
            checklist = checklist_text(item.metadata)
        except (ValueError, TypeError, KeyError) as e:
            return error_result(f"bad GenEval metadata: {e}")
        return [prompts.checklist.format(prompt=item.prompt, checklist=checklist)]
    elif mode == "questions":
        questions, expected = _questions(item)
        if isinstance(questions, str):
            return error_result(questions)
        return [prompts.question.format(question=q.strip()) for q in questions]
    elif mode == "vqascore":
        return [prompts.vqascore.format(prompt=item.prompt)]
    else:
        raise ValueError(f"unknown judge mode {mode!r}; known: {list(MODES)}")


def expected_answers(item: JudgeItem) -> list[bool]:
    """Expected yes(True)/no(False) answers of a questions-mode item (validated by queries_for)."""
    _, expected = _questions(item)
    return list(expected) if not isinstance(expected, str) else []


def result_from_checklist(text: str, items: Sequence[str] = ()) -> JudgeResult:
    """Checklist-mode answer -> result (score 1/0, `details["reason"]`, `details["note"]`, and on a
    wrong image `details["fixes"]`: the failed items as text fixes, numbers looked up in `items`, the
    checklist as asked; numbers outside it are left out)."""
    verdict = parse_json_verdict(text)
    if verdict.error is not None:
        return error_result(verdict.error, raw=text)
    details = {k: v for k, v in (("reason", verdict.reason), ("note", verdict.note)) if v is not None}
    failed = [_item_text(f, items) for f in verdict.failed] if not verdict.correct else []
    if any(failed):
        details[FIXES_KEY] = [JudgeFix(text=t).to_json() for t in dict.fromkeys(t for t in failed if t)]
    return JudgeResult(score=float(verdict.correct), correct=bool(verdict.correct), details=details, raw=text)


def asked_checklist(item: JudgeItem) -> list[str]:
    """The checklist items a checklist-mode query numbered for `item` ([] for metadata it could not use)."""
    try:
        return checklist_items(item.metadata)
    except (ValueError, TypeError, KeyError):
        return []


def _item_text(failed: str, items: Sequence[str]) -> str:
    """A failed entry as the item's text: "2" -> items[1]; text as it is; "" for an unknown number."""
    if failed.isdigit():
        n = int(failed)
        return items[n - 1] if 1 <= n <= len(items) else ""
    return failed


def result_from_answers(answers: Sequence[str], expected: Sequence[bool]) -> JudgeResult:
    """Questions-mode answers -> fraction answered as expected.

    An answer that is neither yes nor no counts as not as expected and is listed in
    `details["unparsed"]`; only when no answer at all can be read is `error` set.
    """
    if len(answers) != len(expected) or not expected:
        return error_result(f"{len(answers)} answers for {len(expected)} questions")
    parsed = [parse_yes_no(a) for a in answers]
    matches = [p is not None and p == e for p, e in zip(parsed, expected, strict=True)]
    raw = "\n".join(answers)
    details = {
        "parsed": parsed,
        "expected": list(expected),
        "unparsed": [i for i, p in enumerate(parsed) if p is None],
    }
    if all(p is None for p in parsed):
        return JudgeResult(0.0, False, details, raw, error="no parseable yes/no answer")
    score = sum(matches) / len(matches)
    return JudgeResult(score=score, correct=all(matches), details=details, raw=raw)


def result_from_yes_probability(p_yes: float | None, raw: str = "", threshold: float = 0.5) -> JudgeResult:
    """VQAScore: score = P(Yes); correct when it exceeds `threshold`."""
    if p_yes is None:
        return error_result("no yes/no token among the answer's first-token log-probs", raw=raw)
    if not math.isfinite(p_yes):
        return error_result(f"judge returned a non-finite score ({p_yes!r})", raw=raw)
    return JudgeResult(
        score=float(p_yes), correct=p_yes > threshold, details={"p_yes": float(p_yes)}, raw=raw
    )


def result_from_yes_no_logprobs(
    yes_logprobs: Sequence[float], no_logprobs: Sequence[float], raw: str = "", threshold: float = 0.5
) -> JudgeResult:
    """VQAScore from the first answer token's log-probs of the yes and the no variants (log space,
    `verdict_parsing.normalised_yes`); a NaN or +inf log-prob gives an error result."""
    try:
        p_yes = normalised_yes(yes_logprobs, no_logprobs)
    except ValueError as e:
        return error_result(f"judge returned a non-finite log-prob: {e}", raw=raw)
    return result_from_yes_probability(p_yes, raw=raw, threshold=threshold)


def result_from_token_logprobs(token_logprobs: Mapping[str, float], raw: str = "", threshold: float = 0.5) -> JudgeResult:
    """As `result_from_yes_no_logprobs`, from decoded token text -> log-prob (a remote endpoint's top log-probs)."""
    try:
        p_yes = yes_probability(token_logprobs)
    except ValueError as e:
        return error_result(f"judge returned a non-finite log-prob: {e}", raw=raw)
    return result_from_yes_probability(p_yes, raw=raw, threshold=threshold)


def error_result(reason: str, raw: str = "") -> JudgeResult:
    """The defined result of a judge that could not score: 0, not correct, `error` = reason."""
    return JudgeResult(score=0.0, correct=False, details={}, raw=raw, error=reason)


def failure_kind(error: str) -> str:
    """Coarse, low-cardinality class of an error text, used as a metric tag."""
    e = error.lower()
    for prefix, kind in (
        ("serve timeout", "timeout"),
        ("timeout", "timeout"),
        ("engine error", "engine"),
        ("ocr error", "engine"),
        ("judge raised", "exception"),
        ("serve error", "exception"),
        ("http", "transport"),
        ("connection", "transport"),
        ("bad response", "transport"),
        ("bad geneval metadata", "input"),
        ("metadata", "input"),
        ("no quoted target", "input"),
    ):
        if e.startswith(prefix):
            return kind
    return "model_output"


def _questions(item: JudgeItem) -> tuple[list[str] | str, list[bool] | str]:
    questions = item.metadata.get("yn_question_list")
    answers = item.metadata.get("yn_answer_list")
    if not isinstance(questions, list) or not questions or not isinstance(answers, list):
        msg = "metadata needs non-empty 'yn_question_list' and 'yn_answer_list' lists"
        return msg, msg
    if len(questions) != len(answers):
        msg = f"{len(questions)} questions but {len(answers)} expected answers"
        return msg, msg
    expected: list[bool] = []
    for a in answers:
        v = str(a).strip().lower()
        if v not in ("yes", "no"):
            msg = f"expected answer {a!r} is not yes/no"
            return msg, msg
        expected.append(v == "yes")
    return [str(q) for q in questions], expected
