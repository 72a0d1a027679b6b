"""The one edit instruction that would fix an image, read off the exact judge's detections.

The renderer knows the fix of each wrong image it makes; a generated image has no such label.
This walks the judge's checklist (`evaluate_detections`, GenEval's rules, in the order the
prompt states its requirements) and phrases a fix for the first failed item, in the
renderer's instruction templates, so that the reasoner can be taught to reflect on the
generator's own images with the judge as the teacher:

- an include with too few objects of its shape: "change the <extra shape> to a <shape>" when the
  image has an object of a shape the prompt does not name (the generator drew the wrong shape),
  else "add a <colour> <shape> <where>" (none there, one asked; an uncoloured ask gets the first
  palette colour, as the editor learnt "add" with a colour always) or "add one more <shape>";
- enough of the shape, too few in the asked colour: "change the <colour> <shape> to <colour>";
- a failed relation: "move the <shapes> <relation> the <shapes>";
- an exclude broken (too many): "remove one <shape>".

None when the judge finds the image correct. One item at a time, as R3 edits one step per round.
`fixing_edit` gives the same fix with its structured fields (`rollout.judge_fixes.JudgeFix`: kind,
the object it acts on, the attribute it sets: the new shape or colour, or the relation and its
target), which the judge puts in its results (`details["fixes"]`) for the reflect stage's
instruction reward.
"""

from __future__ import annotations

from typing import Any

from examples.shapesworld.judge import Detection, evaluate_detections
from examples.shapesworld.render import describe_requirement, placement_phrase, relation_phrase, with_article
from examples.shapesworld.tasks import COLORS
from rollout.judge_fixes import JudgeFix

__all__ = ["fixing_instruction", "fixing_edit"]


def fixing_instruction(meta: dict[str, Any], dets: list[Detection]) -> str | None:
    """The fix for the first requirement of `meta` that `dets` fail, or None if all pass."""
    fix = fixing_edit(meta, dets)
    return None if fix is None else fix.text


def fixing_edit(meta: dict[str, Any], dets: list[Detection]) -> JudgeFix | None:
    """`fixing_instruction`'s fix with its kind, object and attribute; None if all requirements pass."""
    correct, _, checklist = evaluate_detections(meta, dets)
    if correct:
        return None
    items = iter(checklist)
    inc = meta["include"]
    named = {r["class"] for r in inc}
    for i, req in enumerate(inc):
        cls, n, color = req["class"], int(req["count"]), req.get("color")
        if not next(items)["passed"]:
            extra = [d for d in dets if d.shape is not None and d.shape not in named]
            if extra:
                return JudgeFix("change", extra[0].shape, cls, f"change the {extra[0].shape} to {with_article(cls)}")
            if n == 1 and not any(d.shape == cls for d in dets):
                what = with_article(f"{color or COLORS[0]} {cls}")
                return JudgeFix("add", cls, color or COLORS[0], f"add {what}{placement_phrase(inc, i)}")
            return JudgeFix("add", cls, color or "", f"add one more {describe_requirement(req)}")
        if color is not None and not next(items)["passed"]:
            other = next(d for d in dets if d.shape == cls and d.color != color)
            return JudgeFix("change", cls, color, f"change the {other.color} {cls} to {color}")
        if "position" in req and not next(items)["passed"]:
            rel, j = req["position"][0], int(req["position"][1])
            what = describe_requirement(req, plural=n > 1)
            where = describe_requirement(inc[j], plural=inc[j]["count"] > 1)
            return JudgeFix("move", cls, f"{rel} the {where}", f"move the {what} {relation_phrase(rel)} the {where}")
    for req in meta.get("exclude", []):
        if not next(items)["passed"]:
            same = ([r for r in inc if r["class"] == req["class"]] or [req])[0]
            return JudgeFix("remove", req["class"], same.get("color") or "",
                            f"remove one {describe_requirement(same)}")
    raise AssertionError(f"the judge failed {meta['prompt']!r} on no item it checks")  # unreachable
