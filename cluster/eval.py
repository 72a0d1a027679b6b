"""Evaluation alone: `python -m cluster.eval --config FILE [--checkpoint DIR] [a.b=c ...]`.

Starts the rollout workers (each in its bundle of its role's placement group, as in training) and
the judge (no learners), loads the checkpoint's weights into the workers (or keeps the config's
models), runs deterministic multi-round R3 on the test prompts and writes `eval.json`, `eval.md`,
`trajectories.parquet` and `gallery.html` into `--out`.

`eval.json` also holds a `weights` section: the version every worker holds and, per worker, how
its engine's tensors compare with the checkpoint's files (`tensor_sums`, `compare_sums`), read after
the evaluation, so a reader can check that the workers really ran the checkpoint's weights. A worker
that dies is replaced (`cluster.pools`) by one that loads the checkpoint's weights before it serves
(`checkpoint_replace_hooks`); the section counts the replacements.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, load_config

__all__ = ["main", "evaluate_checkpoint", "load_checkpoint_weights", "checkpoint_replace_hooks", "tensor_sums",
           "files_tensor_sums", "compare_sums"]

log = logging.getLogger("r3rl.eval")

# Relative tolerance of a comparison of sums: the same float32 values, maybe added in another order.
SUMS_RTOL = 1e-6


def tensor_sums(named: Iterable[tuple[str, Any]]) -> dict[str, list[float]]:
    """name -> [sum, sum of squares] (float64) of every non-empty tensor: a cheap weights fingerprint.

    Zero padding does not change it (vLLM pads vocabulary rows); empty tensors are left out (vLLM's
    CPU backend moves linear weights into packed kernels and leaves empty parameters behind).
    """
    import torch

    out = {}
    for name, t in named:
        if t.numel():
            x = t.detach().to("cpu", torch.float64)
            out[name] = [float(x.sum()), float((x * x).sum())]
    return out


def files_tensor_sums(folder: Path) -> dict[str, list[float]]:
    """`tensor_sums` of every tensor in the `*.safetensors` files under `folder`."""
    from safetensors import safe_open

    files = sorted(Path(folder).rglob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files under {folder}")
    out: dict[str, list[float]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update(tensor_sums((key, st.get_tensor(key)) for key in st.keys()))
    return out


def compare_sums(engine: dict[str, list[float]], files: dict[str, list[float]],
                 rtol: float = SUMS_RTOL) -> dict[str, Any]:
    """Compare an engine's tensors with the files' tensors of the same name.

    Returns `compared` (names in both), `engine_only` (names the files lack: fused or renamed by the
    engine), `differing` (compared names whose sums differ beyond `rtol`) and `match` (at least one
    tensor compared and none differing).
    """
    both = sorted(set(engine) & set(files))
    differing = [n for n in both if any(abs(a - b) > rtol * max(abs(a), abs(b), 1e-12)
                                        for a, b in zip(engine[n], files[n], strict=True))]
    return {"compared": len(both), "engine_only": len(set(engine) - set(files)), "differing": differing,
            "match": bool(both) and not differing}


def _checkpoint_folders(checkpoint: Path, diffusion_weights: Path | None) -> tuple[int, str, str]:
    """(version, text weights folder, generator weights folder) of a checkpoint."""
    version = int(json.loads((checkpoint / "meta.json").read_text())["version"])
    return (version, str(checkpoint / "text_learner" / "weights"),
            str(diffusion_weights or checkpoint / "diffusion_learner" / "weights"))


def load_checkpoint_weights(text: Any, image: Any, checkpoint: Path, timeout: float,
                            diffusion_weights: Path | None = None) -> int:
    """Every text and diffusion worker loads the checkpoint's learner weights; returns their version.

    diffusion_weights: the generator's folder when not the learner's live weights (its EMA,
    `cluster.ema_eval.generator_eval_weights`)."""
    import ray

    version, text_folder, image_folder = _checkpoint_folders(checkpoint, diffusion_weights)
    ray.get([a.load_weights.remote(version, text_folder) for a in text.actors]
            + [a.load_weights.remote(version, image_folder) for a in image.actors], timeout=timeout)
    log.info("workers loaded weights version %d from %s", version, checkpoint)
    return version


def checkpoint_replace_hooks(checkpoint: Path, diffusion_weights: Path | None = None) -> dict[str, Any]:
    """`on_replace` hooks of the worker pools (`cluster.roles.build_worker_pools`): a worker started in
    place of a dead one loads the checkpoint's weights before it serves, as its pool-mates did (without
    them it would evaluate the config's base models)."""
    import ray

    version, text_folder, image_folder = _checkpoint_folders(checkpoint, diffusion_weights)

    def loader(folder: str) -> Any:
        def load(index: int, actor: Any) -> None:
            ray.get(actor.load_weights.remote(version, folder))
            log.info("replacement worker %d loaded weights version %d from %s", index, version, folder)
        return load

    return {"text_workers": loader(text_folder), "diffusion_workers": loader(image_folder)}


