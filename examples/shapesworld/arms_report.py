"""ShapesWorld claims as arm − null: what each run measured in, claims and a markdown table out.

Pure: `examples.shapesworld.arms` reads the runs and the paired generator probe into one measures
dict per run (below), and this module turns them into claims with `cluster.paired_stats`.

A run's measures::

    {"arm": "rl", "seed": 0, "probe": {"train": [bool, ...], "test": [bool, ...]},
     "eval": {"prompts": [str, ...], "round0": [bool, ...], "final": [bool, ...],
              "reflection": {"correct_decisions": int, "decisions": int, "stop_when_correct": float,
                             "on_correct_images": int, "edit_when_wrong": float, "on_wrong_images": int,
                             "stops_on_correct": int},
              "fix_naming": {"exact_fixes": int, "on_wrong_images_with_fix": int, ...}}}

"probe" is round 0 of the generator alone (the prompt as its text, ODE) on the fixed training prompts
(those the runs train on) and on held-out prompts of the same tags, sample i with the same noise in
every run; "eval" is the R3 evaluation on the held-out split (reasoner plans, up to
`train.eval_rounds` rounds), sample i on the same prompt and seeds in every run of a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cluster.paired_stats import Claim, combine_seeds, paired_difference, proportion_difference

__all__ = ["METRICS", "arm_claims", "arm_levels", "claims_markdown"]

# key -> (what it measures, where it is in a run's measures)
METRICS: dict[str, str] = {
    "generator_round0_train": "generator round 0, fixed training prompts (optimisation)",
    "generator_round0_heldout": "generator round 0, held-out prompts (generalisation)",
    "r3_round0_heldout": "R3 evaluation round 0 (reasoner's plan), held-out",
    "r3_final_round_heldout": "R3 evaluation final round, held-out",
    "reflection_accuracy": "reflection accuracy (stop exactly when correct), held-out",
    "reflection_balanced_accuracy": "balanced reflection accuracy, held-out",
    "stop_when_correct": "stop when correct (reflect decisions on correct images), held-out",
    "exact_fix_rate": "exact fix named (reflect decisions on wrong images), held-out",
}

_PAIRED = {
    "generator_round0_train": ("probe", "train"),
    "generator_round0_heldout": ("probe", "test"),
    "r3_round0_heldout": ("eval", "round0"),
    "r3_final_round_heldout": ("eval", "final"),
}


def _by_seed(measures: Sequence[dict[str, Any]], arm: str) -> dict[int, dict[str, Any]]:
    return {m["seed"]: m for m in measures if m["arm"] == arm}


def _balanced(r: dict[str, Any]) -> tuple[float, float]:
    """Balanced reflection accuracy and its sampling variance: the mean of two proportions of
    disjoint decision sets, var = (p_c(1 − p_c)/n_c + p_w(1 − p_w)/n_w) / 4."""
    pc, nc, pw, nw = r["stop_when_correct"], r["on_correct_images"], r["edit_when_wrong"], r["on_wrong_images"]
    if not nc or not nw:
        return float("nan"), float("nan")
    return (pc + pw) / 2, (pc * (1 - pc) / nc + pw * (1 - pw) / nw) / 4


def arm_claims(measures: Sequence[dict[str, Any]], arm: str, null: str = "null") -> dict[str, Claim]:
    """Every metric of `arm` minus `null`, over the seeds both have (sorted)."""
    a, z = _by_seed(measures, arm), _by_seed(measures, null)
    seeds = sorted(set(a) & set(z))
    if not seeds:
        raise ValueError(f"arm {arm!r} and null arm {null!r} share no finished seed (arm: {sorted(a)}, null: {sorted(z)})")
    for s in seeds:
        if a[s]["eval"]["prompts"] != z[s]["eval"]["prompts"]:
            raise ValueError(f"seed {s}: {arm!r} and {null!r} were evaluated on different prompts; not paired")
    out: dict[str, Claim] = {}
    for key, (part, split) in _PAIRED.items():
        out[key] = paired_difference([a[s][part][split] for s in seeds], [z[s][part][split] for s in seeds])
    ra, rz = [a[s]["eval"]["reflection"] for s in seeds], [z[s]["eval"]["reflection"] for s in seeds]
    out["reflection_accuracy"] = proportion_difference(
        [r["correct_decisions"] for r in ra], [r["decisions"] for r in ra],
        [r["correct_decisions"] for r in rz], [r["decisions"] for r in rz],
    )  # fmt: skip
    out["stop_when_correct"] = proportion_difference(
        [r["stops_on_correct"] for r in ra], [r["on_correct_images"] for r in ra],
        [r["stops_on_correct"] for r in rz], [r["on_correct_images"] for r in rz],
    )  # fmt: skip
    fa, fz = [a[s]["eval"]["fix_naming"] for s in seeds], [z[s]["eval"]["fix_naming"] for s in seeds]
    if all(f["on_wrong_images_with_fix"] for f in fa + fz):  # else a judge named no fixes: not measured
        out["exact_fix_rate"] = proportion_difference(
            [f["exact_fixes"] for f in fa], [f["on_wrong_images_with_fix"] for f in fa],
            [f["exact_fixes"] for f in fz], [f["on_wrong_images_with_fix"] for f in fz],
        )  # fmt: skip
    bal_a, bal_z = [_balanced(r) for r in ra], [_balanced(r) for r in rz]
    out["reflection_balanced_accuracy"] = combine_seeds(
        [x[0] - y[0] for x, y in zip(bal_a, bal_z, strict=True)],
        [x[1] + y[1] for x, y in zip(bal_a, bal_z, strict=True)],
        [min(r["decisions"], q["decisions"]) for r, q in zip(ra, rz, strict=True)],
    )
    return {key: out[key] for key in METRICS if key in out}


def arm_levels(measures: Sequence[dict[str, Any]], arm: str) -> dict[str, float]:
    """Each metric's level in `arm` (mean over its seeds), for reading the claims."""
    runs = list(_by_seed(measures, arm).values())
    out = {key: float(np.mean([np.mean(m[p][s]) for m in runs])) for key, (p, s) in _PAIRED.items()}
    refl = [m["eval"]["reflection"] for m in runs]
    out["reflection_accuracy"] = float(np.mean([r["correct_decisions"] / max(r["decisions"], 1) for r in refl]))
    out["reflection_balanced_accuracy"] = float(np.mean([_balanced(r)[0] for r in refl]))
    out["stop_when_correct"] = float(np.mean([r["stop_when_correct"] for r in refl]))
    fixes = [m["eval"]["fix_naming"] for m in runs]
    rates = [f["exact_fixes"] / f["on_wrong_images_with_fix"] for f in fixes if f["on_wrong_images_with_fix"]]
    out["exact_fix_rate"] = float(np.mean(rates)) if len(rates) == len(fixes) else float("nan")
    return out


