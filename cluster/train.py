"""Entry point: `python -m cluster.train --config configs/X.yaml [a.b=c ...] [--dry-run]`.

Inside `ray job submit` it joins the existing cluster ($RAY_ADDRESS); outside it starts a local one.
Exit status: 0 done; 2 a mistake in the config (a message, never a traceback); 3 a learner actor died
or stopped answering (`cluster.failures.LearnerFailure`: the message names the actor, the step, the last
complete checkpoint and the `--resume` command); 4 training kept producing non-finite values
(`cluster.failures.NonFiniteFailure`, a `LearnerFailure`: `train.max_nonfinite_steps` skipped updates in
a row, or non-finite weights refused by a checkpoint; the message names the step and the checkpoint);
5 the judge failed on more than `judge.max_error_fraction` of a step's items (`cluster.failures.JudgeFailure`,
a `LearnerFailure`: the message names the step, the fraction and the judge kind; that step's update is not
made). A run refused before anything starts also exits 2 (`cluster.failures.RunRefused`): its run folder
is locked by another run (the message names the folder and the holding process), or `--resume` changes
what the checkpoint's run cannot continue exactly with (learner counts; `r3.mode`, `data.*`, `train.seed`
unless `checkpoint.allow_config_changes`; each key old -> new is listed), or its inputs are wrong
(`cluster.preflight`: a malformed or too long prompt, an incomplete model folder, an unset API-key
variable, more CPUs than a local cluster has). 6 a dead rollout worker could not be replaced within
`train.retries` tries (`cluster.failures.WorkerFailure`). 143 / 130 SIGTERM / SIGINT stopped the run
cleanly (`cluster.stopping`): one line names the checkpoint and the resume command; a second signal
exits at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import yaml

from cluster.config import ConfigError, R3Config, check_model_paths, load_config
from cluster.launch_plan import check_launch, format_memory_plan, memory_plan
from cluster.placement import format_plan, plan_placement

log = logging.getLogger("r3rl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__)
    ap.add_argument("--config", default="configs/cpu_tiny.yaml", help="YAML config file")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config, the placement and the per-GPU memory plan, then exit "
                    "(exit 2 if they do not fit cluster.hardware)")
    ap.add_argument("--resume", default=None, help="'auto' or a checkpoint path (overrides checkpoint.resume)")
    ap.add_argument("--verbose", action="store_true",
                    help="show the engines' logs on the console (default: they go to <run>/engine.log)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. grpo.clip_high=0.28")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        check_model_paths(cfg, dry_run=args.dry_run)
        if args.dry_run:
            return dry_run(cfg)
        check_launch(cfg)  # placement and memory against cluster.hardware, when declared
        from cluster.preflight import check_before_start

        check_before_start(cfg)  # prompts, model folders, API-key variable, local CPUs: before any engine
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from cluster.failures import LearnerFailure, RunRefused, StoppedBySignal
    from cluster.run_loop import run_training

    try:
        run_dir = run_training(cfg, verbose=args.verbose)
    except (LearnerFailure, RunRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except StoppedBySignal as e:
        print(f"{e}; {resume_hint(argv, e.checkpoint)}", file=sys.stderr)
        return e.exit_code
    print(run_summary(run_dir))
    return 0


def dry_run(cfg: R3Config) -> int:
    """Print the resolved config, the placement and the memory plan; raise ConfigError if they do not fit."""
    print("# resolved config")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    print(format_plan(plan_placement(cfg), cfg.cluster.placement_strategy))
    plans = memory_plan(cfg)
    print(format_memory_plan(plans, cfg))
    check_launch(cfg, plans)
    print("dry run: no engines started")
    return 0


def resume_hint(argv: list[str] | None, checkpoint: Path | None) -> str:
    """How to go on after a stop: this command line with `--resume <checkpoint>` in place of any `--resume`."""
    if checkpoint is None:
        return "nothing to resume: start the run again"
    args, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return f"resume with: python -m cluster.train {shlex.join([*args, '--resume', str(checkpoint)])}"


def run_summary(run_dir: Path) -> str:
    """The lines printed when a run ends: final accuracy per round and where to look."""
    from cluster.console import format_round_accuracy

    final = run_dir / "eval-final"
    report = json.loads((final / "eval.json").read_text())
    lines = [f"final evaluation ({report['num_prompts']} prompts): "
             f"{format_round_accuracy([r['accuracy'] for r in report['overall']])}",
             f"run directory: {run_dir}"]
    if (final / "gallery.html").is_file():
        lines.append(f"gallery: {final / 'gallery.html'}")
    if (run_dir / "engine.log").is_file():
        lines.append(f"engine logs: {run_dir / 'engine.log'}")
    return "\n".join(lines)


if __name__ == "__main__":
    code = main()
    if code >= 128:  # stopped by a signal: threads of abandoned work must not hold the exit up
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
