"""`make shapes`: `python -m cluster.shapes_run [--config configs/shapes_cpu.yaml] [a.b=c ...]`.

Warm start (cached; trained by `cluster.shapes_pretrain` when missing) → evaluation on the held-out
split → R3 RL in tree mode → evaluation, all through `cluster.driver.run_training` with
`train.eval_before=true`; then `results.json`, `results.md` and `results.png` in the run directory
(`cluster.shapes_results`). Exit status as `cluster.train` (2: bad config, 3: a learner died).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger("r3rl")

__all__ = ["before_eval_dir", "collect_results", "main"]


def _report(eval_dir: Path, max_rounds: int) -> Any:
    from rollout.evaluation import summarize
    from rollout.trajectory import read_trajectories

    trajectories = read_trajectories(eval_dir / "trajectories.parquet")
    return summarize(trajectories, [t.metadata.get("tag", "") for t in trajectories], max_rounds)


def before_eval_dir(run_dir: Path, resumed_from: Path | None) -> Path:
    """The evaluation before any RL: the run's own `eval-before/`, or, for a run resumed from a
    checkpoint (the driver evaluates "before" only at step 0), that of the run the checkpoint
    belongs to (`<run>/checkpoints/step-N`)."""
    from cluster.checkpoint import run_dir_of

    own = run_dir / "eval-before"
    if (own / "eval.json").is_file():
        return own
    if resumed_from is not None:
        origin = run_dir_of(resumed_from) / "eval-before"
        if (origin / "eval.json").is_file():
            return origin
        raise FileNotFoundError(
            f"no before-RL evaluation: {own} is missing (resumed run) and so is {origin} of the run "
            f"that checkpoint {resumed_from} belongs to"
        )
    raise FileNotFoundError(f"no before-RL evaluation: {own} is missing (was train.eval_before off?)")


def collect_results(run_dir: Path, extra: dict[str, Any] | None = None, before_dir: Path | None = None) -> dict[str, Path]:
    """Read a finished run's `eval-before/` (or `before_dir`), `eval-final/` and `metrics.jsonl`;
    write the results."""
    from cluster.shapes_results import summarize_run, write_results

    before_dir = before_dir if before_dir is not None else run_dir / "eval-before"
    before_json = json.loads((before_dir / "eval.json").read_text())
    rounds = int(before_json["max_rounds"])
    before, after = _report(before_dir, rounds), _report(run_dir / "eval-final", rounds)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return write_results(run_dir, summarize_run(before, after, rows, extra))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m cluster.shapes_run", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/shapes_cpu.yaml")
    ap.add_argument("--pretrain-scale", type=float, default=1.0,
                    help="scale of the warm start's step counts when it has to be trained (tests: small)")
    ap.add_argument("--pretrain-eval-prompts", type=int, default=None,
                    help="held-out prompts the warm start measures when it has to be trained")
    ap.add_argument("--cache", type=Path, default=None, help="warm start cache root (default $R3RL_CACHE)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=4")
    args = ap.parse_args(argv)

    from cluster.config import ConfigError, load_config
    from cluster.shapes_pretrain import PretrainSettings, pretrain

    try:
        cfg = load_config(args.config, [*args.overrides, "train.eval_before=true"], check_paths=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cache is not None:  # the config's tiny:shapes-* names resolve under $R3RL_CACHE
        os.environ["R3RL_CACHE"] = str(args.cache.resolve())
    settings = PretrainSettings(scale=args.pretrain_scale)
    if args.pretrain_eval_prompts is not None:
        settings = replace(settings, eval_prompts=args.pretrain_eval_prompts)
    warm = pretrain(settings)
    manifest = json.loads((warm / "manifest.json").read_text())

    from cluster.checkpoint import resolve_resume
    from cluster.driver import run_training
    from cluster.failures import LearnerFailure

    resumed_from = resolve_resume(cfg.checkpoint.resume, Path(cfg.train.run_dir).resolve())
    if resumed_from is not None:  # pinned, so the driver resumes exactly this one ("auto" resolved once)
        cfg.checkpoint.resume = str(resumed_from)
    try:
        run_dir = run_training(cfg)
    except LearnerFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    extra = {"warm_start": {k: manifest.get(k) for k in ("version", "times", "generator_eval", "reasoner_eval")},
             "config": {"steps": cfg.train.steps, "group_size": cfg.r3.group_size,
                        "prompts_per_step": cfg.r3.prompts_per_step, "eval_prompts": cfg.data.eval_limit,
                        "eval_per_category": cfg.data.eval_per_category}}
    before_dir = before_eval_dir(run_dir, resumed_from)
    extra["before_eval"] = str(before_dir)
    extra["resumed_from"] = str(resumed_from) if resumed_from else None  # metrics.jsonl: this run's steps only
    paths = collect_results(run_dir, extra, before_dir)
    print(paths["md"].read_text())
    print(f"results: {paths['json']}  {paths['md']}  {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
