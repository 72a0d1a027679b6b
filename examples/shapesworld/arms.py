"""ShapesWorld arms side by side, each claim as arm − null: `python -m examples.shapesworld.arms
--config CONFIG --arms rl= null=train.null_advantages=true [--arms cps=...] --seeds 2 --steps N --out DIR [a.b=c ...]`.

Every arm runs once per seed (`cluster.arms`: `python -m cluster.train` per run, seed-major, a run
already finished is kept), with the same settings on top of the config: `train.steps`, the RL
training prompts limited to a fixed, tag-balanced set of `--train-prompts` training prompts
(`data.limit`), and the held-out evaluation cycled to `--per-tag` samples per tag. Then:

- the paired generator probe (`examples.shapesworld.probe.probe_generator`) of every run's final
  transformer (its EMA when the run kept one, as its evaluations use) and of the warm start: round 0
  (the prompt as the text, ODE) on those fixed training prompts (optimisation) and on the held-out
  ones (generalisation), `--per-tag` samples per tag on each side, sample i with the same noise in
  every run;
- the runs' own R3 evaluations of the held-out split (round 0, final round, reflection, stop when
  correct, the exact-fix rate on wrong images), sample i on the same prompt and seeds in both arms of
  a seed;
- each claim as arm − null (`examples.shapesworld.arms_report`, `cluster.paired_stats`), and the
  generator's claim on its training prompts split by how often the warm start draws each prompt right
  (`examples.shapesworld.headroom`: how much of the gain, and of the room for it, each group holds,
  and how much score spread the arm's training groups of it had: the signal RL had there),
  written to `DIR/arms.json` (with the warm start's per-sample verdicts) and `DIR/arms.md`.

Exit status: 0 done; 2 a bad argument or config (nothing started); 3 a run failed (the others are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["fixed_prompt_sets", "probe_settings", "probe_weights", "run_measures", "generate_groups", "main"]

log = logging.getLogger("r3rl")


def fixed_prompt_sets(cfg: Any, per_tag: int) -> dict[str, list[dict[str, Any]]]:
    """The probe's prompts: the distinct training prompts a run of `cfg` trains on and the held-out
    prompts it is evaluated on, each cycled to `per_tag` samples per tag (the same in every run)."""
    from cluster.settings import load_prompt_sets
    from rollout.datasets import cycle_categories

    train, test = load_prompt_sets(cfg)
    seen: set[str] = set()
    distinct = [r for r in train if not (r.prompt in seen or seen.add(r.prompt))]
    return {
        "train": [r.metadata for r in cycle_categories(distinct, per_tag)],
        "test": [r.metadata for r in cycle_categories(test, per_tag)],
    }


def probe_settings(cfg: Any) -> dict[str, Any]:
    """The probe's sampler settings from a run config: its evaluation's ODE steps, guidance, true
    CFG scale, image size and text length."""
    f, g = cfg.flow_grpo, cfg.models.generator
    return {"num_steps": f.eval_num_steps, "guidance": f.guidance, "cfg_scale": f.train_cfg_scale, "size": g.height,
            "max_sequence_length": g.max_sequence_length}  # fmt: skip


def probe_weights(checkpoint: Path) -> Path:
    """The generator weights a run's probe draws with: the EMA's when the run kept one
    (`flow_grpo.ema_decay` > 0, as its evaluations do), else the trained weights."""
    ema = checkpoint / "diffusion_learner" / "ema_weights"
    return ema if ema.is_dir() else checkpoint / "diffusion_learner" / "weights"


def run_measures(run: Any, probe: dict[str, Any]) -> dict[str, Any]:
    """One run's measures (`examples.shapesworld.arms_report`) from its R3 evaluation and its probe."""
    from examples.shapesworld.results import fix_naming, reflection_accuracy
    from rollout.trajectory import read_trajectories

    trajs = sorted(read_trajectories(run.run_dir / "eval-final" / "trajectories.parquet"), key=lambda t: t.group_id)
    return {
        "arm": run.arm,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "probe": {split: probe[split]["correct"] for split in ("train", "test")},
        "probe_score": {split: probe[split]["scores"] for split in ("train", "test")},
        "eval": {
            "prompts": [t.prompt for t in trajs],
            "round0": [bool(t.rounds[0].correct) for t in trajs],
            "final": [bool(t.rounds[-1].correct) for t in trajs],  # a stop carries its image's verdict
            "reflection": reflection_accuracy(trajs),
            "fix_naming": fix_naming(trajs),
        },
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m examples.shapesworld.arms", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the run config, e.g. examples/shapesworld/configs/shapes_cpu.yaml")
    ap.add_argument("--arms", nargs="+", action="extend", required=True,
                    help="NAME=OVERRIDE[;OVERRIDE...], e.g. rl= null=train.null_advantages=true")  # fmt: skip
    ap.add_argument("--null", default="null", help="the arm every other arm is compared with (default: null)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default 2)")
    ap.add_argument("--steps", type=int, required=True, help="RL steps of every run (train.steps)")
    ap.add_argument("--train-prompts", type=int, default=36,
                    help="the fixed training prompts the runs train on (data.limit; 36 = 4 per tag)")  # fmt: skip
    ap.add_argument("--per-tag", type=int, default=30, help="probe and evaluation samples per tag (default 30: 270)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the runs, arms.json and arms.md")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every arm")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    from cluster.arms import check_arm_configs, is_finished, parse_arm, plan_arm_runs, run_arm
    from cluster.config import ConfigError
    from cluster.session import resolve_model_path

    try:
        arms = [parse_arm(a) for a in args.arms]
        if args.null not in {a.name for a in arms} or len(arms) < 2:
            raise ValueError(f"--arms needs the null arm {args.null!r} and at least one other; got {[a.name for a in arms]}")
        if args.seeds < 1 or args.steps < 1 or args.train_prompts < 1 or args.per_tag < 2:
            raise ValueError("--seeds, --steps and --train-prompts must be >= 1 and --per-tag >= 2")
        common = [f"train.steps={args.steps}", f"data.limit={args.train_prompts}", "data.eval_limit=null",
                  f"data.eval_per_category={args.per_tag}", "train.eval_before=false", *args.overrides]  # fmt: skip
        runs = plan_arm_runs(arms, list(range(args.seeds)), common, args.out)
        cfgs = check_arm_configs(args.config, runs)
        base = Path(resolve_model_path(cfgs[0].models.generator.path))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    for run in runs:
        if is_finished(run):
            log.info("%s: finished before, kept", run.run_dir.name)
            continue
        start = time.perf_counter()
        rc = run_arm(args.config, run)
        wall[run.run_dir.name] = time.perf_counter() - start
        run.run_dir.mkdir(parents=True, exist_ok=True)  # a run refused at its start made no folder
        (run.run_dir / "arm_wall_s.json").write_text(json.dumps({"wall_s": wall[run.run_dir.name], "rc": rc}))
        if rc != 0:
            print(f"error: run {run.run_dir} exited {rc}; its log: {run.run_dir.with_suffix('.log')}", file=sys.stderr)
            return 3
    return _report(args, argv, runs, cfgs[0], base)


