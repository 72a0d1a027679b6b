"""Image-side learning per second: FlowGRPO with Flow-GRPO's SDE, FlowGRPO with CPS, and DiffusionNFT,
on the ShapesWorld generator with a dense reward, against a null arm.

The task: the colour prompts of the ShapesWorld train split, scored by the plugin's dense judge
`shapes-colour-area` (the share of the image drawn in the asked colour; the warm start is at about
0.04, so each update can raise it a little). Every arm starts from the shipped warm start with the
committed `shapes_cpu.yaml` settings, the same seed, prompts and steps (the same rollout budget:
the same number of images per step), and its own overrides; `null` is the Flow-GRPO SDE arm with
its advantages shuffled within each batch (`train.null_advantages`): the same updates without
signal, the control every gain is measured against. The reasoner is the shipped one, frozen (no text learner), so
only the generator changes; `r3.adv_std=group`, as this small-range reward needs
(tests/examples/shapesworld/test_shapes_sanity.py).

The roles run in this process (`bench/step_inprocess.py`: the same `cluster.r3_step` rollout, the
same learners and sync, no Ray), one arm after the other, all in one run. Every `--probe-every`
steps the generator draws fixed prompts with fixed noise (ODE, as evaluations do) and the judge
scores them. An arm's clock is the image side's own seconds (image rollout + image learner update +
the generator's sync), summed over its steps. An arm's gain at a probe is its score minus the null
arm's at the same step, paired by prompt and noise, with its standard error (the null arm's own
curve is its drift from the warm start, the same draws before any update). Figures: the gain at each
probe, the image-side seconds to reach `--gain` (linear between probes, from gain 0 at 0 s), and
each arm's learning speed relative to the Flow-GRPO SDE arm (that arm's seconds / this arm's). An
arm that does not reach the gain within its steps has no time (reported as not reached).

Run: `python bench/image_learning.py [--steps 12] [--probe-every 2] [--gain 0.005]`;
writes bench/results/image_learning.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, CallTimes, memory_of, write_result
from step_inprocess import initial_state, step

log = logging.getLogger("bench.image_learning")
CONFIG = "examples/shapesworld/configs/shapes_cpu.yaml"
COMMON = ["judge.kind=shapes-colour-area", "data.balance_categories=false", "r3.prompts_per_step=2",
          "r3.adv_std=group", "train.seed=0", "checkpoint.every=0"]
ARMS = {  # the null arm first: the others' gains are measured against it
    "null": ["train.null_advantages=true"],
    "flow_grpo_sde": [],
    "flow_grpo_cps": ["flow_grpo.sde=cps", "flow_grpo.noise_level=0.7"],
    "diffusion_nft": ["flow_grpo.algorithm=nft", "flow_grpo.share_group_noise=false"],
}
BASELINE = "flow_grpo_sde"


def colour_prompts(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The train split's colour prompts as a JSONL prompt file, and their metadata."""
    from examples.shapesworld.tasks import shapes_split

    rows = [r.metadata for r in shapes_split("train", seed=0) if r.metadata["tag"] == "colors"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def probe(worker: Any, judge: Any, prompts: list[dict[str, Any]], cfg: Any) -> np.ndarray:
    """Dense-reward scores of fixed draws (prompt i, noise i) with the worker's current weights."""
    from examples.shapesworld.probe import ode_settings
    from rollout.interfaces import ImageRequest, JudgeItem

    g = cfg.flow_grpo
    settings = ode_settings(g.eval_num_steps, g.guidance, g.train_cfg_scale, cfg.models.generator.height)
    images = [x.image for x in worker.sample([ImageRequest(m["prompt"], seed=i, noise_seed=i)
                                              for i, m in enumerate(prompts)], settings)]
    items = [JudgeItem(im, m["prompt"], m) for im, m in zip(images, prompts, strict=True)]
    return np.array([r.score for r in judge.score(items)])


def seconds_to_gain(curve: list[dict[str, Any]], gain: float) -> float | None:
    """First time the gain reaches `gain`, linear between probes (the warm start is at 0 s, gain 0)."""
    prev_t, prev_g = 0.0, 0.0
    for point in curve:
        t, g = point["image_s"], point["gain"]
        if g >= gain:
            return prev_t + (t - prev_t) * (gain - prev_g) / (g - prev_g) if g > prev_g else t
        prev_t, prev_g = t, g
    return None


def paired_gain(scores: np.ndarray, control: np.ndarray) -> dict[str, float]:
    """Mean of `scores - control` (paired draws), its standard error, and the share of draws higher."""
    diff = scores - control
    return {"gain": float(diff.mean()), "gain_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "higher_share": float((diff > 0).mean())}


def run_arm(name: str, cfg: Any, text: Any, judge: Any, probe_prompts: list[dict[str, Any]],
            control: dict[int, np.ndarray], steps: int, probe_every: int) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Train the generator `steps` steps from the warm start; probe every `probe_every` steps. Gains are
    against `control[step]` (the null arm's scores at that step, or the warm start's at step 0)."""
    from actors.diffusion_worker import DiffusionWorker
    from cluster.roles import diffusion_learner_kwargs, resolve_paths
    from learners.diffusion_learner import DiffusionLearner
    from rollout.ports import free_port

    paths = resolve_paths(cfg)
    image = DiffusionWorker(paths.generator, device="cpu", dtype=cfg.models.generator.dtype, seed=cfg.train.seed,
                            max_sequence_length=cfg.models.generator.max_sequence_length)
    learner = DiffusionLearner(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(),
                               **diffusion_learner_kwargs(cfg, paths))
    state = initial_state(cfg)
    roles = {"text": text, "image": image, "judge": judge, "image_learner": learner}
    times, clock, curve, rows, scores = CallTimes(), 0.0, [], [], {}
    try:
        for i in range(steps):
            row = step(i, cfg, roles, state, times)
            rows.append(row)
            clock += sum(row["phases_s"].get(k, 0.0) for k in ("image_rollout", "image_learn", "sync"))
            if (i + 1) % probe_every == 0 or i + 1 == steps:
                scores[i + 1] = probe(image, judge, probe_prompts, cfg)
                curve.append({"step": i + 1, "image_s": clock, **paired_gain(scores[i + 1], control.get(i + 1, control[0]))})
                log.info("%s step %d: %.1f image-side s, gain %+.4f (SE %.4f)", name, i + 1, clock,
                         curve[-1]["gain"], curve[-1]["gain_se"])
    finally:
        image.shutdown()
    return {"curve": curve, "image_s_per_step": clock / steps,
            "images_per_step": float(np.mean([r["image_samples"] for r in rows])),
            "step_wall_s": [r["wall_s"] for r in rows]}, scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="training steps per arm (the rollout budget)")
    ap.add_argument("--probe-every", type=int, default=2, help="probe the generator every this many steps")
    ap.add_argument("--gain", type=float, default=0.005, help="the reward gain over the null arm to reach")
    ap.add_argument("--noises", type=int, default=2, help="probe draws (noises) per colour prompt")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms to run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(1)  # as each Ray actor of the CPU configs runs
    from actors.diffusion_worker import DiffusionWorker
    from actors.text_worker import TextWorker
    from cluster.config import load_config
    from cluster.roles import judge_spec, resolve_paths
    from reward.registry import build_judge

    logging.getLogger("vllm").setLevel(logging.ERROR)  # the bench prints its table alone; engine INFO lines would interleave
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-image-learning-") as tmp:
        train_file, rows = colour_prompts(Path(tmp) / "colour_prompts.jsonl")
        probe_prompts = rows * args.noises
        base = [*COMMON, f"data.train={train_file}", f"train.run_dir={tmp}"]
        cfg0 = load_config(CONFIG, base, check_paths=True)
        paths = resolve_paths(cfg0)
        text = TextWorker(paths.reasoner, max_model_len=cfg0.models.reasoner.max_model_len,
                          dtype=cfg0.models.reasoner.dtype, seed=cfg0.train.seed)
        judge = build_judge(judge_spec(cfg0, paths))
        warm_worker = DiffusionWorker(paths.generator, device="cpu", dtype=cfg0.models.generator.dtype, seed=0,
                                      max_sequence_length=cfg0.models.generator.max_sequence_length)
        try:
            warm = probe(warm_worker, judge, probe_prompts, cfg0)
        finally:
            warm_worker.shutdown()
        log.info("warm start: %.4f on %d probe draws", warm.mean(), len(warm))
        control = {0: warm}  # the null arm's scores per probed step, once it has run
        try:
            for name in args.arms:
                start = time.perf_counter()
                cfg = load_config(CONFIG, [*base, *ARMS[name]], check_paths=True)
                arm, scores = run_arm(name, cfg, text, judge, probe_prompts, control, args.steps, args.probe_every)
                out[name] = {"overrides": ARMS[name], "gain_against": "warm start" if name == "null" or
                             "null" not in args.arms else "null arm", **arm}
                out[name]["seconds_to_gain"] = None if name == "null" else seconds_to_gain(arm["curve"], args.gain)
                out[name]["arm_wall_s"] = time.perf_counter() - start
                if name == "null":
                    control.update(scores)
        finally:
            text.shutdown()
    base_s = out.get(BASELINE, {}).get("seconds_to_gain")
    for name, arm in out.items():
        s, final = arm["seconds_to_gain"], arm["curve"][-1]
        arm["speed_vs_sde"] = base_s / s if (s and base_s) else None
        line = (f"{name}: {final['gain']:+.4f} (SE {final['gain_se']:.4f}) against the {arm['gain_against']} after "
                f"{final['step']} steps, {final['image_s']:.1f} image-side s")
        if name != "null":
            line += f"; +{args.gain} " + (f"reached in {s:.1f} s" if s is not None else "not reached")
            line += f", {arm['speed_vs_sde']:.2f}x the SDE arm's speed" if arm["speed_vs_sde"] else ""
        print(line)
    write_result("image_learning", {
        "config": CONFIG, "common_overrides": COMMON, "steps": args.steps, "probe_every": args.probe_every,
        "gain": args.gain, "probe_draws": len(probe_prompts), "warm_start_score": float(warm.mean()),
        "arms": out, "memory_mib": memory_of(os.getpid())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
