"""Where a generator's gain comes from: the probe's prompts grouped by how often the warm start draws
them right, and the arm − null claim split over those groups.

A prompt the warm start never draws right on the probe's noises gives RL little to work with: every
image of its groups is wrong, so the groups' rewards differ only by partial checklist credit. A prompt it
always draws right has no room left. The gain on the training prompts can therefore only come from
the rest, and the most it can be is the room those prompts leave. This module measures that split,
so a report can say whether a miss is a lack of signal or a lack of room. Beside it, the score
spread of the training groups of each class (`group_spread`) says how much signal RL had there.

Grouping by the warm start (not by either arm) keeps the split fair: the warm start's draws are
the same for the arm and its null arm, so the arm − null difference within each group is not
selected on either arm's noise. (Both arms still regress towards the prompts' true rates, equally.)

Sample i of the probe has the same prompt and noise in every run (`examples.shapesworld.probe`), so
within a group the claim is the paired difference over that group's samples
(`cluster.paired_stats.paired_difference`). With a group's share w of the samples, its points of the
total are w × its claim, and the groups' points add up to the whole claim exactly. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cluster.paired_stats import Claim, paired_difference

__all__ = ["CLASSES", "ClassGain", "GroupSpread", "WarmStartClass", "warm_start_classes", "warm_start_room",
           "gain_by_warm_start_class", "group_spread", "headroom_from_measures", "headroom_markdown"]  # fmt: skip

CLASSES = ("never", "sometimes", "always")  # right on none, some or all of the warm start's samples of a prompt


@dataclass(frozen=True)
class ClassGain:
    """One group of prompts: `share` of the probe's samples; levels are fractions right (mean over
    seeds); `claim` is arm − null within the group; `room` = share × (1 − null level), the most
    points the group could still add over the null arm."""

    name: str
    prompts: int
    share: float
    warm_start: float
    arm: float
    null: float
    claim: Claim | None  # None when the group is empty
    score_claim: Claim | None = None  # arm − null of the judge's score (fraction of checklist items met), if given

    @property
    def points_of_total(self) -> float:
        return self.share * self.claim.mean if self.claim else 0.0

    @property
    def se_of_total(self) -> float:
        return self.share * self.claim.se if self.claim else 0.0

    @property
    def room(self) -> float:
        return self.share * (1.0 - self.null) if self.claim else 0.0


def warm_start_classes(prompts: Sequence[str], warm_correct: Sequence[bool]) -> dict[str, str]:
    """prompt -> "never" | "sometimes" | "always": how many of the warm start's samples of it
    (sample i is prompt `prompts[i]`) were drawn right."""
    if len(prompts) != len(warm_correct):
        raise ValueError(f"{len(prompts)} prompts but {len(warm_correct)} warm-start verdicts")
    hits: dict[str, list[bool]] = {}
    for p, ok in zip(prompts, warm_correct, strict=True):
        hits.setdefault(p, []).append(bool(ok))
    return {p: CLASSES[0] if not any(v) else CLASSES[2] if all(v) else CLASSES[1] for p, v in hits.items()}


@dataclass(frozen=True)
class WarmStartClass:
    """One warm-start class before any RL: its distinct `prompts`, their `share` of the samples and
    the warm start's fraction `right` on them."""

    name: str
    prompts: int
    share: float
    right: float


def warm_start_room(prompts: Sequence[str], warm_correct: Sequence[bool]) -> list[WarmStartClass]:
    """The warm start's samples split by class (`CLASSES` order; `right` is NaN for an empty class):
    how much of the probe sits on prompts RL can work on before any run is made."""
    classes = warm_start_classes(prompts, warm_correct)
    label, w = np.array([classes[p] for p in prompts]), np.asarray(warm_correct, dtype=np.float64)
    return [WarmStartClass(name, sum(c == name for c in classes.values()), float((label == name).mean()),
                           float(w[label == name].mean()) if (label == name).any() else float("nan"))
            for name in CLASSES]  # fmt: skip


def gain_by_warm_start_class(
    arm: Sequence[Sequence[bool]], null: Sequence[Sequence[bool]], prompts: Sequence[str], warm_correct: Sequence[bool],
    arm_scores: Sequence[Sequence[float]] | None = None, null_scores: Sequence[Sequence[float]] | None = None,
) -> list[ClassGain]:  # fmt: skip
    """The claim arm − null split by warm-start class.

    arm, null: per seed, the probe's verdicts [S][n] (sample i on prompt `prompts[i]` in every run);
    warm_correct: the warm start's verdicts [n] on the same samples. One `ClassGain` per class, in
    `CLASSES` order; their `points_of_total` add up to `paired_difference(arm, null).mean`. With the
    judge's scores of the same samples ([S][n] each), also the partial-credit claim per class: a
    prompt never drawn right can still gain checklist items.
    """
    classes = warm_start_classes(prompts, warm_correct)
    label = np.array([classes[p] for p in prompts])
    a, z, w = (np.asarray(x, dtype=np.float64) for x in (arm, null, warm_correct))
    if a.shape != z.shape or a.ndim != 2 or a.shape[1] != len(prompts):
        raise ValueError(f"need [seeds][{len(prompts)}] verdicts in both arms, got {a.shape} and {z.shape}")
    scored = arm_scores is not None and null_scores is not None
    if scored:
        sa, sz = np.asarray(arm_scores, dtype=np.float64), np.asarray(null_scores, dtype=np.float64)
        if sa.shape != a.shape or sz.shape != a.shape:
            raise ValueError(f"need scores shaped like the verdicts {a.shape}, got {sa.shape} and {sz.shape}")
    out = []
    for name in CLASSES:
        mask = label == name
        n = int(mask.sum())
        if n == 0:
            out.append(ClassGain(name, 0, 0.0, float("nan"), float("nan"), float("nan"), None))
            continue
        claim = paired_difference(a[:, mask], z[:, mask]) if n >= 2 else None
        score_claim = paired_difference(sa[:, mask], sz[:, mask]) if scored and n >= 2 else None
        out.append(ClassGain(
            name, len({p for p, m in zip(prompts, mask, strict=True) if m}), n / len(prompts),
            float(w[mask].mean()), float(a[:, mask].mean()), float(z[:, mask].mean()), claim, score_claim,
        ))  # fmt: skip
    return out


