"""How well a reflect answer's edit instruction names the fix the judge would make, in [0, 1].

Design: docs/design.md#instruction-reward. The paper rewards a reflect answer only by the score
change its edit brings (Δ, `reward.shaping`); an editor that botches a right instruction makes that
signal noisy. Judges that can name the fix (`rollout.judge_fixes`) allow a denser one: does the
instruction ask for that fix? Pure functions of strings, no torch.

Components of one (instruction, fix) pair, each in [0, 1], None when the fix does not define it:
- kind:      1 if the instruction's edit verb is of the fix's kind (add/change/move/remove), else 0;
- object:    share of the fix object's words found in the instruction;
- attribute: share of the fix attribute's words found in the instruction;
- text:      only for a fix given as text alone (a failed checklist item): share of its words found.
score = mean of the defined components. Against several fixes the best-scoring one counts (the
instruction need only fix one thing per round). Words: lower-case letters, simple plurals folded to the
singular, filler words (articles, "to", "of", "one", "more", ..., and the "the image contains at
least" of checklist items) not counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from rollout.judge_fixes import JudgeFix

__all__ = [
    "EDIT_VERBS",
    "InstructionMatch",
    "instruction_kind",
    "content_words",
    "match_fix",
    "best_match",
    "instruction_match_metrics",
]

EDIT_VERBS: dict[str, str] = {
    **dict.fromkeys(("add", "put", "place", "insert", "draw", "include"), "add"),
    **dict.fromkeys(("change", "make", "turn", "recolor", "recolour", "color", "colour", "paint", "replace",
                     "convert", "swap"), "change"),
    **dict.fromkeys(("move", "shift", "slide", "relocate"), "move"),
    **dict.fromkeys(("remove", "delete", "erase", "rid", "drop"), "remove"),
}
_FILLER = frozenset(
    "a an the one more some to of in on at into onto it its so that and with by from"  # glue words
    " image photo picture there is are be should show contain least".split()  # how checklist items are phrased
)
_WORD = re.compile(r"[a-z]+")


class InstructionMatch(NamedTuple):
    kind: float | None
    object: float | None
    attribute: float | None
    text: float | None
    score: float


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    return [_singular(w) for w in _WORD.findall(text.lower())]


def content_words(text: str) -> set[str]:
    """The words of `text` that a match counts: singular, lower-case, filler words left out."""
    return {w for w in _words(text) if w not in _FILLER}


def instruction_kind(instruction: str) -> str | None:
    """The edit kind of the first edit verb in `instruction` ("make the square blue" -> "change"); None if none."""
    return next((EDIT_VERBS[w] for w in _WORD.findall(instruction.lower()) if w in EDIT_VERBS), None)


def _share(wanted: str, found: set[str]) -> float | None:
    words = content_words(wanted)
    return len(words & found) / len(words) if words else None


def match_fix(instruction: str, fix: JudgeFix) -> InstructionMatch:
    """The components and score of `instruction` against one fix (module docstring)."""
    found = content_words(instruction)
    kind = None if fix.kind is None else float(instruction_kind(instruction) == fix.kind)
    obj, attr = _share(fix.object, found), _share(fix.attribute, found)
    structured = fix.kind is not None or obj is not None or attr is not None
    text = None if structured else _share(fix.text, found)
    parts = [c for c in (kind, obj, attr, text) if c is not None]
    return InstructionMatch(kind, obj, attr, text, sum(parts) / len(parts) if parts else 0.0)


def best_match(instruction: str, fixes: Sequence[JudgeFix]) -> InstructionMatch | None:
    """The best-scoring match over `fixes` (first on ties); None when the judge named no fix."""
    matches = [match_fix(instruction, f) for f in fixes]
    return max(matches, key=lambda m: m.score) if matches else None


def instruction_match_metrics(matches: Sequence[InstructionMatch | None], prefix: str) -> dict[str, float]:
    """Over the answers whose input image had fixes: how many, mean score, and the share whose
    instruction matches the fix fully in kind / object / attribute (among fixes that define it)."""
    judged = [m for m in matches if m is not None]
    out = {f"{prefix}/instruction_judged": float(len(judged)),
           f"{prefix}/instruction_score_mean": sum(m.score for m in judged) / len(judged) if judged else 0.0}
    for name in ("kind", "object", "attribute"):
        values = [getattr(m, name) for m in judged if getattr(m, name) is not None]
        out[f"{prefix}/instruction_{name}_match"] = sum(v == 1.0 for v in values) / len(values) if values else 0.0
    return out
