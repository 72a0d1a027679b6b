"""Evaluation alone: `python -m cluster.eval --config FILE [--checkpoint DIR] [a.b=c ...]`.

Starts the rollout workers and the judge (no learners), loads the checkpoint's weights into the
workers (or keeps the config's models), runs deterministic multi-round R3 on the test prompts and
writes `eval.json`, `eval.md`, `trajectories.parquet` and `gallery.html` into `--out`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.config import ConfigError, load_config

log = logging.getLogger("r3rl.eval")


def evaluate_checkpoint(cfg, checkpoint: Path | None, out: Path):
    import ray

    from actors.diffusion_worker import remote_diffusion_worker
    from actors.text_worker import remote_text_worker
    from cluster.gallery import write_gallery
    from cluster.pools import PoolGenerator, PoolReasoner, WorkerPool
    from cluster.roles import build_judge_client, resolve_paths
    from cluster.settings import eval_settings, load_prompt_sets
    from rollout.evaluation import evaluate
    from rollout.trajectory import write_trajectories

    paths = resolve_paths(cfg)
    c, timeout = cfg.cluster, cfg.train.remote_timeout_s
    text = WorkerPool("text_workers", lambda i: remote_text_worker(
        i, c.text_workers.num_cpus, c.text_workers.num_gpus, model_path=paths.reasoner,
        max_model_len=cfg.models.reasoner.max_model_len, dtype=cfg.models.reasoner.dtype, seed=cfg.train.seed),
        c.text_workers.count, timeout_s=timeout, retries=cfg.train.retries)
    image = WorkerPool("diffusion_workers", lambda i: remote_diffusion_worker(
        i, c.diffusion_workers.num_cpus, c.diffusion_workers.num_gpus, model_path=paths.generator,
        dtype=cfg.models.generator.dtype, seed=cfg.train.seed),
        c.diffusion_workers.count, timeout_s=timeout, retries=cfg.train.retries)
    judge = build_judge_client(cfg, paths)
    try:
        if checkpoint is not None:
            import json

            version = int(json.loads((checkpoint / "meta.json").read_text())["version"])
            ray.get([a.load_weights.remote(version, str(checkpoint / "text_learner" / "weights")) for a in text.actors]
                    + [a.load_weights.remote(version, str(checkpoint / "diffusion_learner" / "weights"))
                       for a in image.actors], timeout=timeout)
            log.info("workers loaded weights version %d from %s", version, checkpoint)
        _, test = load_prompt_sets(cfg)
        report = evaluate(test, PoolReasoner(text), PoolGenerator(image), judge, eval_settings(cfg))
    finally:
        judge.shutdown()
        for pool in (text, image):
            for a in pool.actors:
                ray.kill(a, no_restart=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(report.to_json())
    (out / "eval.md").write_text(report.to_markdown())
    write_trajectories(out / "trajectories.parquet", report.trajectories)
    write_gallery(out / "gallery.html", report.trajectories, title=f"R3RL evaluation ({checkpoint or 'base models'})")
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m cluster.eval", description=__doc__)
    ap.add_argument("--config", default="configs/cpu_tiny.yaml")
    ap.add_argument("--checkpoint", default=None, help="a complete checkpoint folder (default: the config's models)")
    ap.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval or runs/eval)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, check_paths=True)
        checkpoint = None
        if args.checkpoint is not None:
            from cluster.checkpoint import resolve_resume

            checkpoint = resolve_resume(args.checkpoint, Path(cfg.train.run_dir))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (checkpoint / "eval" if checkpoint else Path(cfg.train.run_dir) / "eval")
    from cluster.session import connect_ray

    started = connect_ray(cfg)
    try:
        report = evaluate_checkpoint(cfg, checkpoint, out)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(report.to_markdown())
    print(f"evaluation written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
