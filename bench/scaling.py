"""Scaling on one machine: text workers when generation-bound, and step time against group size and rounds.

Runs on a live trainer (`bench/step_anatomy.py` calls `measure_scaling` on its roles, so no second
start-up). Three measurements:

- Text workers 1 -> 2 when generation-bound: the reasoner pool alone (no images, no judge, no
  learning) answers `PROMPTS` prompts x `SAMPLES` samples, `--repeats` times (best kept), with one
  worker and then with two (`Trainer.resize_workers`). Trajectories/s counts reasoner samples.
  Each vLLM worker runs one thread, so on 2 cores two workers can at best double it; the driver,
  the idle engines and the other jobs on the machine take from that.
- Group size G = 4, 8, 16: one full step each (generate and refine stages every step), step time
  fitted linearly in G.
- Rounds K = 1..4: one full chain-mode step each (G = 4), step time fitted linearly in the mean
  rounds the trajectories reached.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from common import linear_fit

log = logging.getLogger("bench.scaling")
PROMPTS, SAMPLES = 4, 8
GROUP_SIZES = (4, 8, 16)
ROUNDS = (1, 2, 3, 4)


def _requests(max_tokens: int, salt: int) -> list[Any]:
    from rollout.interfaces import ChatMessage, TextRequest

    return [TextRequest(messages=(ChatMessage("user", f"Plan an image of {i + 2} red circles and a blue square.", ()),),
                        n=SAMPLES, temperature=1.0, max_tokens=max_tokens, seed=salt * 100 + i) for i in range(PROMPTS)]


def generation_throughput(trainer: Any, repeats: int) -> dict[str, float]:
    """Best samples/s and tokens/s of the reasoner pool over `repeats` calls (after one warm-up)."""
    reasoner, max_tokens = trainer.roles.reasoner, trainer.settings.stage.max_tokens
    reasoner.generate(_requests(max_tokens, 0))
    best: dict[str, float] = {"samples_per_s": 0.0}
    for r in range(repeats):
        start = time.perf_counter()
        out = reasoner.generate(_requests(max_tokens, r + 1))
        wall = time.perf_counter() - start
        samples = sum(len(group) for group in out)
        tokens = sum(len(s.answer_ids) for group in out for s in group)
        if samples / wall > best["samples_per_s"]:
            best = {"samples_per_s": samples / wall, "tokens_per_s": tokens / wall, "call_s": wall,
                    "samples": samples, "tokens": tokens}
    return best


def step_times(trainer: Any, variants: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """One full step per (label, settings); wall time and what the step held."""
    original = trainer.settings
    rows = []
    try:
        for label, settings in variants:
            trainer.settings = settings
            start = time.perf_counter()
            row = trainer.step()
            wall = time.perf_counter() - start
            rows.append({"variant": label, "wall_s": wall, "trajectories": row["samples/trajectories"],
                         "text_samples": row["samples/text"], "image_samples": row["samples/image"],
                         "rounds_mean": row.get("chain/rounds_mean"), "rollout_s": row["time/rollout"],
                         "learn_s": row["time/learn"], "sync_s": row["time/sync"]})
            log.info("%s: %.2f s", label, wall)
    finally:
        trainer.settings = original
    return rows


def measure_scaling(trainer: Any, repeats: int = 3) -> dict[str, Any]:
    """Worker, group-size and rounds scaling on the trainer's roles (restored to one text worker)."""
    import os

    one = generation_throughput(trainer, repeats)
    trainer.resize_workers(text_workers=2)
    try:
        two = generation_throughput(trainer, repeats)
    finally:
        trainer.resize_workers(text_workers=1)
    base = trainer.settings
    groups = step_times(trainer, [(f"G={g}", dataclasses.replace(
        base, tree_schedule="both", stage=dataclasses.replace(base.stage, group_size=g))) for g in GROUP_SIZES])
    rounds = step_times(trainer, [(f"K={k}", dataclasses.replace(base, mode="chain", max_rounds=k))
                                  for k in ROUNDS])
    group_fit = linear_fit(list(GROUP_SIZES), [r["wall_s"] for r in groups])
    rounds_x = [r["rounds_mean"] if r["rounds_mean"] is not None else k for r, k in zip(rounds, ROUNDS, strict=True)]
    rounds_fit = linear_fit(rounds_x, [r["wall_s"] for r in rounds])
    return {
        "generation_bound": {"prompts": PROMPTS, "samples_per_prompt": SAMPLES, "one_worker": one,
                             "two_workers": two, "speedup": two["samples_per_s"] / one["samples_per_s"],
                             "cores": os.cpu_count()},
        "group_size": {"rows": groups, "fit": group_fit,
                       "t16_over_t4": groups[-1]["wall_s"] / groups[0]["wall_s"]},
        "rounds": {"rows": rounds, "fit": rounds_fit, "x": "chain/rounds_mean",
                   "t4_over_t1": rounds[-1]["wall_s"] / rounds[0]["wall_s"]},
    }
