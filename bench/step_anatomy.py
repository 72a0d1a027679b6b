"""Step anatomy of configs/cpu_tiny.yaml on Ray: wall time per phase, orchestration overhead, memory per role.

One Ray session runs the tiny config's trainer for `--steps` steps (step 0 warms the engines and is
left out). Each measured step is cut into phases as the driver sees them: text rollout, image
rollout and judge (the driver's time inside the reasoner's, generator's and judge's calls),
advantages (the rest of the rollout: shaping, advantages, the buffer, request building), text and
image learn (both learners train at once), weight sync; a checkpoint is timed once after the steps.
Beside them stand the engines' own seconds, as each engine reports them: vLLM's generate calls
(`TextWorker.stats`), the sampler (`DiffusionWorker.stats`), the judge replica's calls (its call
log), each learner's `step_seconds`, and per weight sync the longer of the sender's time in the
broadcast and the workers' time receiving and loading (`weight_load_seconds`). Orchestration
overhead = step wall / engine seconds on the step's critical path (the two learners overlap: the
longer one counts). Target <= 1.05 in synchronous mode.

Peak resident memory (VmHWM) of every role's process is read after the steps; then, unless
`--no-scaling`, `bench/scaling.py` measures worker and group-size scaling on the same roles, and
the same steps run once more in one process without Ray (`bench/step_inprocess.py`, a subprocess
after this session's roles are gone) to show what distribution costs on one machine.

Run: `python bench/step_anatomy.py [--steps 3] [--no-scaling] [--no-inprocess]`; writes
bench/results/step_anatomy.json (and scaling.json, step_inprocess.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, CallTimes, Timed, memory_of, write_result

log = logging.getLogger("bench.step_anatomy")
CONFIG = "configs/cpu_tiny.yaml"
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.gallery=false", "checkpoint.every=0"]
TARGET = 1.05
ROLE_CLASSES = {"TextWorker": "text worker", "HFTextWorker": "text worker", "DiffusionWorker": "diffusion worker",
                "TextLearner": "text learner", "DiffusionLearner": "diffusion learner", "ServeReplica": "judge replica",
                "ServeController": "serve controller"}


def instrument(trainer: Any, times: CallTimes, sync_seconds: list[float]) -> None:
    """Time the driver's calls into the roles and keep each sync's sender seconds."""
    import cluster.r3_step as r3_step

    original = r3_step.run_r3_step

    def timed_step(i, prompts, reasoner, generator, judge, buffer, settings):  # noqa: ANN001, ANN202
        return original(i, prompts, Timed(reasoner, "text_rollout", times, ("generate",)),
                        Timed(generator, "image_rollout", times, ("sample",)),
                        Timed(judge, "judge", times, ("score",)), buffer, settings)

    r3_step.run_r3_step = timed_step
    # the driver's own bookkeeping between the phases, to split "driver_other"
    trainer._worker_versions = Timed(trainer, "versions_and_worker_stats", times, ("_worker_versions",))._worker_versions
    trainer._write_trajectories = Timed(trainer, "trajectories_parquet", times,
                                        ("_write_trajectories",))._write_trajectories
    trainer.metrics.log = Timed(trainer.metrics, "metrics_row", times, ("log",)).log
    for sync in (trainer.roles.text_sync, trainer.roles.diffusion_sync):
        inner = sync.sync

        def captured(learners, workers, version, inner=inner):  # noqa: ANN001, ANN202
            report = inner(learners, workers, version)
            sync_seconds.append(float((report.sender or {}).get("seconds", report.seconds)))
            return report

        sync.sync = captured


def engine_seconds(trainer: Any) -> dict[str, float]:
    """Cumulative own seconds of the rollout engines (summed over workers): generating, sampling, and
    receiving + loading weights."""
    pools = trainer.roles.text_pool, trainer.roles.diffusion_pool
    return {"text": sum(s["generate_s"] for s in pools[0].call_each("stats")),
            "image": sum(s["sample_s"] for s in pools[1].call_each("stats")),
            "text_load": sum(pools[0].call_each("weight_load_seconds")),
            "image_load": sum(pools[1].call_each("weight_load_seconds"))}


def judge_seconds(call_log: Path, start: float, end: float) -> float:
    from reward.simple_judges import read_call_log

    return sum(c["s"] for c in read_call_log(call_log) if start <= c["t"] <= end)


def anatomy_row(row: dict[str, Any], wall: float, calls: dict[str, float], engines: dict[str, float],
                judge_s: float, sync_s: list[float]) -> dict[str, Any]:
    """Phases as the driver saw them and the engines' own seconds for one step."""
    rollout = row["time/rollout"]
    phases = {"text_rollout": calls.get("text_rollout", 0.0), "image_rollout": calls.get("image_rollout", 0.0),
              "judge": calls.get("judge", 0.0)}
    phases["advantages"] = rollout - sum(phases.values())
    phases.update(text_learn=row.get("text_learner/step_seconds", 0.0),
                  image_learn=row.get("diffusion_learner/step_seconds", 0.0),
                  learn_wall=row["time/learn"], sync=row["time/sync"])
    phases["driver_other"] = wall - rollout - row["time/learn"] - row["time/sync"]
    for key in ("versions_and_worker_stats", "trajectories_parquet", "metrics_row"):
        phases[f"driver_other/{key}"] = calls.get(key, 0.0)
    text_send, image_send = sync_s  # the two syncs run one after the other; sender and workers overlap
    own = {"text_generate": engines["text"], "image_sample": engines["image"], "judge": judge_s,
           "learn_critical": max(phases["text_learn"], phases["image_learn"]),
           "sync": max(text_send, engines["text_load"]) + max(image_send, engines["image_load"])}
    return {"wall_s": wall, "stages": row.get("stages"), "phases_s": phases, "engine_s": own,
            "engine_total_s": sum(own.values()), "overhead": wall / sum(own.values())}