def _pts(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def claims_markdown(
    claims: dict[str, dict[str, Claim]], levels: dict[str, dict[str, float]], null: str, seeds: Sequence[int],
    reference: dict[str, float] | None = None,
) -> str:  # fmt: skip
    """One table of claims (points, arm − null) per arm, and one of levels (%) per arm."""
    lines = []
    for arm, by_metric in claims.items():
        lines += [
            f"**{arm} − {null}** (points; seeds {', '.join(map(str, seeds))}; SE = max(within, between), "
            "`cluster.paired_stats`)",
            "",
            "| measure | arm − null | SE | SE within | SE between | per seed | samples per seed |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, c in by_metric.items():
            per_seed = ", ".join(_pts(d) for d in c.per_seed)
            n = ", ".join(map(str, c.n_per_seed))
            lines.append(
                f"| {METRICS[key]} | **{_pts(c.mean)}** | {100 * c.se:.1f} | {100 * c.se_within:.1f} | "
                f"{'–' if math.isnan(c.se_between) else f'{100 * c.se_between:.1f}'} | {per_seed} | {n} |"
            )
        lines.append("")
    names = list(levels)
    lines += ["Levels (%, mean over seeds):", "", "| measure | " + " | ".join(names)
              + (" | warm start |" if reference else " |"), "|---|" + "---|" * (len(names) + bool(reference))]  # fmt: skip
    for key, label in METRICS.items():
        cells = ["–" if math.isnan(levels[n][key]) else f"{100 * levels[n][key]:.1f}" for n in names]
        if reference:
            cells.append(f"{100 * reference[key]:.1f}" if key in reference else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
