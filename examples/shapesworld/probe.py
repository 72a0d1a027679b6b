"""Paired generator probe: `python -m examples.shapesworld.probe [--prompts 270] CHECKPOINT ...`.

Did RL change the generator? The R3 evaluation answers on 90 held-out prompts (about ±5 points of
noise), and the per-step training accuracy moves with the prompts each step happens to draw (two
runs with the same seed draw the same prompts and show the same wiggles). This probe draws
text-to-image (round 0, ODE) images from the warm-started generator and from each checkpoint's
transformer on the *same* fixed, tag-balanced train and held-out prompt sets with the *same*
initial noise per prompt, so the differences are the weights' alone, on both splits; and edits of
held-out wrong renders (canonical layout, as the warm start's) with the instruction that fixes them.
Prints a table and writes `probe.json` (default: beside the first checkpoint's run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["probe_prompts", "probe_generator", "ode_settings", "to_markdown", "main"]

log = logging.getLogger(__name__)


def probe_prompts(n: int, seed: int = 123) -> dict[str, list[dict[str, Any]]]:
    """`n` tag-balanced tasks from each ShapesWorld split (drawn with replacement; fixed by `seed`)."""
    from examples.shapesworld.tasks import build_splits, sample_tasks

    if n < 1:
        raise ValueError(f"prompts={n}; allowed: >= 1")
    splits = build_splits(seed=0)
    return {
        name: sample_tasks(getattr(splits, name), n, np.random.default_rng(seed))
        for name in ("train", "test")
    }


def probe_generator(
    base: Path, weights: dict[str, Path | None], prompts: dict[str, list[dict[str, Any]]], *, edits: Any = None,
    oracle_rounds: int = 0, num_steps: int = 8, guidance: float = 3.5, cfg_scale: float = 4.0, size: int = 64,
    max_sequence_length: int = 20,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Judge accuracy and mean score per split (and per tag) for each named transformer weights
    folder (None: `base`'s own), every variant on the same prompts and noise. With `edits` (a
    `examples.shapesworld.recipe.RenderedPool`), also "edit": each wrong render edited with the
    instruction that fixes it, judged against its prompt."""
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest

    settings = ode_settings(num_steps, guidance, cfg_scale, size)
    jobs = {
        split: ([ImageRequest(m["prompt"], seed=i, noise_seed=i) for i, m in enumerate(metas)], metas)
        for split, metas in prompts.items()
    }
    if edits is not None:
        jobs["edit"] = (
            [
                ImageRequest(ins, seed=i, noise_seed=i, source_image=w)
                for i, (ins, w) in enumerate(zip(edits.instructions, edits.wrong, strict=True))
            ],
            edits.metas,
        )
    out: dict[str, dict[str, Any]] = {}
    for name, folder in weights.items():
        worker = DiffusionWorker(str(base), seed=0, max_sequence_length=max_sequence_length)
        try:
            if folder is not None:
                worker.load_weights(1, str(folder))
            images = {
                split: [x.image for x in worker.sample(reqs, settings)] for split, (reqs, _) in jobs.items()
            }
            out[name] = {split: _judged(images[split], metas) for split, (_, metas) in jobs.items()}
            if oracle_rounds:
                out[name]["oracle"] = _oracle_r3(
                    worker, settings, images["test"], prompts["test"], oracle_rounds
                )
        finally:
            worker.shutdown()
        log.info("%s: %s", name, {s: round(r["accuracy"], 3) for s, r in out[name].items()})
    return out


def ode_settings(num_steps: int, guidance: float, cfg_scale: float, size: int):
    """Deterministic (ODE) sampling as the evaluations judge it: no SDE step, nothing kept for a learner."""
    from rollout.interfaces import SamplerSettings

    return SamplerSettings(
        num_steps=num_steps, noise_level=0.0, stochastic="none", guidance=guidance, cfg_scale=cfg_scale,
        height=size, width=size, keep_training_data=False,
    )  # fmt: skip


