"""Supervised ShapesWorld warm start: `python -m examples.shapesworld.pretrain [--out DIR] [--seed 0] [--scale 1.0]`.

Trains, on rendered ShapesWorld data (train split only; canonical layout by default: one image
per prompt, see `examples.shapesworld.layout.canonical_objects`), on the CPU:
1. the generator's VAE as an autoencoder (a random VAE cannot draw anything), then sets its
   latent shift/scale so scaled latents have mean 0 and std 1;
2. the generator's transformer and text encoders with the flow-matching loss
   (docs/design.md#sampling-convention: x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0; σ uniform), on
   text-to-image batches (prompt → correct render) and edit batches (wrong render + fixing
   instruction → the fixed render; half of the sources degraded like generated images, which are
   what RL edits), in two stages: the second restarts the optimizer and its schedule from the first one's weights;
3. the reasoner (Idefics3 VLM) on plan answers and reflect answers (`examples.shapesworld.reasoner`),
   in a child process on half of the threads beside 1. and the start of 2. (`parallel_reasoner`);
4. the reasoner again, on the finished generator's own images of train-split prompts labelled by
   the exact judge (`examples.shapesworld.own_images`), beside its rendered data.

The step counts stop deliberately early (the RL run is meant to improve on it). Everything is
seeded: the same seed and settings give the same weights. The result is saved in HF/diffusers
format to `DIR/{flux,vlm}` (default: the warm start that ships in `examples/shapesworld/warmstart`,
which the configs name `tiny:shapes-flux` and `tiny:shapes-vlm`) with `DIR/manifest.json`: the
command, seed and settings, the sha256 of every model file, losses, wall times and held-out
judge accuracies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from examples.shapesworld.generator_sft import (
    evaluate_generator,
    train_flow,
    train_vae,
    vae_recon_accuracy,
)
from examples.shapesworld.models import MODEL_FOLDERS, WARM_START, adaln_zero_, build_shapes_flux
from examples.shapesworld.recipe import (
    PretrainSettings,
    RenderedPool,
    make_pool,
)
from examples.shapesworld.tasks import build_splits

__all__ = ["pretrain", "file_sha256", "model_file_hashes", "loss_summary", "main"]

logger = logging.getLogger(__name__)


def pretrain(s: PretrainSettings, out: Path = WARM_START, force: bool = False, command: str | None = None) -> Path:
    """Run the whole warm start into `out` (`flux/`, `vlm/`, `manifest.json`) and return `out`.

    A finished warm start in `out` (its manifest exists) is kept unless `force`. The models are
    built in a temp folder beside `out` and moved in; the manifest, written last, records
    `command` (the command line that built it), the seed and settings, the sha256 of every file
    under `flux/` and `vlm/`, losses, wall times and the held-out accuracies. Other files in `out`
    are left alone.
    """
    out = Path(out)
    if (out / "manifest.json").is_file() and not force:
        logger.info("warm start already in %s (--force rebuilds it)", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = {"command": command, **_train(tmp, s)}
        manifest["files"] = model_file_hashes(tmp)
        (out / "manifest.json").unlink(missing_ok=True)  # incomplete until the new one is in place
        for part in MODEL_FOLDERS:
            if (out / part).exists():
                shutil.rmtree(out / part)
            os.rename(tmp / part, out / part)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("warm start saved to %s", out)
    return out


def _train(tmp: Path, s: PretrainSettings) -> dict[str, Any]:
    """Train and measure every model into `tmp/flux` and `tmp/vlm`; the manifest's measurements."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    times: dict[str, float] = {}
    t = time.perf_counter()
    splits = build_splits(seed=0)
    pool = make_pool(splits.train, s.steps("pool"), seed=s.seed, size=s.size, layout=s.layout)
    times["render_s"] = time.perf_counter() - t

    reasoner = _ReasonerStage(tmp / "vlm", pool, splits.test, s)
    try:
        t = time.perf_counter()
        pipe = build_shapes_flux(seed=s.seed)
        if s.flow_adaln_zero:
            adaln_zero_(pipe.transformer)
        vae_losses = train_vae(
            pipe.vae,
            pool,
            s.steps("vae_steps"),
            s.vae_batch,
            s.vae_lr,
            gen,
            s.vae_foreground_weight,
            s.vae_crop,
            s.vae_foreground_margin,
        )
        times["vae_s"] = time.perf_counter() - t
        recon = vae_recon_accuracy(pipe.vae, splits.test, s)
        logger.info("VAE reconstruction judge accuracy on held-out renders: %.3f", recon)
        t = time.perf_counter()
        flow_losses = train_flow(pipe, pool, s, gen, before_step=reasoner.handoff)
        if s.flow_continue_steps:
            second = replace(s, flow_steps=s.flow_continue_steps, flow_lr=s.flow_continue_lr, seed=s.seed + 1)
            flow_losses += train_flow(pipe, pool, second, torch.Generator().manual_seed(s.seed + 1))
        times["flow_s"] = time.perf_counter() - t
        pipe.to(dtype=getattr(torch, s.storage_dtype)).save_pretrained(str(tmp / "flux"), safe_serialization=True)
        t = time.perf_counter()
        gen_eval = evaluate_generator(tmp / "flux", splits.test, s)
        times["generator_eval_s"] = time.perf_counter() - t
        reasoner_result = reasoner.result()
    finally:
        reasoner.stop()
    times.update(reasoner_result["times"])
    reasoner_losses, reasoner_eval = reasoner_result["losses"], reasoner_result["eval"]
    from examples.shapesworld.own_images import own_images_stage

    own = own_images_stage(tmp / "flux", tmp / "vlm", pool, splits, s)
    times.update(own["times"])
    times["total_s"] = time.perf_counter() - start  # wall time; the stages above overlap
    return {
        "seed": s.seed,
        "settings": asdict(s),
        "threads": torch.get_num_threads(),
        "reasoner_threads": reasoner_result["threads"],
        "times": {k: round(v, 1) for k, v in times.items()},
        "losses": {
            name: loss_summary(v)
            for name, v in (
                ("vae", vae_losses), ("flow", flow_losses), ("reasoner", reasoner_losses),
                ("reasoner_own_images", own["losses"]),
            )
        },  # fmt: skip
        "vae_recon_accuracy": recon,
        "generator_eval": gen_eval,
        "reasoner_eval_rendered_stage": reasoner_eval,
        "reasoner_own_images": own["result"],
        "reasoner_eval": own["rendered_eval"] or reasoner_eval,
    }