def role_memory() -> dict[str, dict[str, float]]:
    """Peak and current RSS (MiB) of the driver and of every actor process below it, by role (Ray titles
    an actor's process `ray::<Class>...`)."""
    import psutil

    out = {"driver": memory_of(os.getpid())}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            role = next((r for cls, r in ROLE_CLASSES.items() if title.startswith(f"ray::{cls}")), None)
            if role is not None:
                out[role if role not in out else f"{role} pid {proc.pid}"] = memory_of(proc.pid)
        except (psutil.Error, OSError):  # just exited
            continue
    return out


def run(steps: int, scaling: bool, overrides: list[str], tmp: Path) -> dict[str, Any]:
    import cluster.roles as roles_module
    from cluster.config import load_config
    from cluster.driver import Trainer, make_run_dir

    cfg = load_config(CONFIG, [*QUIET, *overrides, f"train.steps={steps}", f"train.run_dir={tmp}",
                               "train.run_name=anatomy"])
    call_log = tmp / "judge_calls.jsonl"
    plain_spec = roles_module.judge_spec
    roles_module.judge_spec = lambda c, p: {**plain_spec(c, p), "call_log": str(call_log)}
    times, sync_s = CallTimes(), []
    start = time.perf_counter()
    trainer = Trainer(cfg, make_run_dir(cfg))
    roles_ready_s = time.perf_counter() - start
    result: dict[str, Any] = {"roles_ready_s": roles_ready_s}
    try:
        instrument(trainer, times, sync_s)
        rows = []
        for i in range(steps):
            before, t0 = engine_seconds(trainer), time.time()
            times.take()
            sync_s.clear()
            start = time.perf_counter()
            row = trainer.step()
            wall = time.perf_counter() - start
            after = engine_seconds(trainer)
            engines = {k: after[k] - before[k] for k in after}
            rows.append(anatomy_row(row, wall, times.take(), engines, judge_seconds(call_log, t0, time.time()),
                                    list(sync_s)))
            log.info("step %d: %.2f s wall, overhead %.3f", i, wall, rows[-1]["overhead"])
        start = time.perf_counter()
        trainer.save_checkpoint()
        result["checkpoint_s"] = time.perf_counter() - start
        result["memory_mib"] = role_memory()
        result["learner_memory_stats"] = {"text": trainer.roles.text_learners.call_rank0("memory_stats"),
                                          "diffusion": trainer.roles.diffusion_learners.call_rank0("memory_stats")}
        measured = rows[1:]
        result["steps"] = rows
        result["mean"] = {
            "wall_s": statistics.fmean(r["wall_s"] for r in measured),
            "phases_s": {k: statistics.fmean(r["phases_s"][k] for r in measured) for k in measured[0]["phases_s"]},
            "engine_s": {k: statistics.fmean(r["engine_s"][k] for r in measured) for k in measured[0]["engine_s"]},
        }
        result["overhead"] = sum(r["wall_s"] for r in measured) / sum(r["engine_total_s"] for r in measured)
        if scaling:
            from scaling import measure_scaling

            write_result("scaling", measure_scaling(trainer))
    finally:
        trainer.close()
        roles_module.judge_spec = plain_spec
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps (>= 2: step 0 is the warm-up)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--no-inprocess", dest="inprocess", action="store_false")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra dotted override")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (step 0 is the warm-up), got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)  # configs and data paths are relative to the repository
    import ray

    from cluster.config import load_config
    from cluster.session import connect_ray

    with tempfile.TemporaryDirectory(prefix="bench-anatomy-") as tmp:
        started = connect_ray(load_config(CONFIG, [*QUIET, *args.overrides, f"train.run_dir={tmp}"]))
        try:
            result = run(args.steps, args.scaling, args.overrides, Path(tmp))
        finally:
            if started:
                ray.shutdown()
    result.update(config=CONFIG, overrides=args.overrides, target_overhead=TARGET,
                  meets_target=result["overhead"] <= TARGET, mode="synchronous")
    if args.inprocess:  # after the Ray session: its actors' memory is free again
        cmd = [sys.executable, str(ROOT / "bench" / "step_inprocess.py"), "--steps", str(args.steps),
               *[x for o in args.overrides for x in ("--set", o)]]
        subprocess.run(cmd, check=True)
        inproc = json.loads((ROOT / "bench" / "results" / "step_inprocess.json").read_text())
        result["inprocess_mean_wall_s"] = inproc["mean"]["wall_s"]
        result["ray_over_inprocess"] = result["mean"]["wall_s"] / inproc["mean"]["wall_s"]
    write_result("step_anatomy", result)
    m = result["mean"]
    print(f"\nstep anatomy ({CONFIG}, steps 1..{args.steps - 1}, mean s): wall {m['wall_s']:.2f}")
    for k, v in m["phases_s"].items():
        print(f"  {k:<14} {v:8.3f}")
    print("engines' own seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in m["engine_s"].items()))
    print(f"orchestration overhead (wall / engine seconds): {result['overhead']:.3f} (target <= {TARGET})")
    if "ray_over_inprocess" in result:
        print(f"Ray step / in-process step: {result['ray_over_inprocess']:.2f}")
    for role, mem in result["memory_mib"].items():
        print(f"  memory {role:<24} peak {mem['peak_rss_mib']:8.0f} MiB  now {mem['rss_mib']:8.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
