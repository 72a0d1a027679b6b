"""The reasoner's second warm-start stage: reflect on the generator's own images, with the exact
judge as the teacher.

The first stage (`examples.shapesworld.reasoner`) teaches reflection on rendered images, clean or
blurred. The generator's images are different: soft edges, shapes half-way between two, colours
between palette entries, and mostly a *wrong shape* where the prompt asked for another (about
70 % of the wrong images need a "change" fix). On them the rendered-only reasoner misreads the
scene and then asks for the wrong fix or none. After RL it said "add ..." on every wrong image
of the evaluation and named the judge's fix on under 3 % of them. RL cannot teach an answer the
policy never samples.

This stage draws images with the trained generator (ODE, as the evaluation draws them) on the
train split's prompts. The exact judge reads each image: its detections become the think ("what
the image shows", `describe_objects`'s phrasing) and `fixes.fixing_instruction` the answer (the
stop phrase on a correct image). The reasoner is then fine-tuned on balanced batches of these
(half correct, half wrong images) beside the first stage's rendered reflect batches and plan
batches, so it keeps what it learnt there. A real system's reasoner gets such data from a teacher
model; here the judge is that teacher, and only train-split prompts are drawn.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from examples.shapesworld.reasoner import (
    ReasonerRecipe,
    RenderedReflectData,
    describe_objects,
    evaluate_reasoner,
    plan_example,
    reflect_answer,
)
from examples.shapesworld.reasoner_sft import (
    answer_example,
    fit_reasoner,
    greedy_answerer,
    pad_examples,
    prompt_ids,
)
from examples.shapesworld.recipe import image_pixels
from rollout.parsing import is_stop, parse_answer
from rollout.templates import Templates

if TYPE_CHECKING:
    from examples.shapesworld.judge import Detection
    from examples.shapesworld.recipe import PretrainSettings, RenderedPool
    from examples.shapesworld.tasks import Splits

__all__ = [
    "OwnImage",
    "caption_of_detections",
    "label_own_images",
    "draw_own_images",
    "OwnReflectData",
    "tune_on_own_images",
    "evaluate_on_own_images",
    "own_images_stage",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OwnImage:
    """One generated image with the judge's reading: `caption` (what it shows) and `fix` (the one
    instruction that fixes it; None when the judge finds it correct)."""

    meta: dict[str, Any]
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    fix: str | None

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]


def caption_of_detections(dets: list[Detection], meta: dict[str, Any]) -> str:
    """The judge's detections phrased as the reasoner's think (`describe_objects`: "colour shape",
    ordered along the prompt's axis by box centre)."""
    objs = []
    for d in dets:
        if d.shape is None:
            raise ValueError(f"a detection with no shape ({d}) has no words in the reasoner's vocabulary")
        objs.append((d.color, d.shape, (d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2))
    return describe_objects(objs, meta)


def label_own_images(metas: list[dict[str, Any]], images: list[np.ndarray]) -> tuple[list[OwnImage], int]:
    """The judge's caption and fix for each image, and how many images were left out: those with
    an object whose shape the judge cannot name (no caption can describe them)."""
    from examples.shapesworld.fixes import fixing_instruction
    from examples.shapesworld.judge import ShapesJudge

    judge = ShapesJudge()
    rows, unnamed = [], 0
    for meta, image in zip(metas, images, strict=True):
        dets = judge.detect(image)
        if any(d.shape is None for d in dets):
            unnamed += 1
            continue
        rows.append(OwnImage(meta, image, caption_of_detections(dets, meta), fixing_instruction(meta, dets)))
    return rows, unnamed


def draw_own_images(
    flux: Path, tasks: list[dict[str, Any]], n: int, seed: int, s: PretrainSettings
) -> tuple[list[OwnImage], int]:
    """`n` tag-balanced tasks from `tasks`, each drawn once by the generator in `flux` (ODE, the
    evaluation's sampler settings; initial noise seeded `seed` + index) and labelled by the judge
    (`label_own_images`)."""
    from actors.diffusion_worker import DiffusionWorker
    from examples.shapesworld.probe import ode_settings
    from examples.shapesworld.tasks import sample_tasks
    from rollout.interfaces import ImageRequest

    if n < 1:
        raise ValueError(f"own images={n}; allowed: >= 1")
    metas = sample_tasks(tasks, n, np.random.default_rng(seed))
    requests = [ImageRequest(m["prompt"], seed=seed + i, noise_seed=seed + i) for i, m in enumerate(metas)]
    worker = DiffusionWorker(str(flux), seed=0, max_sequence_length=s.max_sequence_length)
    try:
        images = [x.image for x in worker.sample(requests, ode_settings(s.num_steps, s.guidance, s.cfg_scale, s.size))]
    finally:
        worker.shutdown()
    return label_own_images(metas, images)


class OwnReflectData:
    """Balanced reflect batches of own images: half correct, half wrong (as the rendered batches),
    so that the prompt alone says nothing about stopping. With only one kind present (a generator
    that draws nothing right, as in a shortened warm start), batches come from that kind alone and
    the constructor logs a warning."""

    def __init__(self, processor, rows: list[OwnImage]) -> None:
        if not rows:
            raise ValueError("no own images to train on: the judge could name the objects of none")
        self.processor, self.rows = processor, rows
        self.correct = [i for i, r in enumerate(rows) if r.fix is None]
        self.wrong = [i for i, r in enumerate(rows) if r.fix is not None]
        if not self.correct or not self.wrong:
            logger.warning(
                "own images: %d correct and %d wrong; batches cannot be balanced", len(self.correct), len(self.wrong)
            )
        self.templates = Templates()
        self._ids: dict[int, list[int]] = {}

    def batch(self, size: int, decision_weight: float, gen) -> dict[str, Any]:
        import torch

        kinds = [k for k in (self.correct, self.wrong) if k]
        per_kind = [size // len(kinds)] * len(kinds)
        per_kind[-1] += size - sum(per_kind)
        idx = [
            kind[j]
            for kind, m in zip(kinds, per_kind, strict=True)
            for j in torch.randint(0, len(kind), (m,), generator=gen).tolist()
        ]
        examples = []
        for i in idx:
            row = self.rows[i]
            if i not in self._ids:
                self._ids[i] = prompt_ids(self.processor, self.templates.reflect_messages(row.prompt, row.image))
            examples.append(
                answer_example(self.processor, self._ids[i], reflect_answer(row.caption, row.fix), decision_weight)
            )
        batch = pad_examples(examples, self.processor.tokenizer.pad_token_id)
        batch["pixel_values"], batch["pixel_attention_mask"] = image_pixels(
            self.processor, [self.rows[i].image for i in idx]
        )
        return batch


def tune_on_own_images(
    vlm: Path, rows: list[OwnImage], pool: RenderedPool, s: PretrainSettings, gen, recipe: ReasonerRecipe | None = None
) -> list[float]:
    """Fine-tune the reasoner in `vlm` (in place) on own-image reflect batches beside rendered
    reflect batches (weight `recipe.own_rendered_weight`) and plan batches; the losses per step."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    r = recipe or ReasonerRecipe()
    processor = AutoProcessor.from_pretrained(vlm)
    model = Idefics3ForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
    own = OwnReflectData(processor, rows)
    rendered = RenderedReflectData(processor, pool, s.size, np.random.default_rng(s.seed + 4))
    plans = [plan_example(processor, p, m) for p, m in zip(pool.prompts, pool.metas, strict=True)]
    pad = processor.tokenizer.pad_token_id

    def batches() -> list[tuple[float, dict[str, Any]]]:
        plan_idx = torch.randint(0, len(plans), (r.plan_batch // 2,), generator=gen).tolist()
        return [
            (r.plan_weight, pad_examples([plans[i] for i in plan_idx], pad)),
            (r.own_rendered_weight, rendered.batch(r, gen)),
            (1.0, own.batch(r.reflect_batch, r.decision_weight, gen)),
        ]

    losses = fit_reasoner(model, batches, r.scaled(r.own_steps, s.scale), r.own_lr, "reasoner on own images")
    model.to(getattr(torch, s.storage_dtype)).save_pretrained(vlm)
    return losses


def evaluate_on_own_images(vlm: Path, rows: list[OwnImage]) -> dict[str, Any]:
    """Greedy reflect answers on own images (held-out prompts): stop when correct, edit when wrong,
    the judge's exact fix, its kind (first word) and the exact caption."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(vlm)
    model = Idefics3ForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32).eval()
    answer, templates = greedy_answerer(processor, model), Templates()
    m: dict[str, list[bool]] = {k: [] for k in ("stop", "edit", "exact", "kind", "caption")}
    for row in rows:
        parsed = parse_answer(answer(templates.reflect_messages(row.prompt, row.image)))
        m["caption"].append(parsed.think == row.caption)
        if row.fix is None:
            m["stop"].append(is_stop(parsed.answer))
        else:
            m["edit"].append(not is_stop(parsed.answer))
            m["exact"].append(parsed.answer == row.fix)
            m["kind"].append(parsed.answer.split()[:1] == row.fix.split()[:1])

    def mean(k: str) -> float | None:
        return float(np.mean(m[k])) if m[k] else None

    return {
        "stop_when_correct": mean("stop"),
        "edit_when_wrong": mean("edit"),
        "exact_fix_on_wrong": mean("exact"),
        "fix_kind_on_wrong": mean("kind"),
        "caption_exact": mean("caption"),
        "n_correct": len(m["stop"]),
        "n_wrong": len(m["exact"]),
    }


def own_images_stage(
    flux: Path, vlm: Path, pool: RenderedPool, splits: Splits, s: PretrainSettings
) -> dict[str, Any]:
    """The whole stage, as the warm start (`examples.shapesworld.pretrain`) runs it after both models
    of the first stages: the finished generator in `flux` draws the train split's prompts, the judge labels
    them, the reasoner in `vlm` is fine-tuned on them. Measured before and after on held-out
    own images (3 × `s.eval_prompts` test-split prompts), and the rendered measurement again.
    Skipped, with a warning and `skipped` in the result, when no drawn image can be captioned."""
    import torch

    r = ReasonerRecipe()
    t = time.perf_counter()
    train_rows, train_unnamed = draw_own_images(
        flux, splits.train, r.scaled(r.own_images, s.scale), s.seed + 40_000, s
    )
    eval_rows, eval_unnamed = draw_own_images(flux, splits.test, 3 * s.eval_prompts, s.seed + 50_000, s)
    times = {"reasoner_own_draw_s": time.perf_counter() - t}
    train_correct = sum(x.fix is None for x in train_rows)
    logger.info(
        "own images: %d to train on (%d correct; %d left out, objects the judge cannot name), %d held out",
        len(train_rows), train_correct, train_unnamed, len(eval_rows),
    )  # fmt: skip
    result: dict[str, Any] = {
        "train_images": len(train_rows),
        "train_correct": train_correct,
        "train_left_out": train_unnamed,
        "eval_images": len(eval_rows),
        "eval_left_out": eval_unnamed,
    }
    if not train_rows:  # a generator that draws nothing the judge can name (a shortened warm start)
        logger.warning("own images: the judge could name the objects of none; the stage is skipped")
        result["skipped"] = "no own image had objects the judge could name"
        return {"losses": [], "times": times, "result": result, "rendered_eval": None}
    before = evaluate_on_own_images(vlm, eval_rows)
    t = time.perf_counter()
    losses = tune_on_own_images(vlm, train_rows, pool, s, torch.Generator().manual_seed(s.seed + 4), r)
    times["reasoner_own_s"] = time.perf_counter() - t
    t = time.perf_counter()
    after = evaluate_on_own_images(vlm, eval_rows)
    rendered = evaluate_reasoner(vlm, splits.test, s)
    times["reasoner_own_eval_s"] = time.perf_counter() - t
    logger.info("reasoner on held-out own images, before: %s; after: %s", before, after)
    result.update(before=before, after=after)
    return {"losses": losses, "times": times, "result": result, "rendered_eval": rendered}
