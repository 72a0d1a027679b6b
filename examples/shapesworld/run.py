"""The ShapesWorld run: `python -m examples.shapesworld.run [--config CONFIG] [a.b=c ...]`.

From the warm start the config names (by default the one that ships in
`examples/shapesworld/warmstart`, as `tiny:shapes-flux` / `tiny:shapes-vlm`; another one with
`models.generator.path=DIR/flux models.reasoner.path=DIR/vlm`): evaluation on the held-out split →
R3 RL in tree mode → evaluation, all through `cluster.run_loop.run_training` with
`train.eval_before=true`; then `results.json`, `results.md` and `results.png` in the run directory
(`examples.shapesworld.results`). Exit status as `cluster.train` (2: bad config, a locked run folder or a
refused resume; 3: a learner died; 4: non-finite training; 5: the judge failed too often).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_CONFIG", "before_eval_dir", "collect_results", "warm_start_manifest", "main"]

log = logging.getLogger("r3rl")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes_cpu.yaml"


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
    from examples.shapesworld.results import summarize_run, write_results

    before_dir = before_dir if before_dir is not None else run_dir / "eval-before"
    before_json = json.loads((before_dir / "eval.json").read_text())
    rounds = int(before_json["max_rounds"])
    before, after = _report(before_dir, rounds), _report(run_dir / "eval-final", rounds)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return write_results(run_dir, summarize_run(before, after, rows, extra))


def warm_start_manifest(generator_path: str) -> dict[str, Any] | None:
    """The manifest of the warm start the generator comes from (`<warm start>/manifest.json` beside
    its `flux/` folder), or None for a generator that is not a warm start."""
    manifest = Path(generator_path).parent / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m examples.shapesworld.run", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"run config (default {DEFAULT_CONFIG})")
    ap.add_argument("--verbose", action="store_true",
                    help="show the engines' logs on the console (default: they go to <run>/engine.log)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=4")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    from cluster.checkpoint import resolve_resume
    from cluster.config import ConfigError, load_config
    from cluster.failures import LearnerFailure, RunRefused
    from cluster.run_loop import run_training
    from cluster.session import resolve_model_path
    from examples.shapesworld.results import console_summary

    try:
        cfg = load_config(args.config, [*args.overrides, "train.eval_before=true"], check_paths=True)
        generator = resolve_model_path(cfg.models.generator.path)
    except (ConfigError, ValueError) as e:  # ValueError: a named warm start that is not there
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = warm_start_manifest(generator) or {}
    resumed_from = resolve_resume(cfg.checkpoint.resume, Path(cfg.train.run_dir).resolve(), cfg.train.run_name)
    if resumed_from is not None:  # pinned, so the driver resumes exactly this one ("auto" resolved once)
        cfg.checkpoint.resume = str(resumed_from)
    try:
        run_dir = run_training(cfg, verbose=args.verbose)
    except (LearnerFailure, RunRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    measured = ("command", "seed", "times", "generator_eval", "reasoner_eval", "reasoner_own_images")
    extra = {"warm_start": {"path": str(Path(generator).parent), **{k: manifest.get(k) for k in measured}},
             "config": {"steps": cfg.train.steps, "group_size": cfg.r3.group_size,
                        "prompts_per_step": cfg.r3.prompts_per_step, "eval_prompts": cfg.data.eval_limit,
                        "eval_per_category": cfg.data.eval_per_category}}
    before_dir = before_eval_dir(run_dir, resumed_from)
    extra["before_eval"] = str(before_dir)
    extra["resumed_from"] = str(resumed_from) if resumed_from else None  # metrics.jsonl: this run's steps only
    paths = collect_results(run_dir, extra, before_dir)
    if args.verbose:
        print(paths["md"].read_text())
    print(console_summary(json.loads(paths["json"].read_text()), run_dir))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
