"""The fixes a judge would make to an image: an optional part of `JudgeResult.details`.

A judge that can name what is wrong with an image may put the edit(s) that would fix it under
`details["fixes"]`, a list of JSON dicts `{"kind", "object", "attribute", "text"}`:

- `kind`: one of `FIX_KINDS` ("add", "change", "move", "remove"), or None when the judge names
  only what fails (a failed checklist item) and not the edit;
- `object`: what the edit acts on ("triangle", "wine glass"); "" when unknown;
- `attribute`: what the edit sets ("blue", "left of the circle"); "" when the edit sets none;
- `text`: the fix in words (an edit instruction, or the failed requirement).

A correct image has no fixes (the key is absent or the list empty). The reflect stage compares the
reasoner's edit instruction with the fixes of the image it was shown (`reward.instruction_match`);
judges that give none leave that reward at 0 (the paper's reward). The details travel as they are
through Ray Serve and into the rollout buffer, so fixes are plain JSON, never objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FIX_KINDS", "FIXES_KEY", "JudgeFix", "fixes_in"]

FIX_KINDS: tuple[str, ...] = ("add", "change", "move", "remove")
FIXES_KEY = "fixes"


@dataclass(frozen=True)
class JudgeFix:
    """One edit a judge would make; at least one of kind, object, attribute, text is set."""

    kind: str | None = None
    object: str = ""
    attribute: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in FIX_KINDS:
            raise ValueError(f"fix kind {self.kind!r} is not one of {list(FIX_KINDS)} (or None: unknown)")
        for name in ("object", "attribute", "text"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"fix {name} must be a string, got {getattr(self, name)!r}")
        if self.kind is None and not (self.object or self.attribute or self.text):
            raise ValueError("a fix needs at least one of kind, object, attribute, text")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "attribute": self.attribute, "text": self.text}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> JudgeFix:
        """Raises ValueError naming the bad entry (not a dict, unknown keys, bad kind)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a fix must be a dict with kind/object/attribute/text, got {d!r}")
        unknown = set(d) - {"kind", "object", "attribute", "text"}
        if unknown:
            raise ValueError(f"fix {dict(d)!r} has unknown keys {sorted(unknown)}; allowed: kind, object, attribute, text")
        return cls(d.get("kind"), d.get("object", ""), d.get("attribute", ""), d.get("text", ""))


def fixes_in(details: Mapping[str, Any]) -> tuple[JudgeFix, ...]:
    """The fixes a judge result's (or a round's) details carry; () when none.

    Raises:
        ValueError: `details["fixes"]` is not a list of fix dicts (a judge bug, named as such).
    """
    raw = details.get(FIXES_KEY)
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f'judge details["{FIXES_KEY}"] must be a list of fix dicts, got {raw!r}')
    return tuple(JudgeFix.from_json(d) for d in raw)
