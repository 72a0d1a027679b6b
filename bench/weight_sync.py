"""Benchmark: weight sync from a learner-side sender into a vLLM text worker.

Design: docs/design.md#bucketed-broadcast.

For random Qwen2 models of ~1M, ~30M and ~300M parameters, measures in one run, between the same
two Ray actors (sender = `WeightSenderMixin` on an HF model; receiver = `TextWorker` with the
weight-sync extension, in-process vLLM engine):
- bucketed broadcast (flat buckets of whole layers, `bucket_mb`, double-buffered),
- per-parameter broadcast (one collective per tensor, loaded per layer group),
- object-store path (safetensors bytes through Ray's object store, one reload),
- raw gloo broadcast of the same number of bytes over the same group (no packing, no loading).
Seconds are driver wall time per sync including the receiver's reload (median of `--repeats`,
methods interleaved); GB/s = model bytes / seconds. "send-only" compares the sender's time inside
`broadcast_weights` (transfer without vLLM's reload) for bucketed vs per-parameter.
Targets: bucketed >= 0.5 x raw bandwidth and >= 5 x per-parameter on the model with
many small tensors (the 1M model: 12 layers of tiny matrices).

Run: `.venv/bin/python -m bench.weight_sync [--sizes 1m,30m,300m] [--repeats 3] [--bucket-mb 50]`.
Prints a table and writes `bench/results/weight_sync.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from learners.weight_sender import WeightSenderMixin
from learners.weight_sync import make_weight_sync

log = logging.getLogger("bench.weight_sync")

# name -> Qwen2 config overrides (vocab, hidden, intermediate, layers, heads)
SIZES: dict[str, dict[str, int]] = {
    "1m": dict(vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4),
    "30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8),
    "300m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16),
}
RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"


class BenchSender(WeightSenderMixin):
    """Learner rank 0 stand-in: the sender mixin on a plain HF model (no optimizer state)."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.engine = SimpleNamespace(module=model)
        self.rank = 0

    def perturb(self, seed: int) -> float:
        """Change every weight a little, so each sync carries new values; returns the checksum."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.engine.module.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen))
        return self.weights_checksum()


def build_model(size: str, tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    """A random Qwen2 of the given size with the tiny tokenizer; returns (folder, parameter count)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = SIZES[size]
    cfg = Qwen2Config(**spec, num_key_value_heads=spec["num_attention_heads"],
                      head_dim=spec["hidden_size"] // spec["num_attention_heads"], max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def bench_size(size: str, tokenizer_dir: Path, repeats: int, bucket_mb: float) -> dict[str, Any]:
    import ray

    from actors.text_worker import remote_text_worker

    tmp = Path(tempfile.mkdtemp(prefix=f"r3rl-bench-{size}-"))
    try:
        model_dir, n_params = build_model(size, tokenizer_dir, tmp / "model")
        sender = ray.remote(num_cpus=1)(BenchSender).remote(str(model_dir))
        worker = remote_text_worker(0, num_cpus=1, num_gpus=0, model_path=str(model_dir), max_model_len=128)
        ray.get([worker.version.remote(), sender.weights_checksum.remote()])
        nbytes = 4 * n_params
        rows: dict[str, Any] = {"params": n_params, "bytes": nbytes}
        bucketed = make_weight_sync("broadcast", bucket_mb=bucket_mb)
        bucketed.sync(sender, [worker], version=1)  # forms the group, warms up
        per_param = make_weight_sync("broadcast", bucket_mb=bucket_mb)
        per_param.mode = "per_param"  # same group and buckets (loaded per bucket), one collective per tensor
        per_param._members, per_param._meta, per_param._learners = bucketed._members, bucketed._meta, [sender]
        object_store = make_weight_sync("object_store")
        methods = {
            "bucketed": lambda v: bucketed.sync(sender, [worker], version=v),
            "per_param": lambda v: per_param.sync(sender, [worker], version=v),
            "object_store": lambda v: object_store.sync(sender, [worker], version=v),
            "raw_gloo": lambda v: ray.get([sender.raw_broadcast.remote(n_params), worker.raw_broadcast.remote(n_params)]),
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        transfer: dict[str, list[float]] = {"bucketed": [], "per_param": []}
        version = 1
        for _ in range(repeats):  # interleaved, so a load change on a shared machine hits every method alike
            for key, fn in methods.items():
                version += 1
                want = ray.get(sender.perturb.remote(version)) if key != "raw_gloo" else None
                start = time.perf_counter()
                report = fn(version)
                times[key].append(time.perf_counter() - start)
                if key in transfer:
                    transfer[key].append(report.sender["seconds"])
                if want is not None:
                    got = ray.get(worker.weights_checksum.remote())
                    if abs(got - want) > 1e-6 * max(1.0, abs(want)):
                        raise RuntimeError(f"{size} {key}: worker checksum {got} != sender {want}")
        for key in methods:
            rows[f"{key}_s"] = statistics.median(times[key])
        for key in transfer:
            rows[f"{key}_sender_s"] = statistics.median(transfer[key])
        rows["buckets"] = len(bucketed._meta)
        rows["tensors"] = sum(len(m["names"]) for m in bucketed._meta)
        for key in ("bucketed", "per_param", "object_store", "raw_gloo"):
            rows[f"{key}_GBps"] = nbytes / rows[f"{key}_s"] / 1e9
        rows["bucketed_vs_raw_bw"] = rows["bucketed_GBps"] / rows["raw_gloo_GBps"]
        rows["bucketed_speedup_vs_per_param"] = rows["per_param_s"] / rows["bucketed_s"]
        rows["bucketed_speedup_vs_object_store"] = rows["object_store_s"] / rows["bucketed_s"]
        rows["bucketed_transfer_speedup_vs_per_param"] = rows["per_param_sender_s"] / rows["bucketed_sender_s"]
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
        ray.kill(sender)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = (f"{'model':>6} {'params':>11} {'MB':>8} {'tensors':>7} {'buckets':>7} | {'bucketed':>14} "
            f"{'per-param':>14} {'object-store':>14} {'raw gloo':>14} | {'bkt/raw bw':>10} {'bkt vs pp':>9} {'send-only':>9}")
    print(head)
    print("-" * len(head))
    for size, r in results.items():
        def cell(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key + '_s']:.3f}s {r[key + '_GBps']:.2f}GB/s"

        print(f"{size:>6} {r['params']:>11,} {r['bytes'] / 2**20:>8.1f} {r['tensors']:>7} {r['buckets']:>7} | "
              f"{cell('bucketed'):>14} {cell('per_param'):>14} {cell('object_store'):>14} {cell('raw_gloo'):>14} | "
              f"{r['bucketed_vs_raw_bw']:>10.2f} {r['bucketed_speedup_vs_per_param']:>8.1f}x "
              f"{r['bucketed_transfer_speedup_vs_per_param']:>8.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1m,30m,300m", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=50.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown --sizes {unknown}; known: {sorted(SIZES)}")
    logging.basicConfig(level=logging.WARNING)
    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    import ray

    from actors.models import build_tiny_models

    tokenizer_dir = build_tiny_models().lm
    ray.init(num_cpus=4, include_dashboard=False)
    results: dict[str, dict[str, Any]] = {}
    try:
        for size in sizes:
            results[size] = bench_size(size, tokenizer_dir, args.repeats, args.bucket_mb)
            print(f"done {size}: {json.dumps({k: round(v, 4) for k, v in results[size].items()})}", flush=True)
    finally:
        ray.shutdown()
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bucket_mb": args.bucket_mb, "repeats": args.repeats, "results": results,
                               "receiver": "vLLM TextWorker (in-process engine) as a Ray actor",
                               "sender": "WeightSenderMixin on an HF model in a Ray actor"}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
