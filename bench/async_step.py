"""Benchmark: synchronous vs one-step-off asynchronous R3 steps on the same work.

Design: docs/design.md#one-step-off-rollout.

Trainers run one after the other in one Ray session (sync, async, sync, async, ... for `--rounds`),
with the same config and seeds except `train.async_one_step_off`: same prompts, same models, same
number of samples per step. The machine is shared, so each mode keeps its best round. For each
mode it reports the wall time of a steady-state step (the mean over steps 1..N-2: step 0 also warms
the engines and, in async mode, has nothing to overlap with; the last async step has no next
rollout to run ahead), the whole run's wall time, and the mean rollout and learn phase times.
Target: async <= 0.65 x sync when rollout and learning take similar time (ideal: max(R, L) + sync
over R + L + sync, i.e. about 0.5 when R = L).

On a 2-core machine the overlap is bounded by the cores: rollout (vLLM + diffusers workers, judge)
and learning (two DeepSpeed learners) then share the same two cores, so each phase runs slower
while they overlap. To make that visible, a sampler reads the CPU time of this process tree (driver,
raylet, every actor) every 0.2 s, and each phase reports the cores it kept busy on average; with
R, L the sync phase times and cR, cL their cores, no overlap on C cores can beat
max(R, L, (R*cR + L*cL) / C) per step ("bound" in the table). The JSON records the CPU count and the
load average (other users of a shared machine slow both modes).

Run: `python bench/async_step.py [--steps 8] [--rounds 2] [--set a.b=c ...]`; prints a table and writes
`bench/results/async_step.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

log = logging.getLogger("bench.async_step")
RESULTS = Path(__file__).resolve().parent / "results" / "async_step.json"
# The tiny CPU config with the exact ShapesWorld judge (cheap, no third vLLM engine competing for the
# cores); rollout and learning of one step then take about the same time here (see the JSON).
BASE = ["plugins=[examples.shapesworld]", "judge.kind=shapes", "data.train=shapes-train", "data.test=shapes-test",
        "r3.group_size=4", "r3.prompts_per_step=2", "r3.tree_schedule=both", "logging.progress=false", "logging.tensorboard=false",
        "logging.gallery=false", "checkpoint.every=0"]


class CpuSampler:
    """CPU seconds (user + system) of this process and all its descendants, sampled in a thread."""

    def __init__(self, period_s: float = 0.2):
        import threading

        import psutil

        self.me, self.period_s = psutil.Process(), period_s
        self.samples = [(time.time(), self._cpu())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cpu(self) -> float:
        import psutil

        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # a process that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append((time.time(), self._cpu()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, start: float, end: float) -> float:
        """Mean busy cores between two wall-clock times (linear interpolation between samples)."""
        import numpy as np

        ts, cpu = np.array([t for t, _ in self.samples]), np.array([c for _, c in self.samples])
        return float((np.interp(end, ts, cpu) - np.interp(start, ts, cpu)) / max(end - start, 1e-9))


def run_mode(config: str, overrides: list[str], run_root: Path, steps: int, asynchronous: bool) -> dict[str, Any]:
    """Train `steps` steps in one mode; per-step wall times and phase times."""
    from cluster.config import load_config
    from cluster.driver import Trainer, make_run_dir

    name = "async" if asynchronous else "sync"
    cfg = load_config(config, [*BASE, *overrides, f"train.steps={steps}", f"train.run_dir={run_root}",
                               f"train.run_name={name}", f"train.async_one_step_off={str(asynchronous).lower()}"])
    sampler = CpuSampler()
    trainer = Trainer(cfg, make_run_dir(cfg))
    walls, rows, spans = [], [], []
    try:
        for _ in range(steps):
            start, span_start = time.perf_counter(), time.time()
            rows.append(trainer.step())
            walls.append(time.perf_counter() - start)
            spans.append((span_start, time.time()))
            log.info("%s step %d: %.2f s", name, len(walls) - 1, walls[-1])
    finally:
        sampler.stop()
        trainer.close()
    steady = slice(1, steps - 1)
    phase_cores = {ph: statistics.fmean(sampler.cores(p["start"], p["end"]) for p in trainer.phase_log
                                        if p["phase"] == ph and 1 <= p["step"] <= steps - 2)
                   for ph in ("rollout", "learn")}
    return {
        "mode": name,
        "step_wall_s": walls,
        "steady_step_s": statistics.fmean(walls[steady]),
        "total_s": sum(walls),
        "rollout_s": statistics.fmean(r["time/rollout"] for r in rows[steady]),
        "learn_s": statistics.fmean(r["time/learn"] for r in rows[steady]),
        "sync_s": statistics.fmean(r["time/sync"] for r in rows[steady]),
        "rollout_cores": phase_cores["rollout"],  # async: the windows overlap, so each includes the other's
        "learn_cores": phase_cores["learn"],
        "steady_cores": sampler.cores(spans[1][0], spans[steps - 2][1]),  # whole tree over steps 1..N-2
        "samples_per_step": [r["samples/trajectories"] for r in rows],
        "max_staleness": max(r["version/max_staleness"] for r in rows),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cpu_tiny.yaml")
    ap.add_argument("--steps", type=int, default=8, help="steps per mode (>= 3: the steady state is steps 1..N-2)")
    ap.add_argument("--rounds", type=int, default=2, help="sync/async pairs; each mode keeps its best round")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra dotted override")
    args = ap.parse_args(argv)
    if args.steps < 3:
        raise ValueError(f"--steps must be >= 3 (steady state = steps 1..N-2), got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ray

    from cluster.config import load_config
    from cluster.session import connect_ray

    os.chdir(Path(__file__).resolve().parent.parent)  # configs and data paths are relative to the repository
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        started = connect_ray(load_config(args.config, [*BASE, *args.overrides, f"train.run_dir={tmp}"]))
        try:
            rounds = [run_mode(args.config, args.overrides, Path(tmp) / f"round-{r}", args.steps, a)
                      for r in range(args.rounds) for a in (False, True)]
        finally:
            if started:
                ray.shutdown()
    modes = [min((m for m in rounds if m["mode"] == name), key=lambda m: m["steady_step_s"]) for name in ("sync", "async")]
    sync, asyn = modes
    ratio = asyn["steady_step_s"] / sync["steady_step_s"]
    cpus = os.cpu_count() or 1
    r, lr = sync["rollout_s"], sync["learn_s"]
    bound = max(r, lr, (r * sync["rollout_cores"] + lr * sync["learn_cores"]) / cpus) + sync["sync_s"]
    result = {
        "config": args.config, "overrides": [*BASE, *args.overrides], "steps": args.steps,
        "cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg(),
        "modes": modes, "all_rounds": rounds, "async_over_sync": ratio, "target": 0.65, "meets_target": ratio <= 0.65,
        "rollout_over_learn_sync": sync["rollout_s"] / sync["learn_s"],
        "best_async_step_s_on_this_machine": bound, "best_async_over_sync_on_this_machine": bound / sync["steady_step_s"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    for m in rounds:
        log.info("round: %s steady step %.2f s (rollout %.2f, learn %.2f)", m["mode"], m["steady_step_s"],
                 m["rollout_s"], m["learn_s"])
    print(f"\n{'mode':<6} {'step s':>8} {'total s':>8} {'rollout s':>10} {'learn s':>8} {'sync s':>7} "
          f"{'rollout cores':>14} {'learn cores':>12} {'all cores':>10} {'stale':>6}")
    for m in modes:
        print(f"{m['mode']:<6} {m['steady_step_s']:>8.2f} {m['total_s']:>8.2f} {m['rollout_s']:>10.2f} "
              f"{m['learn_s']:>8.2f} {m['sync_s']:>7.2f} {m['rollout_cores']:>14.2f} {m['learn_cores']:>12.2f} "
              f"{m['steady_cores']:>10.2f} {m['max_staleness']:>6}")
    print(f"bound: no overlap on {cpus} CPUs beats {bound:.2f} s per step = {bound / sync['steady_step_s']:.2f} x sync")
    print(f"async / sync steady step time: {ratio:.2f} (target <= 0.65); rollout / learn (sync): "
          f"{result['rollout_over_learn_sync']:.2f}; {os.cpu_count()} CPUs")
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
