"""The small protocols the R3 logic is written against: reasoner, generator, judge.

Nothing here knows about transport: a `Reasoner` may be a Ray actor handle wrapped by the driver,
a local vLLM engine, or a scripted fake in a unit test. Lifecycle of every engine-backed
implementation: construct (engine starts) -> serve calls -> `load_weights` bumps the version ->
`shutdown`. Invariant: every sample returned records the weight version it was drawn with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from rollout.trajectory import ImageSample, TextSample

__all__ = [
    "ChatMessage",
    "TextRequest",
    "ImageRequest",
    "SamplerSettings",
    "JudgeItem",
    "JudgeResult",
    "finite_judge_result",
    "Reasoner",
    "Generator",
    "Judge",
]


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn. `images` are (H, W, 3) uint8 arrays shown before the text."""

    role: Literal["system", "user", "assistant"]
    text: str
    images: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class TextRequest:
    """A batch element for the reasoner; `n` samples are drawn from the same prompt."""

    messages: tuple[ChatMessage, ...]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class SamplerSettings:
    """How the generator samples (FlowGRPO, docs/design.md#stochastic-steps).

    stochastic: "all" = SDE at every step except the last; "one" = one random step drawn in
    [window_lo, window_hi) with ODE elsewhere; "none" = ODE everywhere (evaluation).
    sde: the stochastic step's transition, "flow_grpo" (`flow_sde.sde_step`) or "cps"
    (`flow_sde.cps_step`, noise_level in [0, 1]); the learner must rescore with the same one.
    """

    num_steps: int = 8
    noise_level: float = 0.7
    stochastic: Literal["all", "one", "none"] = "all"
    window_lo: int = 0
    window_hi: int = 1
    guidance: float = 3.5
    cfg_scale: float = 1.0  # true CFG (1 = off): v_u + cfg_scale * (v_c - v_u), v_u from the empty prompt
    height: int = 64
    width: int = 64
    keep_training_data: bool = True
    sde: Literal["flow_grpo", "cps"] = "flow_grpo"


@dataclass(frozen=True)
class ImageRequest:
    """Text-to-image when `source_image` is None, otherwise an edit of `source_image`.

    `noise_seed` seeds the initial noise (the members of a generate group share it unless
    `flow_grpo.share_group_noise` is false; an edit group's members share it); `seed` seeds the SDE
    noise and the stochastic-step draw.
    """

    prompt: str
    seed: int
    noise_seed: int
    source_image: np.ndarray | None = None


@dataclass(frozen=True)
class JudgeItem:
    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeResult:
    """score in [0, 1]; `error` is None on success, else why the judge could not score."""

    score: float
    correct: bool
    details: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    error: str | None = None


def finite_judge_result(result: JudgeResult) -> JudgeResult:
    """`result` unchanged if its score is finite; else an error result (score 0, not correct, `error`
    saying the judge returned a non-finite score), so a NaN or ±inf never becomes a reward."""
    if math.isfinite(result.score):
        return result
    error = f"judge returned a non-finite score ({result.score!r})"
    if result.error is not None:
        error += f"; its own error: {result.error}"
    return replace(result, score=0.0, correct=False, error=error)


@runtime_checkable
class Reasoner(Protocol):
    def generate(self, requests: list[TextRequest]) -> list[list[TextSample]]:
        """One list of `request.n` samples per request, in request order.

        Raises:
            ValueError: empty batch, n < 1, unsupported image, prompt longer than the context.
        """

    def version(self) -> int: ...


@runtime_checkable
class Generator(Protocol):
    def sample(self, requests: list[ImageRequest], settings: SamplerSettings) -> list[ImageSample]:
        """One sample per request, in request order.

        Raises:
            ValueError: empty batch, source image of the wrong shape or dtype.
        """

    def version(self) -> int: ...


@runtime_checkable
class Judge(Protocol):
    def score(self, items: list[JudgeItem]) -> list[JudgeResult]:
        """One result per item. Never raises on bad model output: the result carries `error`."""
