"""ShapesWorld results: the paper-style table (tag × round, before vs after RL), the reflection
("understanding") accuracy, rounds to plateau, and a PNG plot. Pure: eval reports and metrics rows in,
files out; `examples.shapesworld.run` calls it after the two evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from reward.instruction_match import best_match
from rollout.evaluation import EvalReport
from rollout.judge_fixes import fixes_in
from rollout.trajectory import Round, Trajectory

__all__ = ["reflect_decisions", "reflection_accuracy", "fix_naming", "edit_outcomes", "plateau_round", "summarize_run",
           "results_markdown", "write_results"]

PLATEAU_TOLERANCE = 0.01  # a round is on the plateau when within 1 point of the best round


def reflect_decisions(trajectories: Sequence[Trajectory]) -> Iterator[tuple[Round, Round]]:
    """Every reflect decision as (the round looked at, the round that decided): round r ≥ 1 reflects
    on round r−1's image, until the sample stops (the stop is the last decision)."""
    for t in trajectories:
        for prev, cur in zip(t.rounds, t.rounds[1:], strict=False):
            yield prev, cur
            if cur.stopped:
                break


def reflection_accuracy(trajectories: Sequence[Trajectory]) -> dict[str, float | int]:
    """How often the reasoner says "no further edit" exactly when the judge calls the image it looked
    at correct. Every reflect decision counts (round r ≥ 1 reflects on round r−1's image), until the
    sample stops. Also split by the truth: stop rate on correct images, edit rate on wrong ones, and
    their mean ("balanced"): most images are wrong, so a reasoner that always edits scores high on
    plain accuracy and exactly 0.5 on the balanced one."""
    hits, stops_on_correct, edits_on_wrong, n_correct, n_wrong = 0, 0, 0, 0, 0
    for prev, cur in reflect_decisions(trajectories):
        if prev.correct:
            n_correct += 1
            stops_on_correct += cur.stopped
        else:
            n_wrong += 1
            edits_on_wrong += not cur.stopped
        hits += cur.stopped == prev.correct
    n = n_correct + n_wrong
    stop_when_correct = stops_on_correct / n_correct if n_correct else float("nan")
    edit_when_wrong = edits_on_wrong / n_wrong if n_wrong else float("nan")
    return {
        "accuracy": hits / n if n else float("nan"),
        "balanced_accuracy": (stop_when_correct + edit_when_wrong) / 2,
        "stop_when_correct": stop_when_correct,
        "edit_when_wrong": edit_when_wrong,
        "decisions": n,
        "correct_decisions": hits,
        "on_correct_images": n_correct,
        "on_wrong_images": n_wrong,
        "stops_on_correct": stops_on_correct,
    }


def fix_naming(trajectories: Sequence[Trajectory]) -> dict[str, float | int]:
    """How often the reasoner, shown a wrong image, asks for exactly the fix the judge names for it.

    Every reflect decision on a wrong image counts (until the sample stops), as in
    `reflection_accuracy`. An exact fix is an edit whose instruction matches one of the judge's fixes
    of that image (`details["fixes"]`) fully: kind, object and attribute all match
    (`reward.instruction_match.best_match` score 1). A stop on a wrong image names no fix. Rate =
    exact fixes / decisions on wrong images whose judge named a fix (`on_wrong_images_with_fix`; NaN
    without any: a judge that names no fixes, or trajectories written before judges named them).
    """
    on_wrong, edits, exact, no_fix = 0, 0, 0, 0
    for prev, cur in reflect_decisions(trajectories):
        if prev.correct:
            continue
        on_wrong += 1
        fixes = fixes_in(prev.judge_details)
        no_fix += not fixes
        if not cur.stopped:
            edits += 1
            match = best_match(cur.instruction, fixes)
            exact += match is not None and match.score == 1.0
    with_fix = on_wrong - no_fix
    return {
        "exact_fix_rate": exact / with_fix if with_fix else float("nan"),
        "exact_fixes": exact,
        "edits_on_wrong_images": edits,
        "on_wrong_images": on_wrong,
        "on_wrong_images_with_fix": with_fix,
    }


def edit_outcomes(trajectories: Sequence[Trajectory]) -> dict[str, int]:
    """What the edits did, by the judge's verdict before and after each edit (a stop is not an
    edit): wrong images fixed or left wrong, correct images kept or broken. Final-round accuracy
    minus round-0 accuracy is exactly (fixed − broken) / samples."""
    out = {"fixed": 0, "still_wrong": 0, "kept": 0, "broken": 0}
    for prev, cur in reflect_decisions(trajectories):
        if not cur.stopped:
            key = ("kept" if cur.correct else "broken") if prev.correct else ("fixed" if cur.correct else "still_wrong")
            out[key] += 1
    return out


