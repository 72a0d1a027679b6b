"""The cpu_tiny step in one process without Ray: the roles' classes called directly.

Same config, seed, prompts, stages and models as `bench/step_anatomy.py`: a vLLM `TextWorker`, a
`DiffusionWorker`, the judge built from the same spec, and one `TextLearner` and one
`DiffusionLearner` rank (DeepSpeed, world size 1) live in this process; `cluster.r3_step` runs the
rollout over them, the learners train one after the other (one process: no overlap), and the
weights go back through the learners' safetensors export and the workers' in-memory load (what the
object-store sync sends, without the object store). Torch runs one thread, as each Ray actor does.
The step wall here against the Ray step's is what distribution costs on one machine.

Run: `python bench/step_inprocess.py [--steps 3]`; writes bench/results/step_inprocess.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, CallTimes, Timed, memory_of, write_result

log = logging.getLogger("bench.step_inprocess")
CONFIG = "configs/cpu_tiny.yaml"


class LocalReasoner:
    def __init__(self, worker: Any):
        self.worker = worker

    def generate(self, requests: list[Any]) -> list[Any]:
        return self.worker.generate(requests)

    def version(self) -> int:
        return self.worker.version()


class LocalGenerator:
    def __init__(self, worker: Any):
        self.worker = worker

    def sample(self, requests: list[Any], settings: Any) -> list[Any]:
        return self.worker.sample(requests, settings)

    def version(self) -> int:
        return self.worker.version()


def build(cfg: Any) -> dict[str, Any]:
    """Every role of the config as a plain object in this process."""
    from actors.diffusion_worker import DiffusionWorker
    from actors.text_worker import TextWorker
    from cluster.roles import diffusion_learner_kwargs, judge_spec, resolve_paths, text_learner_kwargs
    from learners.diffusion_learner import DiffusionLearner
    from learners.text_learner import TextLearner
    from reward.registry import build_judge
    from rollout.ports import free_port

    paths, seed = resolve_paths(cfg), cfg.train.seed
    text = TextWorker(paths.reasoner, max_model_len=cfg.models.reasoner.max_model_len,
                      dtype=cfg.models.reasoner.dtype, seed=seed)
    image = DiffusionWorker(paths.generator, device="cpu", dtype=cfg.models.generator.dtype, seed=seed,
                            max_sequence_length=cfg.models.generator.max_sequence_length)
    judge = build_judge(judge_spec(cfg, paths))
    dist = dict(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
    text_learner = TextLearner(**dist, **text_learner_kwargs(cfg, paths))
    image_learner = DiffusionLearner(**dist, **diffusion_learner_kwargs(cfg, paths))
    return {"text": text, "image": image, "judge": judge, "text_learner": text_learner,
            "image_learner": image_learner}


def initial_state(cfg: Any) -> dict[str, Any]:
    """What the driver keeps between steps: step settings, the prompt iterator, the rollout buffer."""
    from cluster.settings import load_prompt_sets, step_settings
    from rollout.buffer import RolloutBuffer
    from rollout.datasets import PromptIterator

    train_prompts, _ = load_prompt_sets(cfg)
    return {"settings": step_settings(cfg),
            "prompts": PromptIterator(train_prompts, seed=cfg.train.seed, shuffle=cfg.data.shuffle),
            "buffer": RolloutBuffer(cfg.r3.buffer_size, p_perfect=cfg.r3.p_perfect, seed=cfg.train.seed)}


def step(i: int, cfg: Any, roles: dict[str, Any], state: dict[str, Any], times: CallTimes) -> dict[str, Any]:
    """One synchronous step; phase seconds."""
    from cluster.r3_step import run_r3_step, tree_stages

    settings, phases = state["settings"], {}
    start = time.perf_counter()
    needs_prompts = settings.mode == "chain" or "generate" in tree_stages(i, settings, state["buffer"])
    prompts = state["prompts"].next_batch(cfg.r3.prompts_per_step) if needs_prompts else []
    result = run_r3_step(i, prompts, Timed(LocalReasoner(roles["text"]), "text_rollout", times, ("generate",)),
                         Timed(LocalGenerator(roles["image"]), "image_rollout", times, ("sample",)),
                         Timed(roles["judge"], "judge", times, ("score",)), state["buffer"], settings)
    rollout = time.perf_counter() - start
    phases.update(times.take())
    phases["advantages"] = rollout - sum(phases.values())
    t = time.perf_counter()
    if result.text_batch and "text_learner" in roles:  # without a text learner the reasoner stays as loaded
        images = [it.images[0] if it.images else None for it in result.text_batch]
        roles["text_learner"].train_step([it.sample for it in result.text_batch],
                                         [it.advantage for it in result.text_batch],
                                         images=images if any(x is not None for x in images) else None)
    phases["text_learn"] = time.perf_counter() - t
    t = time.perf_counter()
    if result.image_batch:
        negative = None
        if cfg.flow_grpo.train_cfg_scale != 1.0:
            embeds, pooled = roles["image"].encode([""])
            negative = (embeds[0], pooled[0])
        roles["image_learner"].train_step([it.sample for it in result.image_batch],
                                          [it.advantage for it in result.image_batch], negative_embeds=negative)
    phases["image_learn"] = time.perf_counter() - t
    t = time.perf_counter()
    version = i + 1
    for learner, worker, dtype in ((roles.get("text_learner"), roles["text"], cfg.models.reasoner.dtype),
                                   (roles["image_learner"], roles["image"], cfg.models.generator.dtype)):
        if learner is None:
            continue
        worker.load_weights_bytes(version, learner.export_weights_bytes(dtype, version > 1), version > 1)
    phases["sync"] = time.perf_counter() - t
    return {"wall_s": time.perf_counter() - start, "stages": "+".join(result.stages), "phases_s": phases,
            "trajectories": len(result.trajectories), "text_samples": len(result.text_batch),
            "image_samples": len(result.image_batch)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps (>= 2: step 0 is the warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray actor of 0.5 CPU gets 1)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra dotted override")
    ap.add_argument("--name", default="step_inprocess", help="results file bench/results/<name>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    from cluster.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as tmp:
        cfg = load_config(CONFIG, [*args.overrides, f"train.run_dir={tmp}"])
        state = initial_state(cfg)
        start = time.perf_counter()
        roles = build(cfg)
        ready_s = time.perf_counter() - start
        times, rows = CallTimes(), []
        try:
            for i in range(args.steps):
                rows.append(step(i, cfg, roles, state, times))
                log.info("in-process step %d: %.2f s", i, rows[-1]["wall_s"])
            start = time.perf_counter()
            roles["text_learner"].save(str(Path(tmp) / "ckpt-text"))
            roles["image_learner"].save(str(Path(tmp) / "ckpt-image"))
            checkpoint_s = time.perf_counter() - start
        finally:
            for key in ("text", "image", "judge"):
                if hasattr(roles[key], "shutdown"):
                    roles[key].shutdown()
    measured = rows[1:]
    result = {"config": CONFIG, "overrides": args.overrides, "torch_threads": args.threads, "roles_ready_s": ready_s,
              "steps": rows, "checkpoint_s": checkpoint_s, "memory_mib": memory_of(os.getpid()),
              "mean": {"wall_s": statistics.fmean(r["wall_s"] for r in measured),
                       "phases_s": {k: statistics.fmean(r["phases_s"].get(k, 0.0) for r in measured)
                                    for k in measured[0]["phases_s"]}}}
    write_result(args.name, result)
    print(f"in-process step (mean of steps 1..{args.steps - 1}): {result['mean']['wall_s']:.2f} s; "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["mean"]["phases_s"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
