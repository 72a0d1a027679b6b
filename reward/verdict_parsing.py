"""Turn a judge model's free text into a verdict, never raising on what the model wrote.

Judges (local VLMs, remote 72B models) are asked for strict JSON `{"correct": 0|1}` or a plain
yes/no, and answer with fences, prose, wrong keys, truncated objects or garbage. Every such shape
has one defined outcome here, tested in `tests/reward/test_verdict_parsing.py`:

- a verdict (`correct` True/False), possibly with `reason`, the checklist items it names as
  `failed` (numbers or text, as written), and a `note` on how it was recovered
  (e.g. `"salvaged from truncated JSON"`), or
- `error` set to a short reason and `correct` None.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "Verdict",
    "parse_json_verdict",
    "parse_yes_no",
    "yes_probability",
    "normalised_yes",
    "YES_VARIANTS",
    "NO_VARIANTS",
]

YES_VARIANTS: tuple[str, ...] = ("Yes", "yes", "YES", " Yes", " yes", " YES")
NO_VARIANTS: tuple[str, ...] = ("No", "no", "NO", " No", " no", " NO")

_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)(```|$)", re.DOTALL)
_SALVAGE_RE = re.compile(r"""["']?correct["']?\s*:\s*["']?(true|false|1|0|yes|no)\b""", re.IGNORECASE)
_REASON_RE = re.compile(r"""["']reason["']\s*:\s*["']([^"']*)""", re.IGNORECASE)
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


@dataclass(frozen=True)
class Verdict:
    """Outcome of parsing one judge answer. Exactly one of `correct` / `error` is None."""

    correct: bool | None
    reason: str | None = None
    note: str | None = None
    error: str | None = None
    failed: tuple[str, ...] = ()  # the object's optional "failed" field: item numbers or texts, as strings


def parse_json_verdict(text: str, key: str = "correct") -> Verdict:
    """Parse a `{"correct": 0|1, "reason": ...}` verdict from a judge's text.

    Accepted: bare JSON, JSON in ``` fences, JSON surrounded by prose or after a `<think>`
    block, Python-style single quotes, the key in any letter case, values 0/1, true/false,
    "0"/"1"/"yes"/"no". A truncated object whose verdict key is complete is salvaged (note set).
    Everything else (no object, missing key, value out of range, conflicting objects, arrays,
    nested verdicts) gives `error`.
    """
    if not isinstance(text, str) or not text.strip():
        return Verdict(None, error="empty output")
    body = _THINK_RE.sub("", text).strip()
    fenced = [m.group(1) for m in _FENCE_RE.finditer(body)]
    candidates = fenced or [body]
    objects: list[object] = []
    truncated = False
    for chunk in candidates:
        found, chunk_truncated = _extract_objects(chunk)
        objects.extend(found)
        truncated = truncated or chunk_truncated
    if objects:
        return _verdict_from_objects(objects, key)
    if truncated:
        m = _SALVAGE_RE.search(body)
        if m and key == "correct":
            reason = _REASON_RE.search(body)
            return Verdict(
                m.group(1).lower() in _TRUE,
                reason=reason.group(1) if reason else None,
                note="salvaged from truncated JSON",
            )
        return Verdict(None, error="truncated JSON without a complete verdict")
    if body.lstrip().startswith("["):
        return Verdict(None, error="JSON array instead of an object")
    return Verdict(None, error="no JSON object in output")


def parse_yes_no(text: str) -> bool | None:
    """Read a yes/no answer: the first word if it is yes/no, else a lone yes or no in the text.

    Returns None when neither word appears, when both appear (after the first word is not one of
    them), or for empty text.
    """
    if not isinstance(text, str):
        return None
    body = _THINK_RE.sub("", text).strip().lower()
    words = re.findall(r"[a-z]+", body)
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes == has_no:
        return None
    return has_yes


def yes_probability(token_logprobs: Mapping[str, float]) -> float | None:
    """P(Yes) normalised over the yes/no variants present: sum_yes / (sum_yes + sum_no).

    Args:
        token_logprobs: decoded token text -> log-probability at the answer's first position
            (tokens that are neither a yes nor a no variant are ignored).

    Returns:
        The probability in [0, 1], or None when no variant is present or all are -inf.

    Raises:
        ValueError: a variant's log-prob is NaN or +inf (`normalised_yes`).
    """
    yes = [token_logprobs[t] for t in YES_VARIANTS if t in token_logprobs]
    no = [token_logprobs[t] for t in NO_VARIANTS if t in token_logprobs]
    return normalised_yes(yes, no)


def normalised_yes(yes_logprobs: Iterable[float], no_logprobs: Iterable[float]) -> float | None:
    """sum(exp(yes)) / (sum(exp(yes)) + sum(exp(no))), computed in log space so it cannot overflow:
    with Y, N the logsumexp of each side, P(Yes) = sigmoid(Y − N). A −inf log-prob is probability 0.

    Returns None when both sides are empty or all −inf (no yes/no token was seen).

    Raises:
        ValueError: a log-prob is NaN or +inf (the engine returned garbage; callers make it an error result).
    """
    yes, no = list(yes_logprobs), list(no_logprobs)
    bad = [lp for lp in yes + no if math.isnan(lp) or lp == math.inf]
    if bad:
        raise ValueError(f"non-finite yes/no log-prob {bad[0]!r}")
    y, n = _logsumexp(yes), _logsumexp(no)
    if y == n == -math.inf:
        return None
    d = y - n  # +inf when only yes variants have mass, -inf when only no variants do
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    return math.exp(d) / (1.0 + math.exp(d))


def _logsumexp(logprobs: list[float]) -> float:
    """log(sum(exp(x))) without overflow; -inf for no terms (or only -inf terms)."""
    finite = [lp for lp in logprobs if lp != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(lp - top) for lp in finite))


