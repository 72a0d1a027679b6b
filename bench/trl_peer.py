"""A peer on the text side: one GRPO step of R3RL against TRL's `GRPOTrainer`, same model, same work.

Both train the tiny LM (`tiny:lm`, built by `actors.models`) on the same `PROMPTS` prompts with
`GROUP` samples each, at most `LENGTH` completion tokens, temperature 1, no KL term, no reward
scaling, one optimizer update per step over the whole batch (one micro-batch), Adam at the same lr,
for `--steps` steps; the first step of each is a warm-up and is not timed. The reward is the same
cheap function of the completion text on both sides.

- R3RL: a vLLM `TextWorker` and a DeepSpeed `TextLearner` (ZeRO-1) as Ray actors; a step is
  generate -> reward -> group advantages -> `train_step` -> bucketed broadcast of the new weights.
- TRL: `GRPOTrainer` on the CPU (transformers generation, its own loss and optimizer), timed by a
  callback from step begin to step end. It runs in this process after Ray is shut down; its rounds
  alternate 1 torch thread and all cores, and the faster is kept (TRL at its best on this machine).

The two sides alternate `--rounds` times (R3RL, TRL, R3RL, TRL, ...), each keeping its best round, so
a change in the machine's load hits both. `--wider` repeats the comparison once (3 steps, TRL at 1 thread) on a ~27M-parameter
Qwen2 with the same tokenizer (8 layers, width 512), where compute weighs more than fixed per-call costs.

TRL is installed for this benchmark only (`TRL_VERSION`, not a project dependency) when it is
missing; its vLLM and DeepSpeed integrations stay off (`use_vllm=False`, no DeepSpeed config).
Reports steps/s, generated tokens/s and R3RL / TRL; target >= 2x.

Run: `python bench/trl_peer.py [--steps 5] [--rounds 2] [--wider]`; writes bench/results/trl_peer.json.
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
from pathlib import Path
from typing import Any

from common import RESULTS as RESULTS_DIR
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


def build_wider_lm(out: Path) -> Path:
    """A random Qwen2 of about 27M parameters (8 layers, width 512) with the tiny LM's tokenizer and
    vocabulary, so both engines decode every id: the same comparison where compute weighs more."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from actors.models import build_tiny_models

    if (out / "config.json").is_file():
        return out
    tiny = build_tiny_models().lm
    tok = AutoTokenizer.from_pretrained(tiny)
    base = Qwen2Config.from_pretrained(tiny)
    cfg = Qwen2Config(vocab_size=base.vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=base.eos_token_id, bos_token_id=base.bos_token_id,
                      pad_token_id=base.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def compare(model: str, steps: int, rounds: int, threads: list[int]) -> dict[str, Any]:
    """R3RL and TRL alternately, `rounds` times each (load changes hit both); each side keeps its best
    round. TRL's rounds go through `threads` (torch threads) in turn."""
    ours, theirs = [], []
    for r in range(rounds):
        ours.append(r3rl_steps(model, steps))
        theirs.append(trl_steps(model, steps, threads[r % len(threads)]))
    best_ours = max(ours, key=lambda x: x["steps_per_s"])
    best_theirs = max(theirs, key=lambda x: x["steps_per_s"])
    ratio = best_ours["steps_per_s"] / best_theirs["steps_per_s"]
    return {"r3rl": best_ours, "trl": best_theirs, "r3rl_all": ours, "trl_all": theirs, "steps_per_s_ratio": ratio,
            "tokens_per_s_ratio": best_ours["tokens_per_s"] / best_theirs["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="steps per side (>= 2: the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating R3RL/TRL rounds per model; best kept")
    ap.add_argument("--wider", action="store_true", help="also compare on a ~27M-parameter model")
    ap.add_argument("--name", default="trl_peer", help="results file bench/results/<name>.json")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (the first is a warm-up), got {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    version = ensure_trl()
    from actors.models import build_tiny_models

    models = {"tiny:lm": str(build_tiny_models().lm)}
    if args.wider:
        models["qwen2-27m"] = str(build_wider_lm(RESULTS_DIR / "models" / "qwen2-27m"))
    per_model = {"tiny:lm": compare(models["tiny:lm"], args.steps, args.rounds, sorted({1, os.cpu_count() or 1}))}
    if args.wider:  # one round of 3 steps at 1 thread: a step is seconds here, and 2 threads were far slower
        per_model["qwen2-27m"] = compare(models["qwen2-27m"], 3, 1, [1])  # on the loaded 2-core machine
    tiny = per_model["tiny:lm"]
    result = {"trl_version": version, "model": "tiny:lm", "prompts": PROMPTS, "group_size": GROUP,
              "max_completion_tokens": LENGTH, "steps": args.steps, "rounds": args.rounds, **tiny,
              "models": per_model, "target": TARGET, "meets_target": tiny["steps_per_s_ratio"] >= TARGET}
    write_result(args.name, result)
    print(f"{'model':<11}{'':<6}{'step s':>9}{'steps/s':>9}{'tokens/s':>10}")
    for name, res in per_model.items():
        for side, r in (("R3RL", res["r3rl"]), ("TRL", res["trl"])):
            print(f"{name:<11}{side:<6}{r['steady_step_s']:>9.3f}{r['steps_per_s']:>9.3f}{r['tokens_per_s']:>10.0f}")
        print(f"{name:<11}R3RL step phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in res["r3rl"]["phases_s"].items()))
        print(f"{name:<11}R3RL / TRL steps/s: {res['steps_per_s_ratio']:.2f} (TRL {res['trl']['torch_threads']} thread(s))")
    print(f"target on tiny:lm: >= {TARGET}x; TRL {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