def plateau_round(accuracy: Sequence[float], tolerance: float = PLATEAU_TOLERANCE) -> int:
    """First round whose accuracy is within `tolerance` of the best round's."""
    if not accuracy:
        raise ValueError("plateau_round needs at least one round")
    best = max(accuracy)
    return next(r for r, a in enumerate(accuracy) if a >= best - tolerance)


def _eval_summary(report: EvalReport) -> dict[str, Any]:
    acc = [s.accuracy for s in report.overall]
    return {
        "accuracy_per_round": acc,
        "score_per_round": [s.mean_score for s in report.overall],
        "category_mean_accuracy": report.category_mean_accuracy,
        "accuracy_per_tag": {c: [s.accuracy for s in rows] for c, rows in report.categories.items()},
        "finish_rate": [s.finish_rate for s in report.overall],
        "mean_rounds": [s.mean_rounds for s in report.overall],
        "plateau_round": plateau_round(acc),
        "reflection": reflection_accuracy(report.trajectories),
        "edits": edit_outcomes(report.trajectories),
        "fix_naming": fix_naming(report.trajectories),
        "num_prompts": report.num_prompts,
        "distinct_prompts": len({t.prompt for t in report.trajectories}),
    }


def summarize_run(
    before: EvalReport, after: EvalReport, metrics_rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """results.json content: both evaluations, their differences, and the reward curve."""
    b, a = _eval_summary(before), _eval_summary(after)
    keys = ("generate/score_mean", "generate/accuracy", "refine/score_mean", "refine/accuracy", "refine/stop_rate")
    curve = [{"step": r.get("step"), **{k: r.get(k) for k in keys}} for r in metrics_rows]
    return {
        "before": b,
        "after": a,
        "delta": {
            "final_round_accuracy": a["accuracy_per_round"][-1] - b["accuracy_per_round"][-1],
            "round0_accuracy": a["accuracy_per_round"][0] - b["accuracy_per_round"][0],
            "reflection_accuracy": a["reflection"]["accuracy"] - b["reflection"]["accuracy"],
            "reflection_balanced_accuracy": a["reflection"]["balanced_accuracy"] - b["reflection"]["balanced_accuracy"],
            "plateau_round": a["plateau_round"] - b["plateau_round"],
        },
        "reward_curve": curve,
        **(extra or {}),
    }


def _samples(summary: dict[str, Any]) -> str:
    n, distinct = summary["num_prompts"], summary["distinct_prompts"]
    if distinct == n:
        return f"{n} prompts"
    return f"{n} samples of {distinct} distinct prompts (repeats with their own noise)"


def _of(k: int, n: int) -> str:
    return f"{k} of {n}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def console_summary(results: dict[str, Any], run_dir: Path) -> str:
    """The few lines a run ends with: accuracy per round before and after RL, reflection, and where
    the gallery, results and logs are."""
    b, a = results["before"], results["after"]
    rounds = len(b["accuracy_per_round"])
    steps = results.get("config", {}).get("steps")
    head = f"{'accuracy per round':<20}" + "".join(f"{f'round {r}':>9}" for r in range(rounds))
    lines = [
        f"ShapesWorld R3: {steps} RL steps; evaluation on {_samples(b)} of the held-out split, exact judge",
        head,
        *(f"{name:<20}" + "".join(f"{_pct(x) + ' %':>9}" for x in s["accuracy_per_round"])
          for name, s in (("  before RL", b), ("  after RL", a))),
        "the reasoner's decision after each image (before RL -> after RL):",
        f"  stops on a correct image {_pct(b['reflection']['stop_when_correct'])} % -> "
        f"{_pct(a['reflection']['stop_when_correct'])} %; edits a wrong one {_pct(b['reflection']['edit_when_wrong'])} % -> "
        f"{_pct(a['reflection']['edit_when_wrong'])} % (balanced accuracy {_pct(b['reflection']['balanced_accuracy'])} % -> "
        f"{_pct(a['reflection']['balanced_accuracy'])} %)",
        f"  edits of wrong images that fixed them: {_of(b['edits']['fixed'], b['edits']['fixed'] + b['edits']['still_wrong'])}"
        f" -> {_of(a['edits']['fixed'], a['edits']['fixed'] + a['edits']['still_wrong'])}; edits that broke a correct image: "
        f"{b['edits']['broken']} -> {a['edits']['broken']}",
        f"run directory: {run_dir}",
        f"gallery: {run_dir / 'eval-final' / 'gallery.html'} (before RL: eval-before/gallery.html)",
        "results: results.md, results.json, results.png in the run directory",
    ]
    if (run_dir / "engine.log").is_file():
        lines.append(f"engine logs: {run_dir / 'engine.log'}")
    return "\n".join(lines)


def results_markdown(results: dict[str, Any]) -> str:
    """The table per tag × round, before → after, plus the headline numbers."""
    b, a, d = results["before"], results["after"], results["delta"]
    rounds = len(b["accuracy_per_round"])
    head = "| tag | " + " | ".join(f"round {r}" for r in range(rounds)) + " |"
    lines = [
        "# ShapesWorld: R3 RL results (held-out test split)",
        "",
        f"Accuracy in % (before RL → after RL), {_samples(b)}, ODE sampling, up to {rounds} rounds.",
        "",
        head,
        "|" + "---|" * (rounds + 1),
    ]
    for tag in sorted(b["accuracy_per_tag"]):
        cells = [f"{_pct(x)} → {_pct(y)}" for x, y in zip(b["accuracy_per_tag"][tag], a["accuracy_per_tag"][tag], strict=True)]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    for name, key in (("**overall**", "accuracy_per_round"), ("**tag mean**", "category_mean_accuracy")):
        cells = [f"{_pct(x)} → {_pct(y)}" for x, y in zip(b[key], a[key], strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rb, ra = b["reflection"], a["reflection"]
    lines += [
        "",
        "| measure | before | after | change |",
        "|---|---|---|---|",
        f"| final-round accuracy (%) | {_pct(b['accuracy_per_round'][-1])} | {_pct(a['accuracy_per_round'][-1])} | "
        f"{100 * d['final_round_accuracy']:+.1f} points |",
        f"| round-0 accuracy (%) | {_pct(b['accuracy_per_round'][0])} | {_pct(a['accuracy_per_round'][0])} | "
        f"{100 * d['round0_accuracy']:+.1f} points |",
        f"| reflection accuracy (%) | {_pct(rb['accuracy'])} | {_pct(ra['accuracy'])} | "
        f"{100 * d['reflection_accuracy']:+.1f} points |",
        f"| balanced reflection accuracy (%) | {_pct(rb['balanced_accuracy'])} | {_pct(ra['balanced_accuracy'])} | "
        f"{100 * d['reflection_balanced_accuracy']:+.1f} points |",
        f"| stop when correct (%) | {_pct(rb['stop_when_correct'])} | {_pct(ra['stop_when_correct'])} | |",
        f"| edit when wrong (%) | {_pct(rb['edit_when_wrong'])} | {_pct(ra['edit_when_wrong'])} | |",
        f"| exact fix named on a wrong image (%) | {_pct(b['fix_naming']['exact_fix_rate'])} | "
        f"{_pct(a['fix_naming']['exact_fix_rate'])} | |",
        f"| rounds to plateau | {b['plateau_round']} | {a['plateau_round']} | {d['plateau_round']:+d} |",
    ]
    eb, ea = b["edits"], a["edits"]
    lines += [
        f"| edits that fixed a wrong image | {_of(eb['fixed'], eb['fixed'] + eb['still_wrong'])} | "
        f"{_of(ea['fixed'], ea['fixed'] + ea['still_wrong'])} | |",
        f"| edits that broke a correct image | {_of(eb['broken'], eb['broken'] + eb['kept'])} | "
        f"{_of(ea['broken'], ea['broken'] + ea['kept'])} | |",
    ]
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Two panels: accuracy per round before vs after; reward per step (generate and refine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("before", "o--"), ("after", "o-")):
        acc = results[name]["accuracy_per_round"]
        left.plot(range(len(acc)), [100 * x for x in acc], style, label=f"{name} RL")
    left.set(xlabel="round", ylabel="held-out accuracy (%)", title="Accuracy per R3 round")
    left.set_xticks(range(len(results["before"]["accuracy_per_round"])))
    left.legend()
    curve = results["reward_curve"]
    for key, label in (("generate/score_mean", "generate stage"), ("refine/score_mean", "refine stage")):
        pts = [(r["step"], r[key]) for r in curve if r.get(key) is not None]
        if pts:
            right.plot(*zip(*pts, strict=True), label=label)
    right.set(xlabel="step", ylabel="mean judge score", title="Training reward")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(out_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """results.json, results.md and results.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1, sort_keys=True))
    paths["md"].write_text(results_markdown(results))
    plot_results(results, paths["png"])
    return paths