class _ReasonerStage:
    """The reasoner's training and evaluation (`examples.shapesworld.reasoner`), which need nothing from
    the generator: with `s.parallel_reasoner` and >= 2 threads, a spawned child process on half of
    the threads from construction on; `handoff(step)`, called before each flow step, waits for it
    at step `flow_steps_beside_reasoner` and gives this process every thread again. Otherwise
    `result()` runs it here, after the generator."""

    def __init__(self, out: Path, pool: RenderedPool, test_tasks: list[dict[str, Any]], s: PretrainSettings) -> None:
        import torch

        self._args = (out, pool, test_tasks, s)
        self._threads = torch.get_num_threads()
        self._result_file = out.parent / "reasoner.json"
        self._handoff_step = s.steps("flow_steps_beside_reasoner")
        self._proc = None
        self._done = False
        self.wait_s = 0.0  # how long the generator stages waited for the child
        if s.parallel_reasoner and self._threads >= 2:
            child_threads = self._threads // 2
            self._proc = multiprocessing.get_context("spawn").Process(
                target=_reasoner_job,
                args=(*self._args, child_threads, self._result_file, logging.getLogger().level),
                name="shapes-reasoner",
            )
            self._proc.start()
            torch.set_num_threads(self._threads - child_threads)
            logger.info(
                "reasoner stage runs in process %d on %d of %d threads", self._proc.pid, child_threads, self._threads
            )

    def handoff(self, step: int) -> None:
        if self._proc is None or self._done or step < self._handoff_step:
            return
        import torch

        t = time.perf_counter()
        self._proc.join()
        self._done = True
        self.wait_s = time.perf_counter() - t
        logger.info("flow step %d: waited %.1f s for the reasoner stage", step, self.wait_s)
        if self._proc.exitcode != 0:
            raise RuntimeError(
                f"the reasoner stage (child process {self._proc.pid}) failed with exit code "
                f"{self._proc.exitcode}; its traceback is in the log above"
            )
        torch.set_num_threads(self._threads)

    def result(self) -> dict[str, Any]:
        if self._proc is None:
            _reasoner_job(*self._args, self._threads, self._result_file, None)
        else:
            self.handoff(self._handoff_step)  # the flow stage may have had fewer steps
        result = json.loads(self._result_file.read_text())
        self._result_file.unlink()
        result["times"]["reasoner_wait_s"] = round(self.wait_s, 1)
        return result

    def stop(self) -> None:
        """Ends a still-running child (this process failed) so that nothing is left behind."""
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()


