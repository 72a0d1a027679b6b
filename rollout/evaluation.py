"""Deterministic multi-round R3 evaluation: 1 generation + up to 3 refinements.

Design: docs/design.md#evaluation.

ODE sampling (`SamplerSettings(stochastic="none")`), low temperature and seeds drawn from
`EvalSettings.seed`, one sample per prompt. A stop in round r freezes that sample: its image and
score are carried into every later round. Reported per round, overall and per category:
accuracy (mean `correct`), mean score, improved / worse / unchanged fractions vs the previous round
(by score; None for round 0), finish rate (fraction that has stopped by this round), mean
rounds used (images drawn so far: 1 + edits made) and judge errors (judgements of this round's
images that came back as error results, scored 0). `category_mean_accuracy` is the unweighted
mean of the category accuracies per round (GenEval's overall score).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rollout.chain import run_chain
from rollout.datasets import PromptRecord
from rollout.interfaces import Generator, Judge, Reasoner, SamplerSettings
from rollout.stages import StageSettings
from rollout.templates import Templates
from rollout.trajectory import Trajectory

__all__ = ["EvalSettings", "RoundStats", "EvalReport", "evaluate", "summarize"]

_TOL = 1e-9


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation samples; samplers are forced to ODE (`stochastic="none"`)."""

    max_rounds: int = 4
    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 64
    generate_sampler: SamplerSettings = field(default_factory=SamplerSettings)
    edit_sampler: SamplerSettings = field(default_factory=SamplerSettings)
    templates: Templates = field(default_factory=Templates)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")

    def stage_settings(self) -> StageSettings:
        ode = dict(stochastic="none", keep_training_data=False)
        return StageSettings(
            group_size=1,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            generate_sampler=replace(self.generate_sampler, **ode),
            edit_sampler=replace(self.edit_sampler, **ode),
            templates=self.templates,
        )


@dataclass
class RoundStats:
    round: int
    n: int
    accuracy: float
    mean_score: float
    improved: float | None
    worse: float | None
    unchanged: float | None
    finish_rate: float
    mean_rounds: float
    errors: int  # judgements made in this round that returned an error result (scored 0)


@dataclass
class EvalReport:
    max_rounds: int
    num_prompts: int
    overall: list[RoundStats]
    categories: dict[str, list[RoundStats]]
    category_mean_accuracy: list[float]
    trajectories: list[Trajectory] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the trajectories (they go to parquet)."""
        return {
            "max_rounds": self.max_rounds,
            "num_prompts": self.num_prompts,
            "overall": [asdict(s) for s in self.overall],
            "categories": {c: [asdict(s) for s in rows] for c, rows in self.categories.items()},
            "category_mean_accuracy": self.category_mean_accuracy,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def to_markdown(self) -> str:
        head = ("| category | round | n | accuracy | mean score | improved | worse | unchanged | finish rate | "
                "mean rounds | judge errors |")
        lines = [head, "|" + "---|" * 11]
        for name, rows in [("overall", self.overall)] + sorted(self.categories.items()):
            lines += [_md_row(name, s) for s in rows]
        lines += ["", "| round | category-mean accuracy |", "|---|---|"]
        lines += [f"| {r} | {a:.4f} |" for r, a in enumerate(self.category_mean_accuracy)]
        return "\n".join(lines) + "\n"


def evaluate(
    records: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: EvalSettings | None = None,
) -> EvalReport:
    """Run deterministic multi-round R3 on `records` and summarise it."""
    s = settings or EvalSettings()
    rng = random.Random(s.seed)
    trajs = run_chain(
        records, reasoner, generator, judge, s.stage_settings(), rng, s.max_rounds, stages=("eval", "eval")
    )
    return summarize(trajs, [r.category for r in records], s.max_rounds)


def summarize(trajectories: Sequence[Trajectory], categories: Sequence[str], max_rounds: int) -> EvalReport:
    """Per-round tables from finished trajectories (one per prompt, `categories` aligned)."""
    if len(trajectories) != len(categories):
        raise ValueError(f"{len(trajectories)} trajectories but {len(categories)} categories")
    if not trajectories:
        raise ValueError("nothing to summarise: no trajectories")
    timelines = [_timeline(t, max_rounds) for t in trajectories]
    overall = _stats(timelines, max_rounds)
    by_cat: dict[str, list[tuple]] = {}
    for c, tl in zip(categories, timelines, strict=True):
        by_cat.setdefault(c or "uncategorized", []).append(tl)
    cats = {c: _stats(tls, max_rounds) for c, tls in sorted(by_cat.items())}
    cat_mean = [sum(rows[r].accuracy for rows in cats.values()) / len(cats) for r in range(max_rounds)]
    return EvalReport(max_rounds, len(trajectories), overall, cats, cat_mean, list(trajectories))


# ------------------------------------------------------------------------------------ helpers


def _timeline(t: Trajectory, max_rounds: int) -> list[tuple[float, bool, bool, int, bool]]:
    """(score, correct, finished, rounds used, judge error in this round) at each round 0..max_rounds-1,
    frozen after a stop (a stopped or finished sample makes no judgement, so no error)."""
    if not t.rounds or len(t.rounds) > max_rounds:
        raise ValueError(f"trajectory has {len(t.rounds)} rounds; expected 1..{max_rounds}")
    out, finished, used = [], False, 0
    for r in range(max_rounds):
        errored = False
        if r < len(t.rounds):
            rnd = t.rounds[r]
            finished = finished or rnd.stopped
            used += 0 if rnd.stopped else 1
            errored = not rnd.stopped and "error" in rnd.judge_details
            state = (rnd.score, rnd.correct)
        out.append((state[0], state[1], finished, used, errored))
    return out


def _stats(timelines: list[list[tuple]], max_rounds: int) -> list[RoundStats]:
    n = len(timelines)
    rows = []
    for r in range(max_rounds):
        now = [tl[r] for tl in timelines]
        if r == 0:
            imp = wor = unc = None
        else:
            diffs = [tl[r][0] - tl[r - 1][0] for tl in timelines]
            imp = sum(d > _TOL for d in diffs) / n
            wor = sum(d < -_TOL for d in diffs) / n
            unc = sum(abs(d) <= _TOL for d in diffs) / n
        rows.append(
            RoundStats(
                round=r,
                n=n,
                accuracy=sum(x[1] for x in now) / n,
                mean_score=sum(x[0] for x in now) / n,
                improved=imp,
                worse=wor,
                unchanged=unc,
                finish_rate=sum(x[2] for x in now) / n,
                mean_rounds=sum(x[3] for x in now) / n,
                errors=sum(x[4] for x in now),
            )
        )
    return rows


def _md_row(name: str, s: RoundStats) -> str:
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    return (
        f"| {name} | {s.round} | {s.n} | {s.accuracy:.4f} | {s.mean_score:.4f} | {pct(s.improved)} | "
        f"{pct(s.worse)} | {pct(s.unchanged)} | {s.finish_rate:.3f} | {s.mean_rounds:.3f} | {s.errors} |"
    )
