"""Reward shaping of R3: judge scores + answer format -> text and image rewards.

Design: docs/design.md#rewards.

Pure functions of Python floats and bools (no torch): advantages are assigned by the caller
(`cluster/r3_step.py` via `learners.algos.group_advantages`). Notation: r = judge score in [0, 1],
f = 1 if the answer is `<think>…</think>answer` with a non-empty answer, w_f = `format_weight`.

- generate stage: text = r·f + w_f·f; image = r.
- refine stage:   Δ = r_new − r_prev, except Δ = +1 (`stop_bonus`) when r_prev = 1 (>= `perfect_score`)
                  and the answer is the stop phrase; text = w_f·f + Δ·f; image = r_new.
                  Beyond the paper: a stop on an imperfect image gets Δ = −`wrong_stop_penalty`
                  (paper: 0), so that stopping is not free when the editor is weak and every edit
                  tends to lower the score (GRPO then learns "always stop", whatever the image).
                  A stopped attempt keeps its input image, so r_new = r_prev and it is not trainable
                  on the image side (image advantage forced to 0 by the caller via `image_trainable`).
                  Beyond the paper: with an instruction reward (m in [0, 1], how well the edit
                  instruction names the judge's fix, `reward.instruction_match`; 0 when the judge
                  names none) weighted by w_i = `instruction_weight` (paper: 0):
                  text = w_f·f + (Δ + w_i·m)·f.
- chain mode:     round 0 as the generate stage, round k >= 1 as the refine stage with
                  r_prev = r_{k−1}; optional discounted returns of the text rewards over rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from rollout.parsing import is_stop, parse_answer

__all__ = [
    "format_flag",
    "stop_flag",
    "GenerateRewards",
    "RefineRewards",
    "ChainRewards",
    "generate_rewards",
    "refine_delta",
    "refine_rewards",
    "chain_rewards",
    "discounted_returns",
]


class GenerateRewards(NamedTuple):
    text: list[float]
    image: list[float]


class RefineRewards(NamedTuple):
    text: list[float]
    image: list[float]
    delta: list[float]
    image_trainable: list[bool]  # False for stopped attempts (image advantage 0)


class ChainRewards(NamedTuple):
    """Per round of one trajectory; `text_credit` = the text signal to normalise (Δ or returns)."""

    text: list[float]
    image: list[float]
    delta: list[float]  # delta[0] = 0 (round 0 has no previous image)
    text_credit: list[float]
    image_trainable: list[bool]


def format_flag(text: str) -> int:
    """f: 1 when the answer is well-formed `<think>…</think>answer`, else 0."""
    return int(parse_answer(text).well_formed)


def stop_flag(text: str, stop_match: str = "no further edit") -> bool:
    """The stop decision: the answer part contains the stop phrase (case-insensitive)."""
    return is_stop(parse_answer(text).answer, stop_match)


def generate_rewards(
    scores: Sequence[float], well_formed: Sequence[bool], *, format_weight: float = 1.0
) -> GenerateRewards:
    """Generate stage: text r·f + w_f·f, image r."""
    _check_lengths(scores=scores, well_formed=well_formed)
    _check_scores(scores, "scores")
    _check_weight(format_weight)
    text = [(r + format_weight) * f for r, f in zip(scores, map(_f, well_formed), strict=True)]
    return GenerateRewards(text, [float(r) for r in scores])


def refine_delta(
    prev: float,
    new: float,
    stopped: bool,
    *,
    perfect_score: float = 1.0,
    stop_bonus: float = 1.0,
    wrong_stop_penalty: float = 0.0,
) -> float:
    """Δ = r_new − r_prev; `stop_bonus` (+1) for a stop on an already-perfect image,
    −`wrong_stop_penalty` for a stop on an imperfect one."""
    if wrong_stop_penalty < 0 or math.isnan(wrong_stop_penalty):
        raise ValueError(f"wrong_stop_penalty={wrong_stop_penalty}; allowed: a number >= 0")
    if stopped:
        if new != prev:
            raise ValueError(
                f"a stopped attempt keeps its image, so r_new must equal r_prev; got {new} != {prev}"
            )
        return stop_bonus if prev >= perfect_score else -wrong_stop_penalty
    return float(new) - float(prev)


def refine_rewards(
    prev_scores: Sequence[float],
    new_scores: Sequence[float],
    well_formed: Sequence[bool],
    stopped: Sequence[bool],
    *,
    format_weight: float = 1.0,
    perfect_score: float = 1.0,
    stop_bonus: float = 1.0,
    wrong_stop_penalty: float = 0.0,
    instruction_match: Sequence[float] | None = None,
    instruction_weight: float = 0.0,
) -> RefineRewards:
    """Refine stage: text w_f·f + (Δ + w_i·m)·f, image r_new, stopped attempts not image-trainable.

    `instruction_match` (m per attempt, in [0, 1]; None = all 0) and `instruction_weight` (w_i >= 0)
    add the instruction reward; w_i = 0 is the paper's reward.
    """
    match = [0.0] * len(stopped) if instruction_match is None else list(instruction_match)
    _check_lengths(prev_scores=prev_scores, new_scores=new_scores, well_formed=well_formed, stopped=stopped,
                   instruction_match=match)
    _check_scores(prev_scores, "prev_scores")
    _check_scores(new_scores, "new_scores")
    _check_scores(match, "instruction_match")
    _check_weight(format_weight)
    _check_weight(instruction_weight, "instruction_weight")
    delta = [
        refine_delta(
            p, n, s, perfect_score=perfect_score, stop_bonus=stop_bonus, wrong_stop_penalty=wrong_stop_penalty
        )
        for p, n, s in zip(prev_scores, new_scores, stopped, strict=True)
    ]
    text = [
        (format_weight + d + instruction_weight * m) * _f(f)
        for d, m, f in zip(delta, match, well_formed, strict=True)
    ]
    return RefineRewards(text, [float(r) for r in new_scores], delta, [not s for s in stopped])


def chain_rewards(
    scores: Sequence[float],
    well_formed: Sequence[bool],
    stopped: Sequence[bool],
    *,
    format_weight: float = 1.0,
    discount: float | None = None,
    perfect_score: float = 1.0,
    stop_bonus: float = 1.0,
    wrong_stop_penalty: float = 0.0,
) -> ChainRewards:
    """Per-round rewards of one chain trajectory (rounds 0..K−1 it actually ran).

    scores[k] = r after round k (a stopped round repeats the previous score); stopped[0] must be
    False and a stopped round must be the last. `discount` None: credit = per-round text rewards;
    a number γ in [0, 1]: credit[k] = Σ_{j>=k} γ^{j−k} text[j] (discounted return).
    """
    _check_lengths(scores=scores, well_formed=well_formed, stopped=stopped)
    if not scores:
        raise ValueError("a chain trajectory has at least one round")
    if stopped[0]:
        raise ValueError("round 0 (plan + generate) cannot be a stop")
    if any(stopped[:-1]):
        raise ValueError(
            f"a stop ends the trajectory, so only the last round may be stopped; got {list(stopped)}"
        )
    gen = generate_rewards(scores[:1], well_formed[:1], format_weight=format_weight)
    ref = refine_rewards(
        scores[:-1],
        scores[1:],
        well_formed[1:],
        stopped[1:],
        format_weight=format_weight,
        perfect_score=perfect_score,
        stop_bonus=stop_bonus,
        wrong_stop_penalty=wrong_stop_penalty,
    )
    text = gen.text + ref.text
    credit = text if discount is None else discounted_returns(text, discount)
    return ChainRewards(
        text, gen.image + ref.image, [0.0] + ref.delta, list(credit), [True] + ref.image_trainable
    )


def discounted_returns(rewards: Sequence[float], discount: float) -> list[float]:
    """G_k = R_k + γ·G_{k+1} (G past the end = 0)."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    out, acc = [], 0.0
    for r in reversed(rewards):
        acc = float(r) + discount * acc
        out.append(acc)
    return out[::-1]


# ------------------------------------------------------------------------------------ helpers


def _f(well_formed: bool) -> float:
    return 1.0 if well_formed else 0.0


def _check_lengths(**seqs: Sequence) -> None:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have equal lengths, got {lengths}")


def _check_scores(scores: Sequence[float], name: str) -> None:
    for i, r in enumerate(scores):
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"{name}[{i}] = {r} is not a judge score in [0, 1]")


def _check_weight(w: float, name: str = "format_weight") -> None:
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {w}")
