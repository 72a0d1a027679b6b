"""Arms of one config side by side: every arm (a set of dotted overrides) × every seed, one run each.

The measurement protocol of a learning claim (docs/design.md#advantages): the
arm under test and its null arm (`train.null_advantages=true`: the same updates with shuffled
advantages) run on the same seeds, so seed s of every arm draws the same training prompts and rollout
seeds and is evaluated on the same prompts and noise; the claim is arm − null per seed
(`cluster.paired_stats`). This module plans and runs the runs (`python -m cluster.train` in a child
process each, one after another) and reads what they wrote; a task's own measurements (its probes,
its metrics) are read by the task's command on top of it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Arm", "ArmRun", "parse_arm", "plan_arm_runs", "check_arm_configs", "run_arm", "is_finished", "read_metrics"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Arm:
    """One arm: a name and the dotted overrides that make it (none: the config as it is)."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class ArmRun:
    """One run of an arm at one seed: its folder and the full override list it runs with."""

    arm: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]


def parse_arm(text: str) -> Arm:
    """`NAME=OVERRIDE[;OVERRIDE...]`, e.g. `rl=`, `null=train.null_advantages=true`,
    `cps=flow_grpo.noise_level=1.0;flow_grpo.lr=5e-5` (';' separates overrides, since values may hold commas)."""
    name, sep, rest = text.partition("=")
    if not sep or not _NAME.match(name):
        raise ValueError(
            f"arm {text!r}: write NAME=OVERRIDE[;OVERRIDE...] with NAME of letters, digits, '_' or '-' "
            "(e.g. rl= or null=train.null_advantages=true)"
        )
    overrides = tuple(o.strip() for o in rest.split(";") if o.strip())
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"arm {name!r}: override {o!r} is not a dotted key=value")
    return Arm(name, overrides)


def plan_arm_runs(arms: Sequence[Arm], seeds: Sequence[int], common: Sequence[str], out_dir: Path) -> list[ArmRun]:
    """Seed-major (every arm of seed 0, then of seed 1, ...), so that the pairs of a seed finish
    together. Overrides: `common`, then the arm's own, then the seed and the run folder
    (`<out_dir>/<arm>-seed<s>`). (Not `checkpoint.resume=auto`: with no checkpoint of its own, a
    run would resume from the newest checkpoint of another arm in the same folder.)"""
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must differ, got {names}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {list(seeds)}")
    out = out_dir.resolve()
    runs = []
    for seed in seeds:
        for arm in arms:
            name = f"{arm.name}-seed{seed}"
            overrides = (*common, *arm.overrides, f"train.seed={seed}", f"train.run_dir={out}",
                         f"train.run_name={name}")  # fmt: skip
            runs.append(ArmRun(arm.name, seed, out / name, overrides))
    return runs


def check_arm_configs(config: str, runs: Sequence[ArmRun]) -> list[Any]:
    """Every run's config, loaded (plugins, paths) before any engine starts: a bad override stops
    the whole comparison with `cluster.config.ConfigError` naming it."""
    from cluster.config import load_config

    return [load_config(config, list(r.overrides), check_paths=True) for r in runs]


def is_finished(run: ArmRun) -> bool:
    """The run has its final evaluation (written after its last checkpoint)."""
    return (run.run_dir / "eval-final" / "eval.json").is_file()


def run_arm(config: str, run: ArmRun) -> int:
    """`python -m cluster.train` for one run in a child process (its own Ray session); console output
    in `<run_dir>.log`. A run interrupted before has its own newest checkpoint resumed (never another
    run's). Returns the exit status."""
    from cluster.checkpoint import checkpoints_dir, find_latest

    own = find_latest(checkpoints_dir(run.run_dir)) if run.run_dir.is_dir() else None
    resume = [f"checkpoint.resume={own}"] if own is not None else []
    cmd = [sys.executable, "-m", "cluster.train", "--config", config, *run.overrides, *resume]
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir.with_suffix(".log")
    log.info("%s seed %d: %s (log %s)", run.arm, run.seed, " ".join(cmd), log_path)
    with open(log_path, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's `metrics.jsonl` rows."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
