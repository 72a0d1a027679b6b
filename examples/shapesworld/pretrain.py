"""Supervised ShapesWorld warm start: `python -m examples.shapesworld.pretrain [--out DIR] [--seed 0] [--scale 1.0]`.

Trains, on rendered ShapesWorld data (train split only; canonical layout by default: one image
per prompt, see `examples.shapesworld.render.canonical_objects`), on the CPU:
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
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from examples.shapesworld.models import MODEL_FOLDERS, WARM_START, adaln_zero_, build_shapes_flux
from examples.shapesworld.recipe import (
    PretrainSettings,
    RenderedPool,
    degrade_images,
    make_pool,
    sample_sigmas,
    warmup_cosine,
)
from examples.shapesworld.tasks import build_splits

__all__ = ["foreground_weight", "train_vae", "train_flow", "pretrain", "main"]

logger = logging.getLogger(__name__)


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def foreground_weight(x, fg_weight: float, margin: int):
    """Per-pixel weight (B, 1, H, W) of the VAE loss: 1 + `fg_weight` on object pixels (far from
    the border's median colour) and on the `margin` pixels around them. Without the margin,
    painting background pixels in the object's colour was cheap and the decoder learnt bloated,
    rounded shapes (v7: squares merged, diamonds judged circles; held-out reconstruction accuracy
    79 % at 700 steps, 100 % with margin 1 or 2)."""
    import torch

    border = torch.cat([x[:, :, 0], x[:, :, -1]], 2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    mask = ((x - border).abs().amax(1, keepdim=True) > 0.15).float()
    if margin:
        mask = torch.nn.functional.max_pool2d(mask, 2 * margin + 1, stride=1, padding=margin)
    return 1 + fg_weight * mask


def train_vae(
    vae,
    pool: RenderedPool,
    steps: int,
    batch: int,
    lr: float,
    gen,
    fg_weight: float = 10.0,
    crop: int = 32,
    fg_margin: int = 2,
) -> list[float]:
    """Autoencoder training on all rendered images, on random `crop`-px crops (the VAE is
    convolutional, so a quarter of the pixels costs a quarter of the time): MSE + L1 (L1 keeps
    shape edges sharp) of decode(mean latent + small noise), so the decoder tolerates the flow
    model's imperfect latents, weighted by `foreground_weight` (unweighted, objects came out as
    colourless blobs); a light L2 bounds latents."""
    import torch

    images = np.concatenate([pool.correct, pool.wrong])
    size = images.shape[1]
    if crop > size or crop % 8:
        raise ValueError(f"crop={crop}; allowed: a multiple of 8 up to the image size {size}")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    losses = []
    vae.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
        weight = foreground_weight(x, fg_weight, fg_margin)
        oy, ox = (int(v) * 8 for v in torch.randint(0, (size - crop) // 8 + 1, (2,), generator=gen))
        x, weight = x[:, :, oy : oy + crop, ox : ox + crop], weight[:, :, oy : oy + crop, ox : ox + crop]
        z = vae.encode(x).latent_dist.mean
        z_noisy = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=gen)
        err = vae.decode(z_noisy).sample - x
        loss = (weight * (err.pow(2) + 0.5 * err.abs())).mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        _progress("vae", len(losses), steps, losses)
    vae.eval()
    with torch.no_grad():
        z = vae.encode(_to_tensor(images[:256])).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return losses


def _latents(pipe, images: np.ndarray, chunk: int = 128):
    """Packed scaled latents (N, L, 64) as the Kontext pipeline computes them (mean of q(z|x))."""
    import torch

    from rollout.flux_forward import pack_latents

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            z = vae.encode(_to_tensor(images[i : i + chunk])).latent_dist.mean
            out.append(pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor))
    return torch.cat(out)


def train_flow(
    pipe, pool: RenderedPool, s: PretrainSettings, gen, before_step: Callable[[int], None] | None = None
) -> list[float]:
    """Flow matching of transformer + text encoders (σ from `s.flow_sigma`, guidance input ~
    U(1, 5)); `before_step(i)` runs before step i (the parallel reasoner's thread handoff)."""
    import torch

    from rollout.flux_forward import flux_velocity

    params = [p for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
    steps = s.steps("flow_steps")
    opt = torch.optim.AdamW(params, lr=s.flow_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.train()
    pipe.vae.requires_grad_(False)
    degraded = degrade_images(pool.wrong, np.random.default_rng(s.seed + 3), 1.0)
    lat_correct, lat_wrong, lat_fixed, lat_degraded = (
        _latents(pipe, a) for a in (pool.correct, pool.wrong, pool.fixed, degraded)
    )
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        idx = torch.randint(0, len(pool.prompts), (s.batch,), generator=gen).numpy()
        edit = bool(torch.rand((), generator=gen) < s.edit_fraction)
        x0 = (lat_fixed if edit else lat_correct)[idx]
        source = None
        if edit:
            use_degraded = torch.rand(s.batch, generator=gen) < s.degraded_source_fraction
            source = torch.where(use_degraded[:, None, None], lat_degraded[idx], lat_wrong[idx])
        texts = [(pool.instructions if edit else pool.prompts)[i] for i in idx]
        drop = (torch.rand(s.batch, generator=gen) < s.uncond_fraction).tolist()
        texts = ["" if d else t for t, d in zip(texts, drop, strict=True)]
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=texts, prompt_2=None, device="cpu", max_sequence_length=s.max_sequence_length
        )
        sigma = sample_sigmas(s.flow_sigma, s.batch, gen)  # (B,)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        guidance = 1.0 + 4.0 * torch.rand(s.batch, generator=gen)
        v = flux_velocity(
            pipe.transformer, x_t, sigma, embeds, pooled, guidance, s.size, s.size, source,
            vae_scale_factor=pipe.vae_scale_factor,
        )  # fmt: skip
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        _progress("flow", len(losses), steps, losses)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
    return losses


def vae_recon_accuracy(vae, tasks: list[dict[str, Any]], s: PretrainSettings) -> float:
    """Judge accuracy of decode(encode(x)) on held-out correct renders: the generator's ceiling."""
    import torch

    from examples.shapesworld.judge import ShapesJudge
    from rollout.interfaces import JudgeItem

    pool = make_pool(tasks, s.eval_prompts, seed=s.seed + 30_000, size=s.size, layout=s.layout)
    with torch.no_grad():
        rec = vae.decode(vae.encode(_to_tensor(pool.correct)).latent_dist.mean).sample
    images = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    res = ShapesJudge().score(
        [JudgeItem(im, p, m) for im, p, m in zip(images, pool.prompts, pool.metas, strict=True)]
    )
    return float(np.mean([r.correct for r in res]))


def evaluate_generator(path: Path, tasks: list[dict[str, Any]], s: PretrainSettings) -> dict[str, Any]:
    """Held-out judge accuracy of the saved pipeline through the real `DiffusionWorker` (ODE):
    text-to-image per tag, and edits of wrong renders with their fixing instructions
    (`examples.shapesworld.probe.probe_generator` on this one variant)."""
    from examples.shapesworld.probe import probe_generator

    pool = make_pool(tasks, s.eval_prompts, seed=s.seed + 10_000, size=s.size, layout=s.layout)
    r = probe_generator(
        path, {"warm start": None}, {"t2i": pool.metas}, edits=pool, num_steps=s.num_steps, guidance=s.guidance,
        cfg_scale=s.cfg_scale, size=s.size, max_sequence_length=s.max_sequence_length,
    )["warm start"]  # fmt: skip
    return {
        "t2i_accuracy": r["t2i"]["accuracy"],
        "t2i_score": r["t2i"]["score"],
        "t2i_accuracy_by_tag": r["t2i"]["accuracy_by_tag"],
        "edit_accuracy": r["edit"]["accuracy"],
        "edit_score": r["edit"]["score"],
        "n": len(pool.prompts),
    }


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
        manifest["files"] = {
            f.relative_to(tmp).as_posix(): _sha256(f)
            for part in MODEL_FOLDERS
            for f in sorted((tmp / part).rglob("*"))
            if f.is_file()
        }
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
            name: _summary(v)
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


def _progress(name: str, step: int, steps: int, losses: list[float]) -> None:
    if step % max(1, steps // 10) == 0 or step == steps:
        logger.info(
            "%s step %d/%d loss %.4f", name, step, steps, float(np.mean(losses[-max(1, steps // 10) :]))
        )


def _summary(losses: list[float]) -> dict[str, float]:
    if not losses:  # a skipped stage
        return {"steps": 0}
    k = max(1, len(losses) // 10)
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "steps": len(losses)}


def _sha256(path: Path) -> str:
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
