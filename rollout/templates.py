"""Prompt templates of the reasoner and the parsers of its two kinds of answer.

Design: docs/design.md#answers-and-the-stop-phrase.

Round 0 (*plan*): the reasoner reads the user prompt and answers `<think>…</think>` followed by the
prompt for the generator. Later rounds (*reflect*): it reads the user prompt and the current image
and answers `<think>…</think>` followed by one edit instruction, or the stop phrase.

Documented fallbacks for malformed answers (f = 0, so the text reward is 0 whatever happens):
- plan: the generator draws the original user prompt (`plan_fallback`);
- reflect: an answer that contains the stop match is a stop whatever its format; any other
  malformed answer edits with `edit_fallback` (by default the user prompt as an instruction).
Every template is a plain string with `{prompt}` (and `{stop_phrase}` where useful) placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rollout.interfaces import ChatMessage
from rollout.parsing import STOP_PHRASE, is_stop, parse_answer

__all__ = [
    "Templates",
    "PlanAnswer",
    "ReflectAnswer",
    "parse_plan",
    "parse_reflect",
    "DEFAULT_SYSTEM",
    "DEFAULT_PLAN",
    "DEFAULT_REFLECT",
]

DEFAULT_SYSTEM = (
    "You are an image-generation assistant. You reason inside <think></think> before you answer, "
    "and after </think> you write only the answer."
)
DEFAULT_PLAN = (
    "Write a prompt for a text-to-image model so that the image shows exactly: {prompt}\n"
    "First think about the objects, counts, colours and positions inside <think></think>, "
    "then write only the image prompt."
)
DEFAULT_REFLECT = (
    "This image was generated for the request: {prompt}\n"
    "Check whether the image matches the request. Think inside <think></think>. Then write one "
    "edit instruction that fixes the most important mistake, or write exactly "
    '"{stop_phrase}" if the image already matches the request.'
)


class PlanAnswer(NamedTuple):
    generator_prompt: str  # what the generator draws (the fallback when malformed)
    think: str
    well_formed: bool


class ReflectAnswer(NamedTuple):
    instruction: str  # the edit instruction; "" for a stop
    think: str
    well_formed: bool
    stop: bool


@dataclass(frozen=True)
class Templates:
    """Configurable strings of the reasoner's prompts; the defaults are sensible English.

    system: system message ("" for none). plan / reflect: user messages with `{prompt}`.
    plan_fallback / edit_fallback: what a malformed plan / reflect answer turns into.
    stop_phrase: the phrase the reflect prompt asks for; stop_match: the case-insensitive
    substring that makes an answer a stop decision (docs/design.md#answers-and-the-stop-phrase:
    "no further edit").
    """

    system: str = DEFAULT_SYSTEM
    plan: str = DEFAULT_PLAN
    reflect: str = DEFAULT_REFLECT
    plan_fallback: str = "{prompt}"
    edit_fallback: str = "Edit the image so that it shows: {prompt}"
    stop_phrase: str = STOP_PHRASE
    stop_match: str = "no further edit"

    def __post_init__(self) -> None:
        for name in ("plan", "reflect", "plan_fallback", "edit_fallback"):
            value = getattr(self, name)
            if "{prompt}" not in value:
                raise ValueError(f"template {name}={value!r} must contain the placeholder {{prompt}}")
            try:
                value.format(prompt="p", stop_phrase="s")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"template {name}={value!r} may only use the placeholders {{prompt}} and {{stop_phrase}}"
                ) from exc
        if not self.stop_match.strip():
            raise ValueError("stop_match must be a non-empty phrase")
        if self.stop_match.lower() not in self.stop_phrase.lower():
            raise ValueError(
                f"stop_phrase={self.stop_phrase!r} must contain stop_match={self.stop_match!r}, "
                "or a reasoner that obeys the prompt would never stop"
            )

    def _fill(self, template: str, prompt: str) -> str:
        return template.format(prompt=prompt, stop_phrase=self.stop_phrase)

    def plan_messages(self, prompt: str) -> tuple[ChatMessage, ...]:
        """Chat for round 0: system (optional) + the plan request."""
        return self._with_system(ChatMessage("user", self._fill(self.plan, prompt)))

    def reflect_messages(self, prompt: str, image: np.ndarray) -> tuple[ChatMessage, ...]:
        """Chat for a refine round: the current image shown before the reflect request."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"reflect needs an (H, W, 3) uint8 image, got {type(image).__name__}")
        return self._with_system(ChatMessage("user", self._fill(self.reflect, prompt), images=(image,)))

    def _with_system(self, user: ChatMessage) -> tuple[ChatMessage, ...]:
        if self.system:
            return (ChatMessage("system", self.system), user)
        return (user,)


def parse_plan(text: str, prompt: str, templates: Templates | None = None) -> PlanAnswer:
    """The generator prompt of a plan answer; the fallback (user prompt) when malformed."""
    t = templates or Templates()
    parsed = parse_answer(text)
    if parsed.well_formed:
        return PlanAnswer(parsed.answer, parsed.think, True)
    return PlanAnswer(t._fill(t.plan_fallback, prompt), parsed.think, False)


def parse_reflect(text: str, prompt: str, templates: Templates | None = None) -> ReflectAnswer:
    """Stop decision or edit instruction of a reflect answer (fallback instruction when malformed)."""
    t = templates or Templates()
    parsed = parse_answer(text)
    if is_stop(parsed.answer, t.stop_match):
        return ReflectAnswer("", parsed.think, parsed.well_formed, True)
    if parsed.well_formed:
        return ReflectAnswer(parsed.answer, parsed.think, True, False)
    return ReflectAnswer(t._fill(t.edit_fallback, prompt), parsed.think, False, False)
