"""Reflect training on the generator's own images, with the exact judge as the teacher:
`python -m cluster.shapes_selfreflect --out DIR [--prompts 600] [--steps 200] [--lr 1e-3]`.

The reasoner's warm start reads renders (clean or blurred); on the generator's own images its
reflect decision is little better than chance. This draws the warm-started generator's images for
training prompts (text-to-image, then one edit of each wrong one with the fix the judge reads off
it, as R3's rounds see both), labels each with the judge (`describe_detections` as the think; "no
further edit needed" if correct, else `reward.shapes_fixes.fixing_instruction`), and fine-tunes a
copy of the cached reasoner on balanced batches of them beside its plan and rendered-reflect
batches, so it keeps what it knew. It measures the reasoner on held-out generated images before
and after, and writes `DIR/vlm` and `DIR/own_reflect.json`.

An experiment, not a warm-start stage: on v8 it raised the balanced reflect accuracy on held-out
generated images from 0.56 to 0.67, but R3 RL from it ended lower than RL from the plain warm start
(README, ShapesWorld).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cluster.shapes_pretrain import PretrainSettings, RenderedPool

__all__ = [
    "OwnImages", "label_images", "draw_own_images", "finetune_on_own_images", "evaluate_on_own_images", "main",
]  # fmt: skip

logger = logging.getLogger(__name__)


@dataclass
class OwnImages:
    """Generated images with the judge's labels: `answers[k]` is the reflect answer for
    (`prompts[k]`, `images[k]`); `correct[k]` the judge's verdict; `fixes[k]` its instruction."""

    prompts: list[str]
    metas: list[dict[str, Any]]
    images: np.ndarray  # (N, H, W, 3) uint8
    correct: np.ndarray  # (N,) bool
    fixes: list[str | None]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def draw_own_images(flux: Path, metas: list[dict[str, Any]], s: PretrainSettings, seed: int) -> OwnImages:
    """Text-to-image (ODE, `s.num_steps`, true CFG `s.cfg_scale`) for every task in `metas`, then
    one edit of every wrong image with the judge's fix; all of them judged and labelled."""
    from actors.diffusion_worker import DiffusionWorker
    from cluster.shapes_probe import ode_settings
    from rollout.interfaces import ImageRequest

    settings = ode_settings(s.num_steps, s.guidance, s.cfg_scale, s.size)
    worker = DiffusionWorker(str(flux), seed=seed, max_sequence_length=s.max_sequence_length)
    try:
        reqs = [ImageRequest(m["prompt"], seed=seed + k, noise_seed=seed + k) for k, m in enumerate(metas)]
        first = label_images([x.image for x in worker.sample(reqs, settings)], metas)
        wrong = np.flatnonzero(~first.correct)
        edits = [
            ImageRequest(first.fixes[k], seed=seed + k, noise_seed=seed + k, source_image=first.images[k])
            for k in wrong
        ]
        second = label_images([x.image for x in worker.sample(edits, settings)], [metas[k] for k in wrong])
    finally:
        worker.shutdown()
    logger.info(
        "own images: text-to-image %d/%d correct; edits of the wrong ones with the judge's fix: %d/%d correct",
        int(first.correct.sum()), len(first), int(second.correct.sum()), len(second),
    )  # fmt: skip
    return _concat(first, second)


