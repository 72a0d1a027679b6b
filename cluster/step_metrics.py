"""Metrics of one R3 step: per stage (`stage_metrics`) and over the learner batches (`batch_metrics`).

Keys are what `metrics.jsonl` and TensorBoard show: `<stage>/score_mean`, `<stage>/stop_rate`, ...
for each stage a step ran, and `text_adv/*`, `image_adv/*`, `*_batch/size` for what the learners
receive. Non-finite rewards and advantages are reported as they are and counted (`*_adv/nonfinite`):
the learners skip such an update; any other non-finite metric is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rollout.trajectory import Round


def stage_metrics(stage: str, rounds: list[Round], counts: dict) -> dict[str, float]:
    """Per-stage means over its rounds (reflect decisions only for rounds after the first), plus `counts`."""
    reflect = [r for r in rounds if r.stage != "generate" and r.index > 0]
    return {
        f"{stage}/score_mean": finite_mean([r.score for r in rounds]),
        f"{stage}/accuracy": finite_mean([float(r.correct) for r in rounds]),
        f"{stage}/text_reward_mean": finite_mean([r.text_reward for r in rounds], nonfinite_ok=True),
        f"{stage}/image_reward_mean": finite_mean([r.image_reward for r in rounds], nonfinite_ok=True),
        f"{stage}/format_rate": finite_mean([float(r.well_formed) for r in rounds]),
        f"{stage}/stop_rate": finite_mean([float(r.stopped) for r in reflect]),
        f"{stage}/judge_errors": float(sum("error" in r.judge_details for r in rounds)),
        f"{stage}/samples": float(len(rounds)),
        **{f"{stage}/{k}": float(v) for k, v in counts.items()},
    }


def batch_metrics(
    text_advantages: Sequence[float], image_advantages: Sequence[float], m: dict, stages: list[str]
) -> dict[str, float]:
    """Advantage statistics and batch sizes per side, and sample-weighted means over the step's stages."""
    out: dict[str, float] = {}
    for side, adv in (("text", list(text_advantages)), ("image", list(image_advantages))):
        # non-finite ones reach the learners, which skip the update
        out[f"{side}_adv/mean"] = finite_mean(adv, nonfinite_ok=True)
        out[f"{side}_adv/std"] = float(np.std(adv)) if adv else 0.0
        out[f"{side}_adv/abs_max"] = float(np.max(np.abs(adv))) if adv else 0.0
        out[f"{side}_adv/nonfinite"] = float(sum(not math.isfinite(a) for a in adv))
        out[f"{side}_batch/size"] = float(len(adv))
        out[f"{side}_zero_var_groups"] = float(sum(m.get(f"{s}/{side}_zero_var_groups", 0.0) for s in stages))
    out["judge/errors"] = float(sum(m[f"{s}/judge_errors"] for s in stages))  # error results, in every stage
    n = sum(m[f"{s}/samples"] for s in stages)
    for key in ("score_mean", "format_rate", "text_reward_mean", "image_reward_mean"):
        out[key] = sum(m[f"{s}/{key}"] * m[f"{s}/samples"] for s in stages) / n
    out["stop_rate"] = finite_mean([m[f"{s}/stop_rate"] for s in stages if s != "generate"])
    return out


def finite_mean(values: Sequence[float], nonfinite_ok: bool = False) -> float:
    """Mean (0 for none). Non-finite raises, except for rewards and advantages (`nonfinite_ok`): those are
    reported as they are, counted (`*_adv/nonfinite`), and the learners skip that update."""
    vals = list(values)
    out = sum(vals) / len(vals) if vals else 0.0
    if not math.isfinite(out) and not nonfinite_ok:
        raise ValueError(f"non-finite metric from values {vals[:8]}")
    return out
