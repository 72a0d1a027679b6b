"""The statistics of a learning claim: an arm minus its null arm, over seeds and prompts.

An arm and its null arm (`train.null_advantages`) run with the same seeds, so seed s of both draws the
same training prompts and rollout seeds, and both are evaluated on the same prompts with the same
noise. The claim is the mean over seeds of the per-seed difference D_s; its standard error is given
two ways, because with a handful of seeds neither is enough alone:

- ``se_within``: the sampling error of the evaluation given the trained weights (which prompts and
  noise were drawn), from the per-seed variances v_s of D_s: sqrt(Σ_s v_s) / S. For a paired
  per-sample metric, v_s = var_i(d_si) / n_s (sample variance, ddof 1) of the paired differences
  d_si = arm_si − null_si; for proportions of different sample sets (the reasoner's decisions, which
  differ between arms), v_s = p_a(1 − p_a)/n_a + p_0(1 − p_0)/n_0.
- ``se_between``: sd_s(D_s) / sqrt(S) (ddof 1), which also holds the training's run-to-run
  variation, but has S − 1 degrees of freedom (1 with two seeds); NaN for one seed.

``se`` is the larger of the two (the between-seed one when it exists and is larger), the number a
report should quote. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Claim", "combine_seeds", "paired_difference", "proportion_difference"]


@dataclass(frozen=True)
class Claim:
    """arm − null: `mean` of the per-seed differences `per_seed`, with its standard errors."""

    mean: float
    se: float
    se_within: float
    se_between: float
    per_seed: tuple[float, ...]
    n_per_seed: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_seed": list(self.per_seed), "n_per_seed": list(self.n_per_seed)}


def combine_seeds(diffs: Sequence[float], variances: Sequence[float], n_per_seed: Sequence[int]) -> Claim:
    """The claim from per-seed differences D_s [S] and their sampling variances v_s [S]."""
    d, v = np.asarray(diffs, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    if d.ndim != 1 or d.shape != v.shape or len(n_per_seed) != len(d) or not len(d):
        raise ValueError(
            f"need one difference, variance and count per seed, got {len(d)}, {len(v)}, {len(n_per_seed)}"
        )
    se_within = float(math.sqrt(v.sum()) / len(d))
    se_between = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    se = se_within if math.isnan(se_between) else max(se_within, se_between)
    return Claim(float(d.mean()), se, se_within, se_between, tuple(map(float, d)), tuple(map(int, n_per_seed)))


def paired_difference(arm: Sequence[Sequence[float]], null: Sequence[Sequence[float]]) -> Claim:
    """Paired per-sample values (e.g. 1/0 correct) [S][n_s] of the arm and of the null arm, sample i
    of seed s on the same prompt and noise in both."""
    if len(arm) != len(null):
        raise ValueError(f"{len(arm)} seeds in the arm but {len(null)} in the null arm")
    diffs, variances, counts = [], [], []
    for s, (a, z) in enumerate(zip(arm, null, strict=True)):
        a_, z_ = np.asarray(a, dtype=np.float64), np.asarray(z, dtype=np.float64)
        if a_.shape != z_.shape or a_.ndim != 1 or len(a_) < 2:
            raise ValueError(f"seed {s}: need the same number (>= 2) of paired samples, got {len(a_)} and {len(z_)}")
        d = a_ - z_
        diffs.append(d.mean())
        variances.append(d.var(ddof=1) / len(d))
        counts.append(len(d))
    return combine_seeds(diffs, variances, counts)


def proportion_difference(
    arm_hits: Sequence[int], arm_n: Sequence[int], null_hits: Sequence[int], null_n: Sequence[int]
) -> Claim:
    """Per-seed proportions of different sample sets: hits / n [S] of the arm and of the null arm."""
    if not len(arm_hits) == len(arm_n) == len(null_hits) == len(null_n):
        raise ValueError("need hits and counts of both arms for every seed")
    diffs, variances, counts = [], [], []
    for ha, na, hz, nz in zip(arm_hits, arm_n, null_hits, null_n, strict=True):
        if na < 1 or nz < 1:
            raise ValueError(f"a seed has no samples (arm {na}, null {nz})")
        pa, pz = ha / na, hz / nz
        diffs.append(pa - pz)
        variances.append(pa * (1 - pa) / na + pz * (1 - pz) / nz)
        counts.append(min(na, nz))
    return combine_seeds(diffs, variances, counts)