def finetune_on_own_images(
    vlm: Path, own: OwnImages, pool: RenderedPool, s: PretrainSettings, steps: int, lr: float, gen
) -> list[float]:
    """Fine-tune the reasoner in `vlm` (in place): each step a plan batch, a rendered-reflect
    batch (as in its warm start) and a balanced batch of own images (half judged correct)."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from cluster.shapes_reasoner import (
        ReasonerRecipe,
        _pad,
        _pixels,
        _plan_example,
        _prompt_ids,
        _ReflectData,
        _with_answer,
        fit_reasoner,
    )  # fmt: skip
    from rollout.templates import Templates

    if own.correct.all() or not own.correct.any():
        raise ValueError(f"own images: {int(own.correct.sum())} of {len(own)} correct; need both kinds")
    r = ReasonerRecipe()
    processor = AutoProcessor.from_pretrained(vlm)
    model = Idefics3ForConditionalGeneration.from_pretrained(vlm)
    rng = np.random.default_rng(s.seed + 30)
    rendered = _ReflectData(processor, pool, s.size, rng)
    plans = [_plan_example(processor, p, m) for p, m in zip(pool.prompts, pool.metas, strict=True)]
    templates, pad = Templates(), processor.tokenizer.pad_token_id
    by_verdict = {True: np.flatnonzero(own.correct), False: np.flatnonzero(~own.correct)}

    def batches() -> list[tuple[float, dict[str, Any]]]:
        half = r.reflect_batch // 2
        picks = [
            int(by_verdict[ok][int(j)])
            for ok in (True, False)
            for j in torch.randint(0, len(by_verdict[ok]), (half,), generator=gen)
        ]
        images = own.images[picks]
        examples = [
            _with_answer(
                processor, _prompt_ids(processor, templates.reflect_messages(own.prompts[k], im)), own.answers[k],
                r.decision_weight,
            )  # fmt: skip
            for k, im in zip(picks, images, strict=True)
        ]
        batch = _pad(examples, pad)
        batch["pixel_values"], batch["pixel_attention_mask"] = _pixels(processor, list(images))
        plan_idx = torch.randint(0, len(plans), (r.plan_batch,), generator=gen).tolist()
        plans_batch = _pad([plans[i] for i in plan_idx], pad)
        return [(1.0, batch), (1.0, rendered.batch(r, gen)), (r.plan_weight, plans_batch)]

    losses = fit_reasoner(model, batches, steps, lr, "own-image reflect")
    model.save_pretrained(vlm)
    processor.save_pretrained(vlm)
    return losses


def evaluate_on_own_images(vlm: Path, own: OwnImages) -> dict[str, Any]:
    """Greedy reflect answers on judged generated images: stop when correct, edit when wrong,
    their mean (the balanced reflect accuracy), the judge's fix named exactly, caption exact."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from cluster.shapes_reasoner import _greedy_answerer
    from rollout.parsing import is_stop, parse_answer
    from rollout.templates import Templates

    processor = AutoProcessor.from_pretrained(vlm)
    model = Idefics3ForConditionalGeneration.from_pretrained(vlm).eval()
    answer, t = _greedy_answerer(processor, model), Templates()
    stop, exact, caption = [], [], []
    for k in range(len(own)):
        got = parse_answer(answer(t.reflect_messages(own.prompts[k], own.images[k])))
        want = parse_answer(own.answers[k])
        stop.append(is_stop(got.answer))
        exact.append(got.answer == want.answer)
        caption.append(got.think == want.think)
    stop_arr = np.array(stop)
    when_correct = float(stop_arr[own.correct].mean()) if own.correct.any() else float("nan")
    when_wrong = float((~stop_arr[~own.correct]).mean()) if (~own.correct).any() else float("nan")
    return {
        "stop_when_correct": when_correct,
        "edit_when_wrong": when_wrong,
        "balanced_reflect_accuracy": (when_correct + when_wrong) / 2,
        "fix_exact_when_wrong": float(np.array(exact)[~own.correct].mean())
        if (~own.correct).any()
        else float("nan"),
        "caption_exact": float(np.mean(caption)),
        "n": len(own),
        "n_correct": int(own.correct.sum()),
    }


def label_images(images: list[np.ndarray], metas: list[dict[str, Any]]) -> OwnImages:
    """Judge each image against its task; its reflect answer is what the judge sees, then the stop
    phrase or the judge's fix."""
    from cluster.shapes_reasoner import describe_detections, reflect_answer
    from reward.shapes_fixes import fixing_instruction
    from reward.shapes_judge import ShapesJudge

    judge = ShapesJudge()
    dets = [judge.detect(im) for im in images]
    fixes = [fixing_instruction(m, d) for m, d in zip(metas, dets, strict=True)]
    return OwnImages(
        prompts=[m["prompt"] for m in metas],
        metas=list(metas),
        images=np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8),
        correct=np.array([f is None for f in fixes], dtype=bool),
        fixes=fixes,
        answers=[
            reflect_answer(describe_detections(d, m), f) for m, d, f in zip(metas, dets, fixes, strict=True)
        ],
    )


def _concat(a: OwnImages, b: OwnImages) -> OwnImages:
    if not len(b):
        return a
    return OwnImages(
        prompts=a.prompts + b.prompts,
        metas=a.metas + b.metas,
        images=np.concatenate([a.images, b.images]),
        correct=np.concatenate([a.correct, b.correct]),
        fixes=a.fixes + b.fixes,
        answers=a.answers + b.answers,
    )


def main(argv: list[str] | None = None) -> int:
    import torch

    from cluster.shapes_models import shapes_model_path
    from cluster.shapes_pretrain import PretrainSettings, make_pool
    from rollout.shapesworld.tasks import build_splits, sample_tasks

    ap = argparse.ArgumentParser(prog="python -m cluster.shapes_selfreflect", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the fine-tuned reasoner and the measures")
    ap.add_argument("--prompts", type=int, default=600, help="train prompts drawn (tag-balanced)")
    ap.add_argument("--eval-prompts", type=int, default=150, help="held-out prompts drawn for the measures")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache", type=Path, default=None, help="cache root of the warm start")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for name in ("prompts", "eval_prompts", "steps"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; allowed: >= 1")
        flux, vlm = (shapes_model_path(n, args.cache) for n in ("shapes-flux", "shapes-vlm"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s, splits = PretrainSettings(), build_splits(seed=0)
    own = draw_own_images(flux, sample_tasks(splits.train, args.prompts, np.random.default_rng(7)), s, seed=1000)
    held_out = draw_own_images(flux, sample_tasks(splits.test, args.eval_prompts, np.random.default_rng(8)), s, seed=5000)
    out = args.out / "vlm"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(vlm, out)
    result = {"before": evaluate_on_own_images(out, held_out)}
    pool = make_pool(splits.train, s.pool, seed=s.seed, size=s.size, layout=s.layout)
    losses = finetune_on_own_images(out, own, pool, s, args.steps, args.lr, torch.Generator().manual_seed(5))
    result.update(after=evaluate_on_own_images(out, held_out), losses=losses, settings=vars(args) | {"out": str(args.out)})
    (args.out / "own_reflect.json").write_text(json.dumps(result, indent=1, default=str))
    sys.stdout.write(json.dumps({k: result[k] for k in ("before", "after")}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
