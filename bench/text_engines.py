"""vLLM throughput of the reasoner engine (TextWorker) on the tiny LM and VLM at batch 1, 8, 32.

Each batch is one `TextWorker.generate` call (one engine call) of `batch` requests with n=1,
temperature 1 and `--max-tokens` tokens at most; the VLM requests carry one fresh 84x84 image
each (20 image tokens), so no cache hit flatters it. Reports generated tokens per second (median
of `--repeats` calls after one warm-up call) and the engine start time.

Run: `python bench/text_engines.py [--batches 1 8 32] [--repeats 3] [--max-tokens 64]`.
Writes bench/results/text_engines.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (`make bench`): make the project importable
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

log = logging.getLogger("bench.text_engines")
RESULTS = ROOT / "bench" / "results" / "text_engines.json"


def _requests(batch: int, with_image: bool, max_tokens: int, salt: int) -> list:
    import numpy as np

    from rollout.interfaces import ChatMessage, TextRequest

    out = []
    for i in range(batch):
        images = ()
        if with_image:
            rng = np.random.default_rng(salt * 1000 + i)
            images = (rng.integers(0, 256, (84, 84, 3), dtype=np.uint8),)
        text = f"Plan an image of {i % 10} red circles next to a blue square."
        out.append(TextRequest(messages=(ChatMessage("user", text, images),), n=1, temperature=1.0,
                               max_tokens=max_tokens, seed=salt * 1000 + i))
    return out


def bench_model(kind: str, model_path: str, batches: list[int], repeats: int,
                max_tokens: int) -> list[dict]:
    """Start one TextWorker, time generate at each batch size, shut it down."""
    from actors.text_worker import TextWorker

    worker = TextWorker(model_path, max_model_len=1024, worker_extension_cls=None,
                        name=f"bench-{kind}")
    rows = []
    try:
        with_image = kind == "vlm"
        worker.generate(_requests(2, with_image, max_tokens, salt=0))  # warm-up
        salt = 1
        for batch in batches:
            rates, tokens, seconds = [], [], []
            for _ in range(repeats):
                requests = _requests(batch, with_image, max_tokens, salt)
                salt += 1
                start = time.perf_counter()
                results = worker.generate(requests)
                elapsed = time.perf_counter() - start
                generated = sum(len(s.answer_ids) for r in results for s in r)
                rates.append(generated / elapsed)
                tokens.append(generated)
                seconds.append(elapsed)
            rows.append({
                "model": kind, "batch": batch, "max_tokens": max_tokens, "repeats": repeats,
                "tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates,
                "generated_tokens_mean": statistics.mean(tokens), "call_s_median": statistics.median(seconds),
                "prompt_tokens": len(results[0][0].prompt_ids), "engine_start_s": worker.engine_start_s,
            })
            log.info("%s batch %d: %.0f tokens/s", kind, batch, rows[-1]["tokens_per_s"])
    finally:
        worker.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("vllm", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import platform

    import torch

    from actors.models import build_tiny_models

    load_start = os.getloadavg()[0]  # other jobs on the machine skew the numbers: recorded
    models = build_tiny_models()
    rows = []
    for kind, path in (("lm", models.lm), ("vlm", models.vlm)):
        rows += bench_model(kind, str(path), args.batches, args.repeats, args.max_tokens)

    header = f"{'model':<6}{'batch':>6}{'prompt tok':>12}{'gen tok':>10}{'call s':>9}{'tokens/s':>11}{'start s':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<6}{r['batch']:>6}{r['prompt_tokens']:>12}{r['generated_tokens_mean']:>10.0f}"
                     f"{r['call_s_median']:>9.3f}{r['tokens_per_s']:>11.0f}{r['engine_start_s']:>9.1f}")
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_1m_start_end": [load_start, os.getloadavg()[0]]}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
