"""Parsing of reasoner answers: the `<think>…</think>answer` format and the stop phrase.

A plan or reflect answer is well-formed iff it is exactly `<think>…</think>answer` with a
non-empty answer (docs/design.md#answers-and-the-stop-phrase). A reflect answer whose answer
part contains the stop phrase (case-insensitive) is the decision that no edit is needed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["ParsedAnswer", "parse_answer", "is_stop", "STOP_PHRASE"]

STOP_PHRASE = "no further edit needed"
_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


class ParsedAnswer(NamedTuple):
    think: str
    answer: str  # the text after </think>, stripped; the whole text when malformed
    well_formed: bool


def parse_answer(text: str) -> ParsedAnswer:
    """Split `<think>…</think>answer`; malformed when tags are missing, repeated or answer empty."""
    m = _FORMAT.match(text)
    if m is None:
        return ParsedAnswer("", text.strip(), False)
    think, answer = m.group("think"), m.group("answer").strip()
    nested = "<think>" in think or "</think>" in answer or "<think>" in answer
    return ParsedAnswer(think.strip(), answer, bool(answer) and not nested)


def is_stop(answer: str, stop_phrase: str = "no further edit") -> bool:
    """True when the answer says no edit is needed (the stop decision)."""
    return stop_phrase.lower() in answer.lower()