def _extract_objects(text: str) -> tuple[list[object], bool]:
    """All top-level `{...}` spans that parse as JSON (or Python literals); flags an unclosed one."""
    objects: list[object] = []
    i, n = 0, len(text)
    while i < n:
        start = text.find("{", i)
        if start < 0:
            return objects, False
        end = _matching_brace(text, start)
        if end is None:
            return objects, True
        span = text[start : end + 1]
        parsed = _loads(span)
        if parsed is not None:
            objects.append(parsed)
        i = end + 1
    return objects, False


def _matching_brace(text: str, start: int) -> int | None:
    depth, quote, escaped = 0, None, False
    for j in range(start, len(text)):
        ch = text[j]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def _loads(span: str) -> object | None:
    try:
        return json.loads(span)
    except (json.JSONDecodeError, ValueError):
        pass
    try:
        return ast.literal_eval(span)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _verdict_from_objects(objects: list[object], key: str) -> Verdict:
    verdicts: list[Verdict] = []
    for obj in objects:
        if not isinstance(obj, dict):
            continue
        matches = [k for k in obj if isinstance(k, str) and k.lower() == key.lower()]
        if not matches:
            continue
        value = obj[matches[0]]
        correct = _as_bool(value)
        if correct is None:
            verdicts.append(Verdict(None, error=f"value {value!r} of {key!r} is not 0 or 1"))
            continue
        reason = obj.get("reason")
        verdicts.append(Verdict(correct, reason=str(reason) if reason is not None else None,
                                failed=_failed_items(obj)))
    if not verdicts:
        keys = sorted({str(k) for o in objects if isinstance(o, dict) for k in o})
        return Verdict(None, error=f"missing key {key!r} (keys: {keys})")
    good = [v for v in verdicts if v.error is None]
    if not good:
        return verdicts[0]
    if len({v.correct for v in good}) > 1:
        return Verdict(None, error="conflicting verdicts")
    return good[0]


def _failed_items(obj: Mapping[str, object]) -> tuple[str, ...]:
    """The "failed" field (any letter case): a list of item numbers or texts, or one of them; else ()."""
    keys = [k for k in obj if isinstance(k, str) and k.lower() == "failed"]
    value = obj[keys[0]] if keys else ()
    values = value if isinstance(value, list) else [value]
    return tuple(str(v).strip() for v in values
                 if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip())


def _as_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None
