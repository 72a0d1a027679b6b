"""A peer on the text side: one GRPO step of R3RL against TRL's `GRPOTrainer`, same model, same work.

Both train the tiny LM (`tiny:lm`, built by `actors.models`) on the same `PROMPTS` prompts with
`GROUP` samples each, at most `LENGTH` completion tokens, temperature 1, no KL term, no reward
scaling, one optimizer update per step over the whole batch (one micro-batch), Adam at the same lr,
for `--steps` steps; the first step of each is a warm-up and is not timed. The reward is the same
cheap function of the completion text on both sides.

- R3RL: a vLLM `TextWorker` and a DeepSpeed `TextLearner` (ZeRO-1) as Ray actors; a step is
  generate -> reward -> group advantages -> `train_step` -> bucketed broadcast of the new weights.
- TRL: `GRPOTrainer` on the CPU (transformers generation, its own loss and optimizer), timed by a
  callback from step begin to step end. It runs in this process after Ray is shut down; its torch
  thread count is tried at 1 and at all cores and the faster kept (TRL at its best on this machine).

TRL is installed for this benchmark only (`TRL_VERSION`, not a project dependency) when it is
missing; its vLLM and DeepSpeed integrations stay off (`use_vllm=False`, no DeepSpeed config).
Reports steps/s, generated tokens/s and R3RL / TRL; target >= 2x.

Run: `python bench/trl_peer.py [--steps 5]`; writes bench/results/trl_peer.json.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from common import write_result

log = logging.getLogger("bench.trl_peer")
TRL_VERSION = "1.16.0"  # works with the venv's transformers 5.x and torch 2.x
PROMPTS, GROUP, LENGTH, LR = 4, 8, 32, 1e-5
TARGET = 2.0
PROMPT_TEXTS = [f"Describe a picture of {n} {c} {s}." for n, c, s in
                zip(("two", "three", "four", "five"), ("red", "green", "blue", "yellow"),
                    ("circles", "squares", "triangles", "stars"), strict=True)][:PROMPTS]


def reward(text: str) -> float:
    """Share of distinct characters: cheap, deterministic, and it varies within a group."""
    return len(set(text)) / max(len(text), 1)


def ensure_trl() -> str:
    """The installed TRL version; installs `TRL_VERSION` into this venv when TRL is missing."""
    try:
        import trl
    except ImportError:
        print(f"installing trl=={TRL_VERSION} for this benchmark (not a project dependency)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
        importlib.invalidate_caches()
        import trl
    return trl.__version__


def r3rl_steps(model: str, steps: int) -> dict[str, Any]:
    """GRPO steps on Ray: vLLM worker + DeepSpeed learner + broadcast sync."""
    import ray
    import torch

    from actors.text_worker import remote_text_worker
    from learners.algos import group_advantages
    from learners.group import LearnerGroup
    from learners.weight_sync import make_weight_sync
    from rollout.interfaces import ChatMessage, TextRequest

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        worker = remote_text_worker(0, 0.5, 0, model_path=model, max_model_len=256, dtype="float32", seed=0)
        learners = LearnerGroup("text", 1, 0.5, 0, model_path=model, zero_stage=1, lr=LR, kl_coef=0.0,
                                micro_batch_size=PROMPTS * GROUP, temperature=1.0, top_p=1.0, seed=0)
        sync = make_weight_sync("broadcast", bucket_mb=16)
        ray.get(worker.version.remote())
        walls, tokens, phases = [], [], []
        for step in range(steps):
            start = time.perf_counter()
            requests = [TextRequest(messages=(ChatMessage("user", p, ()),), n=GROUP, temperature=1.0, top_p=1.0,
                                    max_tokens=LENGTH, seed=1000 * step + i) for i, p in enumerate(PROMPT_TEXTS)]
            groups = ray.get(worker.generate.remote(requests))
            generated = time.perf_counter()
            samples = [s for g in groups for s in g]
            rewards = torch.tensor([reward(s.text) for s in samples])
            advantages = group_advantages(rewards, GROUP).tolist()
            metrics = learners.train_step(samples, advantages)
            learned = time.perf_counter()
            report = sync.sync(learners, [worker], version=step + 1)
            walls.append(time.perf_counter() - start)
            tokens.append(sum(len(s.answer_ids) for s in samples))
            phases.append({"generate_s": generated - start, "learn_s": learned - generated,
                           "learner_own_s": metrics["step_seconds"], "sync_s": walls[-1] - (learned - start),
                           "sync_sender_s": (report.sender or {}).get("seconds", report.seconds)})
            log.info("R3RL step %d: %.2f s, %d tokens, %s", step, walls[-1], tokens[-1], phases[-1])
        sync.shutdown()
        learners.shutdown()
        ray.get(worker.shutdown.remote())
    finally:
        ray.shutdown()
    summary = _summary(walls, tokens)
    summary["phases_s"] = {k: statistics.fmean(p[k] for p in phases[1:]) for k in phases[0]}
    return summary


def trl_steps(model: str, steps: int, threads: int) -> dict[str, Any]:
    """The same work with TRL's GRPOTrainer on the CPU."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    walls: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201, ARG002
            walls.append(time.perf_counter() - self.start)

    def reward_fn(completions: list[str], **_: Any) -> list[float]:
        return [reward(c) for c in completions]

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        config = GRPOConfig(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1,
            num_generations=GROUP, max_completion_length=LENGTH, temperature=1.0, top_p=1.0, beta=0.0,
            num_iterations=1, scale_rewards="none", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            use_vllm=False, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
            logging_steps=1, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        dataset = Dataset.from_dict({"prompt": PROMPT_TEXTS * (steps + 1)})
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=dataset,
                              callbacks=[StepTimer()])
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = [int(round(n * PROMPTS * GROUP)) for n in lengths]
    return {**_summary(walls, tokens), "torch_threads": threads}