def _report(args: argparse.Namespace, argv: list[str] | None, runs: list[Any], cfg: Any, base: Path) -> int:
    from cluster.checkpoint import checkpoints_dir, find_latest
    from examples.shapesworld.arms_report import METRICS, arm_claims, arm_levels, claims_markdown
    from examples.shapesworld.headroom import (
        group_spread,
        headroom_from_measures,
        headroom_markdown,
        warm_start_classes,
    )
    from examples.shapesworld.probe import probe_generator

    prompts = fixed_prompt_sets(cfg, args.per_tag)
    weights: dict[str, Path | None] = {"warm start": None}
    for run in runs:
        weights[run.run_dir.name] = probe_weights(find_latest(checkpoints_dir(run.run_dir)))
    probe = probe_generator(base, weights, prompts, **probe_settings(cfg))
    measures = [run_measures(run, probe[run.run_dir.name]) for run in runs]
    names = list(dict.fromkeys(r.arm for r in runs))
    claims = {a: arm_claims(measures, a, args.null) for a in names if a != args.null}
    levels = {a: arm_levels(measures, a) for a in names}
    warm = {"generator_round0_train": probe["warm start"]["train"]["accuracy"],
            "generator_round0_heldout": probe["warm start"]["test"]["accuracy"]}  # fmt: skip
    warm_probe = {split: probe["warm start"][split]["correct"] for split in ("train", "test")}
    train_prompts = [m["prompt"] for m in prompts["train"]]
    headroom = {a: headroom_from_measures(measures, a, args.null, train_prompts, warm_probe["train"]) for a in claims}
    classes = warm_start_classes(train_prompts, warm_probe["train"])
    spread = {a: group_spread([g for r in runs if r.arm == a for g in generate_groups(r.run_dir)], classes)
              for a in claims}  # fmt: skip
    seeds = sorted({r.seed for r in runs})
    command = "python -m examples.shapesworld.arms " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = {
        "command": command,
        "seeds": seeds,
        "metrics": METRICS,
        "claims": {a: {k: c.to_dict() for k, c in by.items()} for a, by in claims.items()},
        "levels": levels,
        "warm_start": warm,
        "warm_start_probe": warm_probe,
        "runs": [{**m, "wall_s": _wall(r)} for m, r in zip(measures, runs, strict=True)],
        "prompts": {s: [m["prompt"] for m in p] for s, p in prompts.items()},
    }
    (args.out / "arms.json").write_text(json.dumps(out, indent=1))
    md = f"`{command}`\n\n" + claims_markdown(claims, levels, args.null, seeds, warm)
    md += "".join("\n" + headroom_markdown(rows, a, args.null, spread[a]) for a, rows in headroom.items())
    (args.out / "arms.md").write_text(md)
    print(md + f"written to {args.out / 'arms.json'} and {args.out / 'arms.md'}")
    return 0


def generate_groups(run_dir: Path) -> list[tuple[str, list[float]]]:
    """The generate-stage groups a run wrote to `trajectories/` (`logging.trajectories_per_step` per
    step, its first groups): (prompt, the judge's score of each image)."""
    from rollout.trajectory import read_trajectories

    groups: dict[tuple[str, int], tuple[str, list[float]]] = {}
    for path in sorted((run_dir / "trajectories").glob("step-*.parquet")):
        for t in read_trajectories(path):
            if t.rounds and t.rounds[0].stage == "generate":
                groups.setdefault((path.name, t.group_id), (t.prompt, []))[1].append(t.rounds[0].score)
    return list(groups.values())


def _wall(run: Any) -> float | None:
    path = run.run_dir / "arm_wall_s.json"
    return json.loads(path.read_text())["wall_s"] if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
