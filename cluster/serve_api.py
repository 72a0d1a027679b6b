"""The inference app's HTTP contract: request and response models, and how bad input is answered.

`POST /v1/r3` takes an `R3Request` and answers an `R3Response` (or, with `stream: true`, one
server-sent event per round: `event: round` with a `RoundOut`, then `event: done` with the
`R3Response`, or `event: error` with an `ErrorBody`). Bad input is answered, never raised:

- 400: the body is not JSON (`field` = "body");
- 422: a field is missing, of the wrong type, out of range or unknown, or the prompt is empty or
  longer than `serve.max_prompt_chars` (`field` names it);
- 504: the request ran past its timeout (`field` = "timeout_s"); its chain stops at the next round.
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollout.trajectory import Round, Trajectory, png_bytes

__all__ = [
    "MAX_ROUNDS",
    "R3Request",
    "RoundOut",
    "R3Response",
    "ErrorBody",
    "FieldError",
    "RequestRejected",
    "check_limits",
    "validation_errors",
    "round_out",
    "response_for",
]

MAX_ROUNDS = 8  # 1 generation + up to 7 refinements


class R3Request(BaseModel):
    """One prompt to run through up to `max_rounds` R3 rounds (plan+generate, then reflect+edit)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., description="what the image should show (not empty; at most serve.max_prompt_chars)")
    max_rounds: int = Field(3, ge=1, le=MAX_ROUNDS, description="1 generation + up to max_rounds-1 refinements")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds every sample of the request: same seed, same rounds")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="the reasoner's sampling temperature (default: grpo.eval_temperature)"
    )
    stream: bool = Field(False, description="send each round as a server-sent event as soon as it is done")
    timeout_s: float | None = Field(
        None, gt=0, description="answer 504 after this many seconds (at most serve.request_timeout_s, the default)"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty; give a description of the image")
        return v.strip()


class RoundOut(BaseModel):
    """One finished round. Round 0's `text` is the plan, later rounds' the reflection."""

    index: int = Field(..., description="0 = plan and generate; r > 0 = the r-th reflection")
    kind: str = Field(..., description="'plan' or 'reflection'")
    text: str = Field(..., description="the reasoner's answer, as generated")
    instruction: str = Field(..., description="what the generator was asked to draw (round 0) or edit (later)")
    well_formed: bool = Field(..., description="the answer followed the plan/reflection template")
    stopped: bool = Field(..., description="the reasoner decided the image is done: no edit this round")
    image_png_b64: str | None = Field(..., description="this round's image as base64 PNG; null when stopped")
    score: float = Field(..., description="the judge's score in [0, 1] (a stopped round keeps the last one)")
    correct: bool = Field(..., description="the judge's verdict")
    judge_error: str | None = Field(None, description="why the judge could not score the image, if it could not")


class R3Response(BaseModel):
    prompt: str
    seed: int
    max_rounds: int
    rounds: list[RoundOut] = Field(..., description="in order; fewer than max_rounds when the reasoner stopped")
    stopped: bool = Field(..., description="the reasoner ended the chain with its stop decision")
    weight_version: int = Field(..., description="the weight version the workers run (0: the config's models)")


class FieldError(BaseModel):
    field: str = Field(..., description="dotted path of the offending input ('body' for the whole body)")
    message: str


class ErrorBody(BaseModel):
    error: str
    status: int
    fields: list[FieldError] = Field(default_factory=list)


class RequestRejected(Exception):
    """A request the app refuses: its status and body."""

    def __init__(self, status: int, error: str, fields: list[FieldError] = ()):
        super().__init__(error)
        self.body = ErrorBody(error=error, status=status, fields=list(fields))


def check_limits(req: R3Request, max_prompt_chars: int, max_timeout_s: float) -> None:
    """The limits the config sets: raises `RequestRejected` (422) naming the field."""
    if len(req.prompt) > max_prompt_chars:
        raise RequestRejected(422, "invalid request", [FieldError(
            field="prompt", message=f"prompt has {len(req.prompt)} characters; at most {max_prompt_chars} "
            "(serve.max_prompt_chars)")])
    if req.timeout_s is not None and req.timeout_s > max_timeout_s:
        raise RequestRejected(422, "invalid request", [FieldError(
            field="timeout_s", message=f"timeout_s={req.timeout_s:g} exceeds serve.request_timeout_s={max_timeout_s:g}")])


def validation_errors(errors: list[dict[str, Any]]) -> RequestRejected:
    """FastAPI's validation errors -> 400 (body is not JSON) or 422, each error naming its field."""
    fields, status = [], 422
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            status, loc = 400, []
        name = ".".join(loc) or "body"
        message = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            message = f"unknown field {name!r}; allowed: {sorted(R3Request.model_fields)}"
        elif e.get("type") == "model_attributes_type":
            message = "the body must be a JSON object"
        fields.append(FieldError(field=name, message=message))
    error = "the body is not valid JSON" if status == 400 else "invalid request"
    return RequestRejected(status, error, fields)


def round_out(r: Round) -> RoundOut:
    """The API's view of one `rollout.trajectory.Round`."""
    error = r.judge_details.get("error") if not r.stopped else None
    return RoundOut(
        index=r.index,
        kind="plan" if r.index == 0 else "reflection",
        text=r.text.text if r.text is not None else "",
        instruction=r.instruction,
        well_formed=r.well_formed,
        stopped=r.stopped,
        image_png_b64=base64.b64encode(png_bytes(r.image.image)).decode() if r.image is not None else None,
        score=float(r.score),
        correct=bool(r.correct),
        judge_error=None if error is None else str(error),
    )


def response_for(req: R3Request, trajectory: Trajectory, weight_version: int) -> R3Response:
    rounds = [round_out(r) for r in trajectory.rounds]
    return R3Response(prompt=req.prompt, seed=req.seed, max_rounds=req.max_rounds, rounds=rounds,
                      stopped=bool(rounds) and rounds[-1].stopped, weight_version=weight_version)
