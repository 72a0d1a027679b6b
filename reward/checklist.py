"""GenEval metadata -> a checklist of what the image must show, for the VLM judge's checklist mode.

Metadata format (docs/design.md#geneval-format): `{tag, include: [{class, count, color?, position?: [relation,
index], size?, region?}], exclude: [{class, count}], prompt}`. GenEval's semantics: an include
needs at least `count` objects of `class` (all of `color` when given; `position` relates this
object to `include[index]`); an exclude forbids `count` or more. An include with count n and an
exclude of the same class with count n + 1 therefore means "exactly n". GenEval++ adds `size`
(larger/smaller) and `region` (left/right/above/below).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["checklist_items", "checklist_text", "plural", "number_word"]

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_IRREGULAR = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "broccoli": "broccoli",
    "tv": "tvs",
}
_REGION_TEXT = {
    "left": "in the left part of the image",
    "right": "in the right part of the image",
    "above": "in the upper part of the image",
    "below": "in the lower part of the image",
    "top": "in the upper part of the image",
    "bottom": "in the lower part of the image",
}


def number_word(n: int) -> str:
    """0..10 as English words, larger numbers as digits."""
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def plural(noun: str) -> str:
    """English plural of a COCO class name ("wine glass" -> "wine glasses", "person" -> "people")."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def checklist_items(metadata: Mapping[str, Any]) -> list[str]:
    """One sentence per requirement, in metadata order (includes, then relations, then excludes).

    Raises:
        ValueError: metadata without a non-empty `include` list, an include without `class`, or a
            position index that points outside `include`.
    """
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError(f"GenEval metadata needs a non-empty 'include' list, got {include!r}")
    exclude = list(metadata.get("exclude") or [])
    items: list[str] = []
    for obj in include:
        if "class" not in obj:
            raise ValueError(f"include entry {obj!r} has no 'class'")
        exact = _pop_exact_exclude(obj, exclude)
        items.append(_object_sentence(obj, exact))
        if obj.get("size"):
            items.append(f"The {obj['class']} is {obj['size']} than the other objects.")
    for obj in include:
        pos = obj.get("position")
        if pos:
            relation, index = pos[0], int(pos[1])
            if not 0 <= index < len(include):
                raise ValueError(f"position index {index} outside include of length {len(include)}")
            items.append(f"The {obj['class']} is {relation} the {include[index]['class']}.")
    for obj in exclude:
        count = int(obj.get("count", 1))
        cls = obj["class"]
        if count <= 1:
            items.append(f"There is no {cls} in the image.")
        else:
            items.append(f"There are fewer than {number_word(count)} {plural(cls)} in the image.")
    return items


def checklist_text(metadata: Mapping[str, Any]) -> str:
    """The checklist as numbered lines ("1. ...\\n2. ..."), ready for a prompt template."""
    return "\n".join(f"{i}. {line}" for i, line in enumerate(checklist_items(metadata), start=1))


def _pop_exact_exclude(obj: Mapping[str, Any], exclude: list[dict[str, Any]]) -> bool:
    """Remove and report an exclude of the same class with count + 1 (GenEval's 'exactly n')."""
    count = int(obj.get("count", 1))
    for i, ex in enumerate(exclude):
        if ex.get("class") == obj["class"] and int(ex.get("count", 1)) == count + 1:
            del exclude[i]
            return True
    return False


def _object_sentence(obj: Mapping[str, Any], exact: bool) -> str:
    count = int(obj.get("count", 1))
    cls = obj["class"]
    color = f"{obj['color']} " if obj.get("color") else ""
    noun = f"{color}{cls if count == 1 else plural(cls)}"
    quantity = f"exactly {number_word(count)}" if exact else f"at least {number_word(count)}"
    sentence = f"The image contains {quantity} {noun}"
    region = obj.get("region")
    if region:
        where = _REGION_TEXT.get(region, f"in the {region} region of the image")
        sentence += f", {where}"
    return sentence + "."