def _oracle_r3(
    worker, settings, images: list[Any], metas: list[dict[str, Any]], rounds: int
) -> dict[str, Any]:
    """Rounds 1..`rounds` of R3 with the judge as the reasoner; round r's edit noise is seeded
    apart from round 0's and from the other rounds' (`noise_seed` = prompt index + 100000 r)."""
    from examples.shapesworld.fixes import fixing_instruction
    from examples.shapesworld.judge import ShapesJudge
    from rollout.interfaces import ImageRequest

    judge, images = ShapesJudge(), list(images)
    fixes = [fixing_instruction(m, judge.detect(im)) for m, im in zip(metas, images, strict=True)]
    by_round = [float(np.mean([f is None for f in fixes]))]
    for r in range(1, rounds + 1):
        wrong = [k for k, f in enumerate(fixes) if f is not None]
        reqs = [
            ImageRequest(fixes[k], seed=k, noise_seed=k + 100_000 * r, source_image=images[k]) for k in wrong
        ]
        for k, x in zip(wrong, worker.sample(reqs, settings) if reqs else [], strict=True):
            images[k] = x.image
            fixes[k] = fixing_instruction(metas[k], judge.detect(x.image))
        by_round.append(float(np.mean([f is None for f in fixes])))
    return {**_judged(images, metas), "accuracy_by_round": by_round}


def _judged(images: list[Any], metas: list[dict[str, Any]]) -> dict[str, Any]:
    from examples.shapesworld.judge import ShapesJudge
    from rollout.interfaces import JudgeItem

    verdicts = ShapesJudge().score(
        [JudgeItem(im, m["prompt"], m) for im, m in zip(images, metas, strict=True)]
    )
    by_tag: dict[str, list[bool]] = {}
    for m, v in zip(metas, verdicts, strict=True):
        by_tag.setdefault(m["tag"], []).append(v.correct)
    return {
        "accuracy": float(np.mean([v.correct for v in verdicts])),
        "score": float(np.mean([v.score for v in verdicts])),
        "accuracy_by_tag": {t: float(np.mean(v)) for t, v in sorted(by_tag.items())},
        "n": len(metas),
        "correct": [bool(v.correct) for v in verdicts],  # per sample, for paired comparisons
        "scores": [float(v.score) for v in verdicts],  # per sample: the fraction of checklist items met
    }


def to_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per variant: accuracy and mean score on each split, with the change from the first row."""
    names = list(results)
    splits = list(results[names[0]])
    head = "| generator | " + " | ".join(f"{s} accuracy (%) | {s} score" for s in splits) + " |"
    lines = [head, "|---|" + "---|---|" * len(splits)]
    first = results[names[0]]
    for name in names:
        cells = []
        for s in splits:
            acc, score = 100 * results[name][s]["accuracy"], results[name][s]["score"]
            d_acc, d_score = acc - 100 * first[s]["accuracy"], score - first[s]["score"]
            delta = name != names[0]
            cells.append(f"{acc:.1f}" + (f" ({d_acc:+.1f})" if delta else ""))
            cells.append(f"{score:.3f}" + (f" ({d_score:+.3f})" if delta else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from cluster.checkpoint import require_complete, run_dir_of
    from examples.shapesworld.models import WARM_START, warm_start_path

    ap = argparse.ArgumentParser(prog="python -m examples.shapesworld.probe", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="checkpoint folders (<run>/checkpoints/step-N) to compare")
    ap.add_argument("--prompts", type=int, default=270, help="prompts per split (tag-balanced)")
    ap.add_argument(
        "--warm-start", type=Path, default=WARM_START, help=f"the warm start the runs began from (default {WARM_START})"
    )
    ap.add_argument(
        "--oracle-rounds", type=int, default=3, help="edit rounds of R3 with the judge as reasoner (0: skip)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default: <first run>/probe.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = warm_start_path("flux", args.warm_start)
        checkpoints = [require_complete(c) for c in args.checkpoints]
        prompts = probe_prompts(args.prompts)
        if args.oracle_rounds < 0:
            raise ValueError(f"--oracle-rounds={args.oracle_rounds}; allowed: >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    weights: dict[str, Path | None] = {"warm start": None}
    for ck in checkpoints:
        weights[f"{run_dir_of(ck).name}/{ck.name}"] = ck / "diffusion_learner" / "weights"
    from examples.shapesworld.recipe import make_pool
    from examples.shapesworld.tasks import build_splits

    edits = make_pool(build_splits(seed=0).test, args.prompts, seed=456, layout="canonical")
    results = probe_generator(base, weights, prompts, edits=edits, oracle_rounds=args.oracle_rounds)
    out = args.out or ((run_dir_of(checkpoints[0]) if checkpoints else Path("runs")) / "probe.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts_per_split": args.prompts, "results": results}, indent=1))
    rounds = {n: r["oracle"]["accuracy_by_round"] for n, r in results.items() if "oracle" in r}
    lines = [
        f"oracle R3 accuracy by round, {n}: " + " ".join(f"{100 * a:.1f}" for a in acc)
        for n, acc in rounds.items()
    ]
    sys.stdout.write(to_markdown(results) + "".join(f"{line}\n" for line in lines) + f"written to {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
