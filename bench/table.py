"""One table of every benchmark figure, its target and whether it is met, from bench/results/*.json.

Each row reads one JSON written by a benchmark script; a missing file or key shows "no result"
(the script did not run or failed) instead of failing the table. Status: met / missed against a
target; "info" for a figure without one; "not measured yet" for a figure the benchmarks cannot
produce yet (the reason is in the row).

Run: `python bench/table.py [--write-doc]`; `--write-doc` puts the table, with the machine, date
and commit, between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(figure: str, get: Callable[[], tuple[str, str, str]], target: str = "") -> tuple[str, str, str, str]:
    """(figure, measured, target, status); `get` returns (measured, target, status) from the results."""
    try:
        value, target, status = get()
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError):  # no file, or a field missing
        return figure, "no result", target, "no result"
    return figure, value, target, status


def _final(arm: dict[str, Any]) -> str:
    """'+0.0051 ± 0.0006 after 12 steps (30.1 s)': the last probe's gain and its standard error."""
    final = arm["curve"][-1]
    return f"{final['gain']:+.4f} ± {final['gain_se']:.4f} after {final['step']} steps ({final['image_s']:.1f} s)"


def _learning(arm: dict[str, Any]) -> str:
    """'12.3 s; final +0.0051 ± 0.0006 after 12 steps (30.1 s)', or 'not reached; final ...'."""
    s = arm["seconds_to_gain"]
    return f"{f'{s:.1f} s' if s is not None else 'not reached'}; final {_final(arm)}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def rows() -> list[tuple[str, str, str, str]]:
    a, inproc, scale = load("step_anatomy"), load("step_inprocess"), load("scaling")
    peer, judges, asyn, sync = load("trl_peer"), load("judges"), load("async_step"), load("weight_sync")
    samplers, engines = load("samplers"), load("text_engines")
    out = []

    def phase(key: str) -> Callable[[], tuple[str, str, str]]:
        return lambda: (f"{a['mean']['phases_s'][key]:.3f} s", "", "info")

    out.append(_row("cpu_tiny step wall (Ray, synchronous, mean)", lambda: (f"{a['mean']['wall_s']:.2f} s", "", "info")))
    for label, key in (("text rollout", "text_rollout"), ("image rollout", "image_rollout"), ("judge", "judge"),
                       ("advantages + driver rollout code", "advantages"), ("text learn (learner's own)", "text_learn"),
                       ("image learn (learner's own)", "image_learn"), ("weight sync", "sync"),
                       ("other driver work", "driver_other")):
        out.append(_row(f"  phase: {label}", phase(key)))
    out.append(_row("    of which: version + stats queries, trajectories parquet, metrics row",
                    lambda: (", ".join(f"{a['mean']['phases_s'][f'driver_other/{k}']:.3f}" for k in
                                       ("versions_and_worker_stats", "trajectories_parquet", "metrics_row")) + " s",
                             "", "info")))
    out.append(_row("  phase: checkpoint (once)", lambda: (f"{a['checkpoint_s']:.2f} s", "", "info")))
    out.append(_row("orchestration overhead: step wall / engines' own seconds",
                    lambda: (f"{a['overhead']:.3f}", "<= 1.05", _verdict(a["overhead"] <= 1.05)), "<= 1.05"))
    out.append(_row("same step in one process without Ray (mean)",
                    lambda: (f"{inproc['mean']['wall_s']:.2f} s", "", "info")))
    out.append(_row("Ray step / in-process step", lambda: (f"{a['ray_over_inprocess']:.2f}", "", "info")))
    out.append(_row("GRPO text step vs TRL GRPOTrainer: steps/s ratio",
                    lambda: (f"{peer['steps_per_s_ratio']:.2f}x ({peer['r3rl']['steps_per_s']:.2f} vs "
                             f"{peer['trl']['steps_per_s']:.2f} steps/s)", ">= 2x",
                             _verdict(peer["steps_per_s_ratio"] >= 2.0)), ">= 2x"))
    out.append(_row("  same on a ~27M-parameter Qwen2 (R3RL / TRL steps/s)",
                    lambda: (f"{peer['models']['qwen2-27m']['steps_per_s_ratio']:.2f}x "
                             f"({peer['models']['qwen2-27m']['r3rl']['steps_per_s']:.2f} vs "
                             f"{peer['models']['qwen2-27m']['trl']['steps_per_s']:.2f} steps/s)", "", "info")))
    out.append(_row("  tokens/s R3RL vs TRL",
                    lambda: (f"{peer['r3rl']['tokens_per_s']:.0f} vs {peer['trl']['tokens_per_s']:.0f} "
                             f"({peer['tokens_per_s_ratio']:.2f}x)", "", "info")))
    for role in ("driver", "text worker", "diffusion worker", "judge replica", "text learner", "diffusion learner"):
        out.append(_row(f"peak RSS: {role}", lambda role=role: (f"{a['memory_mib'][role]['peak_rss_mib']:.0f} MiB", "",
                                                                "info")))
    out.append(_row("peak RSS: all roles in one process (no Ray)",
                    lambda: (f"{inproc['memory_mib']['peak_rss_mib']:.0f} MiB", "", "info")))
    out.append(_row("trajectories/s, 2 text workers / 1 (generation-bound)",
                    lambda: (f"{scale['generation_bound']['speedup']:.2f}x "
                             f"({scale['generation_bound']['one_worker']['samples_per_s']:.1f} -> "
                             f"{scale['generation_bound']['two_workers']['samples_per_s']:.1f}/s)",
                             f"<= {scale['generation_bound']['cores']} (cores)", "info")))
    out.append(_row("step time vs group size 4/8/16: linear fit",
                    lambda: (_fit(scale["group_size"], "G"), "", "info")))
    out.append(_row("step time vs rounds 1-4 (chain): linear fit",
                    lambda: (_fit(scale["rounds"], "round"), "", "info")))
    for r in (judges or {}).get("rows", []):
        if r["judge"].startswith("vlm") and r["batch"] == 16:
            out.append(_row(f"Serve judge overhead, batch 16 ({r['judge']})",
                            lambda r=r: (f"{r['overhead']:.1%}", "<= 10%", _verdict(r["overhead"] <= 0.10)), "<= 10%"))
    if not (judges or {}).get("rows"):
        out.append(("Serve judge overhead, batch 16", "no result", "<= 10%", "no result"))
    out.append(_row("one-step-off step / synchronous step",
                    lambda: (f"{asyn['async_over_sync']:.2f} (bound on this machine "
                             f"{asyn['best_async_over_sync_on_this_machine']:.2f})", "<= 0.65",
                             _verdict(asyn["async_over_sync"] <= 0.65)), "<= 0.65"))
    out.append(_row("bucketed broadcast vs per-parameter (1M-param model)",
                    lambda: (f"{sync['results']['1m']['bucketed_speedup_vs_per_param']:.1f}x", ">= 5x",
                             _verdict(sync["results"]["1m"]["bucketed_speedup_vs_per_param"] >= 5.0)), ">= 5x"))
    out.append(_row("  same, transfer only (sender's time, without vLLM's reload)",
                    lambda: (f"{sync['results']['1m']['bucketed_transfer_speedup_vs_per_param']:.1f}x", "", "info")))
    out.append(_row("  bucketed / raw gloo bandwidth (1M-param model)",
                    lambda: (f"{sync['results']['1m']['bucketed_vs_raw_bw']:.2f}", ">= 0.5",
                             _verdict(sync["results"]["1m"]["bucketed_vs_raw_bw"] >= 0.5)), ">= 0.5"))
    out.append(_row("FlowGRPO SDE sampler with log-probs / diffusers pipeline (CPU time, worst)",
                    lambda: (f"{samplers['worst_sde_logp_ratio_cpu']:.3f}", "<= 1.10",
                             _verdict(samplers["worst_sde_logp_ratio_cpu"] <= 1.10)), "<= 1.10"))
    out.append(_row("vLLM reasoner tokens/s, tiny LM batch 32",
                    lambda: (f"{_engine(engines, 'lm', 32):.0f}", "", "info")))
    learning = load("image_learning")
    if learning is None:
        out.append(("image-side learning per second (FlowGRPO SDE vs CPS vs DiffusionNFT)", "no result", "",
                    "no result"))
    else:
        gain, arms = learning["gain"], learning["arms"]
        out.append(_row("image-side learning per second: ShapesWorld dense reward, warm start; gain asked",
                        lambda: (f"{learning['warm_start_score']:.4f}, +{gain} in {learning['steps']} steps "
                                 f"({learning['probe_draws']} paired probe draws)", "", "info")))
        if "null" in arms:
            out.append(_row("  null arm (SDE, shuffled advantages): drift from the warm start", lambda: (
                _final(arms["null"]), "", "info")))
        for name, label in (("flow_grpo_sde", "FlowGRPO, SDE"), ("flow_grpo_cps", "FlowGRPO, CPS"),
                            ("diffusion_nft", "DiffusionNFT")):
            if name in arms:
                out.append(_row(f"  {label}: image-side seconds to the gain; final gain over the null arm",
                                lambda a=arms[name]: (_learning(a), "", "info")))
        speeds = {n: a.get("speed_vs_sde") for n, a in arms.items() if n in ("flow_grpo_cps", "diffusion_nft")}
        out.append(_row("  learning per second vs FlowGRPO SDE (CPS, DiffusionNFT)", lambda: (", ".join(
            f"{n}: {v:.2f}x" if v else f"{n}: gain not reached" for n, v in speeds.items()), "", "info")))
    return out