@dataclass(frozen=True)
class GroupSpread:
    """The training signal of one class: of `groups` generate groups (one prompt's images), the
    fraction `with_spread` whose judge scores differ at all, and the mean within-group score std
    (population std; a group advantage is r − mean(r), so this is its typical size)."""

    groups: int
    with_spread: float
    mean_std: float


def group_spread(groups: Iterable[tuple[str, Sequence[float]]], classes: dict[str, str]) -> dict[str, GroupSpread]:
    """Per warm-start class, the score spread of generate groups given as (prompt, scores of its images);
    groups of prompts outside `classes` are left out."""
    stds: dict[str, list[float]] = {name: [] for name in CLASSES}
    for prompt, scores in groups:
        if prompt in classes and len(scores) >= 2:
            stds[classes[prompt]].append(float(np.std(np.asarray(scores, dtype=np.float64))))
    return {name: GroupSpread(len(v), float(np.mean([x > 0 for x in v])) if v else float("nan"),
                              float(np.mean(v)) if v else float("nan")) for name, v in stds.items()}  # fmt: skip


def headroom_markdown(rows: Sequence[ClassGain], arm: str, null: str, spread: dict[str, GroupSpread] | None = None) -> str:
    """A table of the split (points and %), one row per warm-start class and the total; with `spread`,
    the arm's training groups of each class too."""
    scored = any(r.score_claim for r in rows)
    extra = (f" | score: {arm} − {null} in the group" if scored else "") + (
        " | generate groups | with score spread | mean score std |" if spread else " |")
    lines = [
        f"**Where the gain of {arm} − {null} on the training prompts comes from** (prompts grouped by how "
        "many of the warm start's probe samples of them are right; `examples.shapesworld.headroom`)",
        "",
        "| warm start draws it right | prompts | share of samples | warm start % | "
        f"{arm} % | {null} % | {arm} − {null} in the group | points of the total | room (points)" + extra,
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if scored else "") + ("---|---|---|" if spread else ""),
    ]
    for r in rows:
        cells = [r.name, str(r.prompts), f"{100 * r.share:.0f} %"]
        if r.claim is None:
            cells += ["–"] * (7 if scored else 6)
        else:
            cells += [f"{100 * r.warm_start:.1f}", f"{100 * r.arm:.1f}", f"{100 * r.null:.1f}",
                      f"{100 * r.claim.mean:+.1f} ± {100 * r.claim.se:.1f}",
                      f"{100 * r.points_of_total:+.1f} ± {100 * r.se_of_total:.1f}", f"{100 * r.room:.1f}"]  # fmt: skip
        if scored:
            cells.append(f"{100 * r.score_claim.mean:+.1f} ± {100 * r.score_claim.se:.1f}" if r.score_claim else "–")
        if spread:
            g = spread[r.name]
            cells += [str(g.groups), "–", "–"] if not g.groups else [
                str(g.groups), f"{100 * g.with_spread:.0f} %", f"{g.mean_std:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r.points_of_total for r in rows)
    lines.append(f"| all | {sum(r.prompts for r in rows)} | 100 % | | | | | {100 * total:+.1f} | "
                 f"{100 * sum(r.room for r in rows if r.claim):.1f} |" + (" |" if scored else "")
                 + (" | | |" if spread else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def headroom_from_measures(measures: Sequence[dict[str, Any]], arm: str, null: str, prompts: Sequence[str],
                           warm_correct: Sequence[bool]) -> list[ClassGain]:  # fmt: skip
    """`gain_by_warm_start_class` on the training-prompt probe of the runs' measures
    (`examples.shapesworld.arms_report`), over the seeds both arms finished."""
    a = {m["seed"]: m for m in measures if m["arm"] == arm}
    z = {m["seed"]: m for m in measures if m["arm"] == null}
    seeds = sorted(set(a) & set(z))
    if not seeds:
        raise ValueError(f"arm {arm!r} and null arm {null!r} share no finished seed")
    runs = [a[s] for s in seeds] + [z[s] for s in seeds]
    scores = all("probe_score" in m for m in runs)
    return gain_by_warm_start_class(
        [a[s]["probe"]["train"] for s in seeds], [z[s]["probe"]["train"] for s in seeds], prompts, warm_correct,
        [a[s]["probe_score"]["train"] for s in seeds] if scores else None,
        [z[s]["probe_score"]["train"] for s in seeds] if scores else None,
    )  # fmt: skip