def _summary(walls: list[float], tokens: list[int]) -> dict[str, Any]:
    timed, timed_tokens = walls[1:], tokens[1:len(walls)]
    return {"step_wall_s": walls, "tokens_per_step": tokens, "steady_step_s": statistics.fmean(timed),
            "steps_per_s": len(timed) / sum(timed), "tokens_per_s": sum(timed_tokens) / sum(timed)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="steps per side (>= 2: the first is a warm-up)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the first is a warm-up), got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    version = ensure_trl()
    from actors.models import build_tiny_models

    model = str(build_tiny_models().lm)
    ours = r3rl_steps(model, args.steps)
    theirs = [trl_steps(model, args.steps, t) for t in sorted({1, os.cpu_count() or 1})]
    best = max(theirs, key=lambda r: r["steps_per_s"])
    ratio = ours["steps_per_s"] / best["steps_per_s"]
    result = {"trl_version": version, "model": "tiny:lm", "prompts": PROMPTS, "group_size": GROUP,
              "max_completion_tokens": LENGTH, "steps": args.steps, "r3rl": ours, "trl": best, "trl_all": theirs,
              "steps_per_s_ratio": ratio, "tokens_per_s_ratio": ours["tokens_per_s"] / best["tokens_per_s"],
              "target": TARGET, "meets_target": ratio >= TARGET}
    write_result("trl_peer", result)
    print(f"{'':<6}{'step s':>9}{'steps/s':>9}{'tokens/s':>10}")
    for name, r in (("R3RL", ours), ("TRL", best)):
        print(f"{name:<6}{r['steady_step_s']:>9.3f}{r['steps_per_s']:>9.3f}{r['tokens_per_s']:>10.0f}")
    print("R3RL step phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in ours["phases_s"].items()))
    print(f"R3RL / TRL steps/s: {ratio:.2f} (target >= {TARGET}); TRL {version}, {best['torch_threads']} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