def _reasoner_job(
    out: Path, pool: RenderedPool, test_tasks: list[dict[str, Any]], s: PretrainSettings, threads: int,
    result_file: Path, log_level: int | None,
) -> None:  # fmt: skip
    """Train + evaluate the reasoner on `threads` threads; write losses, measurements and times."""
    import torch

    from examples.shapesworld.reasoner import evaluate_reasoner, train_reasoner

    if log_level is not None:  # a spawned child starts with logging unconfigured
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    torch.manual_seed(s.seed + 1)
    t = time.perf_counter()
    losses = train_reasoner(out, pool, s, torch.Generator().manual_seed(s.seed + 1))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    measured = evaluate_reasoner(out, test_tasks, s)
    times = {"reasoner_s": round(train_s, 1), "reasoner_eval_s": round(time.perf_counter() - t, 1)}
    result_file.write_text(json.dumps({"losses": losses, "eval": measured, "times": times, "threads": threads}))


def model_file_hashes(root: Path) -> dict[str, str]:
    """`flux/...` and `vlm/...` path under `root` -> sha256, for a warm start's manifest."""
    return {f.relative_to(root).as_posix(): file_sha256(f)
            for part in MODEL_FOLDERS for f in sorted((root / part).rglob("*")) if f.is_file()}  # fmt: skip


def loss_summary(losses: list[float]) -> dict[str, float]:
    """Mean of the first and of the last tenth of a stage's losses, and its step count."""
    if not losses:  # a skipped stage
        return {"steps": 0}
    k = max(1, len(losses) // 10)
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "steps": len(losses)}


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks (manifests record one per model file)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.shapesworld.pretrain", description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, default=WARM_START, help=f"output folder (default: the shipped warm start, {WARM_START})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (and the data pool)")
    p.add_argument("--force", action="store_true", help="retrain even if a finished warm start exists")
    p.add_argument(
        "--eval-prompts", type=int, default=PretrainSettings.eval_prompts, help="held-out prompts measured"
    )
    args = p.parse_args(argv)
    if args.scale <= 0:
        raise ValueError(f"--scale={args.scale}; allowed: > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    settings = PretrainSettings(seed=args.seed, scale=args.scale, eval_prompts=args.eval_prompts)
    given = sys.argv[1:] if argv is None else list(argv)
    out = pretrain(settings, args.out, args.force, command=shlex.join([*p.prog.split(), *given]))
    manifest = json.loads((out / "manifest.json").read_text())
    sys.stdout.write(
        json.dumps({k: manifest[k] for k in ("times", "generator_eval", "reasoner_eval", "reasoner_own_images")}, indent=1) + "\n"
    )
    logger.info("total %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