def evaluate_checkpoint(cfg: Any, checkpoint: Path | None, out: Path) -> Any:
    """Workers + judge, the checkpoint's weights in the workers, multi-round evaluation; writes `out`."""
    import ray

    from cluster.ema_eval import generator_eval_weights
    from cluster.gallery import write_gallery
    from cluster.pools import PoolGenerator, PoolReasoner
    from cluster.roles import (
        build_judge_client,
        build_worker_pools,
        place_roles,
        remove_placements,
        resolve_paths,
    )
    from cluster.settings import eval_settings, load_prompt_sets
    from rollout.evaluation import evaluate
    from rollout.trajectory import write_trajectories

    paths = resolve_paths(cfg)
    timeout = cfg.train.remote_timeout_s
    placements = place_roles(cfg, ("text_workers", "diffusion_workers"))
    text = image = judge = None
    generator_folder = generator_eval_weights(cfg, checkpoint) if checkpoint is not None else None
    try:
        hooks = checkpoint_replace_hooks(checkpoint, generator_folder) if checkpoint is not None else None
        text, image = build_worker_pools(cfg, paths, placements, on_replace=hooks)
        judge = build_judge_client(cfg, paths)
        weights: dict[str, Any] = {"checkpoint": str(checkpoint) if checkpoint else None}
        if checkpoint is not None:
            weights["version"] = load_checkpoint_weights(text, image, checkpoint, timeout, generator_folder)
            weights["diffusion_folder"] = str(generator_folder)
        _, test = load_prompt_sets(cfg)
        report = evaluate(test, PoolReasoner(text), PoolGenerator(image), judge, eval_settings(cfg))
        # after the evaluation: the workers that finished it, replacements included
        weights.update(_worker_weights(text, image, checkpoint, timeout, generator_folder))
        weights["replacements"] = {"text": text.replacements, "diffusion": image.replacements}
    finally:
        if judge is not None:
            judge.shutdown()
        for pool in (text, image):
            for a in pool.actors if pool is not None else []:
                ray.kill(a, no_restart=True)
        remove_placements(placements)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({**report.to_dict(), "weights": weights}, indent=2, sort_keys=True))
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

            checkpoint = resolve_resume(args.checkpoint, Path(cfg.train.run_dir), cfg.train.run_name)
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


# ------------------------------------------------------------------------------------ private


def _worker_weights(text: Any, image: Any, checkpoint: Path | None, timeout: float,
                    diffusion_folder: Path | None = None) -> dict[str, Any]:
    """Per role: every worker's weight version, and how its engine's tensors compare with the checkpoint's files."""
    import ray

    out: dict[str, Any] = {}
    for kind, pool, fn, sub in (("text", text, _text_engine_sums, "text_learner"),
                                ("diffusion", image, _diffusion_engine_sums, "diffusion_learner")):
        entry: dict[str, Any] = {"worker_versions": ray.get([a.version.remote() for a in pool.actors], timeout=timeout)}
        if checkpoint is not None:
            folder = diffusion_folder if kind == "diffusion" and diffusion_folder else checkpoint / sub / "weights"
            files = files_tensor_sums(folder)
            engines = ray.get([a.__ray_call__.remote(fn) for a in pool.actors], timeout=timeout)
            entry["workers"] = [compare_sums(e, files) for e in engines]
            entry["checkpoint_sum"] = sum(v[0] for v in files.values())
            if not all(w["match"] for w in entry["workers"]):
                log.warning("%s workers' weights differ from the checkpoint's: %s", kind, entry["workers"])
        out[kind] = entry
    return out


def _text_engine_sums(worker: Any) -> dict[str, list[float]]:
    """Runs inside a TextWorker actor: `tensor_sums` of the vLLM engine's parameters (first engine rank)."""
    return worker.llm.apply_model(lambda model: tensor_sums(model.named_parameters()))[0]


def _diffusion_engine_sums(worker: Any) -> dict[str, list[float]]:
    """Runs inside a DiffusionWorker actor: `tensor_sums` of the transformer's state dict."""
    return tensor_sums(worker.transformer.state_dict().items())


if __name__ == "__main__":
    sys.exit(main())
