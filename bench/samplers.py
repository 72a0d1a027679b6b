"""FlowGRPO SDE sampler (DiffusionWorker.sample, with log-probs) vs the plain diffusers pipeline.

Same model (the tiny FLUX.1-Kontext-style pipeline unless `--model`), same steps, batch, size and
text length. Rows: the plain `FluxKontextPipeline.__call__`; our loop as ODE without training
data ("ode"); our loop with the SDE at every step but the last, keeping latents, embeddings and
log-probs ("sde+logp", what rollouts run). Generate and edit. Times are medians of `--repeats`
calls after one warm-up, with the three variants interleaved so machine load hits them alike.
Both wall time and process CPU time are recorded: on a shared CPU machine the wall clock mostly
measures the neighbours, so the CPU-time ratio (with `--threads 1`) is the one to read there.
Target: sde+logp / pipeline <= 1.10.

Run: `python bench/samplers.py [--batches 4 16] [--steps 8] [--repeats 10] [--threads 1] [--device cpu]`.
Writes bench/results/samplers.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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

log = logging.getLogger("bench.samplers")
RESULTS = ROOT / "bench" / "results" / "samplers.json"
TARGET = 1.10


def _requests(batch: int, edit: bool, size: int, salt: int) -> list:
    import numpy as np

    from rollout.interfaces import ImageRequest

    rng = np.random.default_rng(salt)
    return [
        ImageRequest(
            prompt=f"{i % 5} red circles next to a blue square" if not edit else "make the square green",
            seed=salt * 100 + i,
            noise_seed=salt,
            source_image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if edit else None,
        )
        for i in range(batch)
    ]


def _pipeline_call(worker, requests, settings) -> None:
    import torch
    from PIL import Image

    gens = [torch.Generator().manual_seed(r.noise_seed) for r in requests]
    images = [Image.fromarray(r.source_image) for r in requests if r.source_image is not None]
    worker.pipe(
        prompt=[r.prompt for r in requests],
        image=images or None,
        height=settings.height,
        width=settings.width,
        max_area=settings.height * settings.width,
        _auto_resize=False,
        num_inference_steps=settings.num_steps,
        guidance_scale=settings.guidance,
        generator=gens,
        output_type="np",
        max_sequence_length=worker.max_sequence_length,
    )


def bench(worker, batches: list[int], steps: int, size: int, repeats: int) -> list[dict]:
    """Median seconds per call of each variant, for generate and edit at each batch size."""
    from rollout.interfaces import SamplerSettings

    sde = SamplerSettings(num_steps=steps, noise_level=0.7, stochastic="all", height=size, width=size)
    ode = dataclasses.replace(sde, noise_level=0.0, stochastic="none", keep_training_data=False)
    variants = {
        "pipeline": lambda reqs: _pipeline_call(worker, reqs, sde),
        "ode": lambda reqs: worker.sample(reqs, ode),
        "sde+logp": lambda reqs: worker.sample(reqs, sde),
    }
    rows = []
    for edit in (False, True):
        for batch in batches:
            reqs = _requests(batch, edit, size, salt=batch)
            for fn in variants.values():  # warm-up
                fn(reqs)
            wall: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(repeats):
                for name, fn in variants.items():
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fn(reqs)
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            med = {name: statistics.median(t) for name, t in wall.items()}
            med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
            for name in variants:
                rows.append({
                    "task": "edit" if edit else "generate", "batch": batch, "steps": steps, "size": size,
                    "variant": name, "call_s_median": med[name], "call_s_all": wall[name],
                    "cpu_s_median": med_cpu[name], "cpu_s_all": cpu[name],
                    "images_per_s": batch / med[name], "vs_pipeline": med[name] / med["pipeline"],
                    "cpu_vs_pipeline": med_cpu[name] / med_cpu["pipeline"],
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="FluxKontextPipeline folder (default: tiny)")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from actors.diffusion_worker import DiffusionWorker

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from actors.models import build_tiny_models

        model = build_tiny_models().flux
    worker = DiffusionWorker(str(model), device=args.device, dtype=args.dtype, name="bench-diffusion")
    try:
        rows = bench(worker, args.batches, args.steps, args.size, args.repeats)
        engine_start_s = worker.stats()["engine_start_s"]
    finally:
        worker.shutdown()

    header = f"{'task':<9}{'batch':>6}{'variant':>10}{'wall s':>9}{'img/s':>8}{'vs pipe':>9}{'cpu s':>8}{'cpu vs':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['task']:<9}{r['batch']:>6}{r['variant']:>10}{r['call_s_median']:>9.4f}"
            f"{r['images_per_s']:>8.1f}{r['vs_pipeline']:>9.3f}{r['cpu_s_median']:>8.4f}{r['cpu_vs_pipeline']:>8.3f}"
        )
    worst = max(r["vs_pipeline"] for r in rows if r["variant"] == "sde+logp")
    worst_cpu = max(r["cpu_vs_pipeline"] for r in rows if r["variant"] == "sde+logp")
    load = os.getloadavg()[0]
    lines.append(
        f"worst sde+logp / pipeline: wall {worst:.3f}, cpu {worst_cpu:.3f} (target <= {TARGET}); "
        f"engine start {engine_start_s:.2f} s; load average {load:.1f} on {os.cpu_count()} cores"
    )
    sys.stdout.write("\n".join(lines) + "\n")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    result = {
        "benchmark": "samplers",
        "model": str(model),
        "device": device_name,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "engine_start_s": engine_start_s,
        "target_ratio": TARGET,
        "load_average_1min": load,
        "worst_sde_logp_ratio_wall": worst,
        "worst_sde_logp_ratio_cpu": worst_cpu,
        "meets_target_wall": worst <= TARGET,
        "meets_target_cpu": worst_cpu <= TARGET,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