def _fit(block: dict[str, Any], unit: str) -> str:
    f = block["fit"]
    times = ", ".join(f"{r['wall_s']:.1f}" for r in block["rows"])
    shape = "linear" if f["r2"] >= 0.9 else "not linear"
    return f"{times} s; {f['slope_s']:.2f} s per {unit}, R² {f['r2']:.2f} ({shape})"


def _engine(engines: dict[str, Any], model: str, batch: int) -> float:
    return next(r["tokens_per_s"] for r in engines["rows"] if r["model"] == model and r["batch"] == batch)


def markdown(table: list[tuple[str, str, str, str]]) -> str:
    lines = ["| figure | measured | target | status |", "|---|---|---|---|"]
    lines += [f"| {f.replace('  ', '&nbsp;&nbsp;')} | {v} | {t} | {s} |" for f, v, t, s in table]
    return "\n".join(lines)


def machine_line() -> str:
    for name in ("step_anatomy", "trl_peer", "scaling"):
        data = load(name)
        if data and "machine" in data:
            m = data["machine"]
            dirty = " with uncommitted changes in the checkout" if m.get("uncommitted_changes") else ""
            return (f"Machine: {m['nproc']} cores, {m['cpu_model']}; measured {m['date']} at commit {m['commit']}{dirty} "
                    f"(1-minute load average at the end of the anatomy run: {m['loadavg'][0]:.1f}).")
    return "Machine: unknown (no result with a machine description)."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-doc", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    table = rows()
    width = max(len(r[0]) for r in table)
    vwidth = min(max(len(r[1]) for r in table), 70)
    print(f"{'figure':<{width}}  {'measured':<{vwidth}}  {'target':<9} status")
    for f, v, t, s in table:
        print(f"{f:<{width}}  {v:<{vwidth}}  {t:<9} {s}")
    print(machine_line())
    if args.write_doc:
        text = DOC.read_text()
        block = f"{BEGIN}\n{machine_line()}\n\n{markdown(table)}\n{END}"
        new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        if new == text and BEGIN not in text:
            raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers")
        DOC.write_text(new)
        print(f"wrote the table into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
