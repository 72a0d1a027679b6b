"""Supervised warm start of the ShapesWorld reasoner (a small Idefics3 VLM) on rendered data.

Plan: the user prompt (the worker's plan template) -> `<think>as asked.</think>` + the prompt
itself (ShapesWorld prompts are already exact descriptions; a longer checklist cost ~20 tokens of
the answer budget and made copying harder). Reflect: the prompt and an image ->
`<think>` + what the image shows (`describe_scene`: its objects as "colour shape", ordered along
the prompt's axis) + `</think>`, then `no further edit needed` for a correct render or the
renderer's fixing instruction for a wrong one. Trained on the decision alone, the reasoner ignored
the image (stop accuracy 0.55-0.58, chance 0.5); describing the image first gives the vision tower
a dense target and turns the decision into comparing two texts.

Chats are rendered exactly as `actors.text_worker` renders them (images first, then the text; the
processor's chat template); the loss covers the answer tokens plus `<end_of_utterance>`, with the
reflect decision token (first token of the think) weighted up. Reflect batches are balanced
(half correct, half wrong), use fresh renders of the pool's train prompts beside the pool's own
images, and degrade a share of the images (blur, noise, colour jitter) so the reasoner also
reads the generator's imperfect images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from examples.shapesworld.reasoner_sft import (
    answer_example,
    fit_reasoner,
    greedy_answerer,
    pad_examples,
    prompt_ids,
)
from examples.shapesworld.recipe import degrade_images, image_pixels, make_pool
from examples.shapesworld.vision import pretrain_vision
from rollout.parsing import STOP_PHRASE, is_stop, parse_answer
from rollout.templates import Templates

if TYPE_CHECKING:
    from examples.shapesworld.layout import Scene
    from examples.shapesworld.recipe import PretrainSettings, RenderedPool

__all__ = [
    "ReasonerRecipe",
    "PLAN_THINK",
    "plan_answer",
    "reflect_answer",
    "describe_scene",
    "describe_objects",
    "build_shapes_vlm",
    "train_reasoner",
    "plan_example",
    "evaluate_reasoner",
    "balanced_reflect_batch",
    "RenderedReflectData",
]

logger = logging.getLogger(__name__)

PLAN_THINK = "as asked."


@dataclass(frozen=True)
class ReasonerRecipe:
    """Model size and training knobs of the reasoner warm start; step counts scale with
    `PretrainSettings.scale` (`max(1, round(x * scale))`)."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 2
    patch: int = 8  # 64 px image / 8 px patches = 64 patches -> 16 image tokens (scale factor 2)
    image_size: int = 64  # ShapesWorld images are 64x64: one tile, no splitting, no resampling
    steps: int = 1100
    lr: float = 3e-3
    plan_batch: int = 16
    reflect_batch: int = 16  # 8 prompts, each with a correct and a wrong image
    fresh_fraction: float = 0.5  # share of reflect images rendered afresh (new layouts) each step
    degrade_fraction: float = 0.5  # share of reflect images blurred / noised like generator output
    decision_weight: float = 6.0  # loss weight of the reflect decision token (stop vs edit)
    vision_steps: int = 400  # dense patch pretraining of the vision tower first (examples.shapesworld.vision)
    vision_batch: int = 64
    vision_lr: float = 3e-3
    plan_weight: float = 1.0
    # Second stage (`examples.shapesworld.own_images`): the generator's own images, judge-labelled.
    own_images: int = 3000  # train-split prompts drawn once each by the finished generator
    own_steps: int = 2000
    own_lr: float = 2e-3
    own_rendered_weight: float = 0.5  # loss weight of the first stage's rendered reflect batches beside them
    own_eval_images: int = 270  # held-out (test-split) prompts drawn for the stage's before/after measurement

    def scaled(self, value: int, scale: float) -> int:
        return max(1, int(round(value * scale)))


def plan_answer(meta: dict[str, Any]) -> str:
    """`<think>as asked.</think>` + the prompt itself (already an exact description)."""
    return f"<think>{PLAN_THINK}</think>{meta['prompt']}"


def reflect_answer(caption: str, instruction: str | None) -> str:
    """`caption` (what the image shows) as the think, then the stop phrase for a correct image
    (`instruction` None), else the fixing instruction."""
    return f"<think>{caption}</think>{STOP_PHRASE if instruction is None else instruction}"


def describe_scene(scene: Scene, meta: dict[str, Any]) -> str:
    """What a rendered image shows, as `describe_objects` phrases it."""
    return describe_objects([(o.color, o.shape, o.cx, o.cy) for o in scene.objects], meta)


def describe_objects(objs: list[tuple[str, str, float, float]], meta: dict[str, Any]) -> str:
    """(colour, shape, centre x, centre y) objects as "colour shape", comma-separated, ordered top
    to bottom when the prompt relates objects vertically (above / below), else left to right;
    "nothing." if empty. E.g. "red circle, blue square, blue square." for two blue squares right
    of a red circle."""
    vertical = any(r.get("position", ("",))[0] in ("above", "below") for r in meta["include"])
    ordered = sorted(objs, key=lambda o: (o[3], o[2]) if vertical else (o[2], o[3]))
    return (", ".join(f"{color} {shape}" for color, shape, _, _ in ordered) or "nothing") + "."


def build_shapes_vlm(out: Path, seed: int = 0, recipe: ReasonerRecipe | None = None) -> Path:
    """Save a small random Idefics3 VLM for ShapesWorld to `out`: the tiny VLM's tokenizer, chat
    template and special tokens (so TextWorker, TextLearner and the logit bias work unchanged),
    a wider/deeper llama text model and a vision tower that sees the 64x64 image as one tile of
    8 px patches (16 image tokens), instead of 56 px tiles of a 112 px upscale."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    from actors.models import VLM_CHAT_TEMPLATE, VLM_SPECIAL_TOKENS, save_idefics3
    from actors.tokenizer import build_byte_bpe
    from examples.shapesworld.models import SHAPES_VOCAB_SIZE, shapes_corpus
    from rollout.templates import DEFAULT_PLAN, DEFAULT_REFLECT, DEFAULT_SYSTEM

    r = recipe or ReasonerRecipe()
    corpus = shapes_corpus() + [DEFAULT_SYSTEM, DEFAULT_PLAN, DEFAULT_REFLECT] * 20  # whole-word tokens
    tok = build_byte_bpe(
        vocab_size=SHAPES_VOCAB_SIZE, extra_special_tokens=VLM_SPECIAL_TOKENS, model_max_length=1024, corpus=corpus
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": r.image_size},
        max_image_size={"longest_edge": r.image_size},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tokens_per_image = (r.image_size // r.patch) ** 2 // 4
    processor = Idefics3Processor(
        image_processor, tok, image_seq_len=tokens_per_image, chat_template=VLM_CHAT_TEMPLATE
    )
    text_config = dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=r.text_hidden,
        intermediate_size=3 * r.text_hidden,
        num_hidden_layers=r.text_layers,
        num_attention_heads=r.text_heads,
        num_key_value_heads=r.text_heads,
        head_dim=r.text_hidden // r.text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision_config = dict(
        hidden_size=r.vision_hidden,
        intermediate_size=2 * r.vision_hidden,
        num_hidden_layers=r.vision_layers,
        num_attention_heads=r.vision_heads,
        image_size=r.image_size,
        patch_size=r.patch,
        num_channels=3,
    )
    return save_idefics3(out, processor, text_config, vision_config, seed)


def train_reasoner(
    out: Path, pool: RenderedPool, s: PretrainSettings, gen, recipe: ReasonerRecipe | None = None
) -> list[float]:
    """Build the ShapesWorld VLM (seeded), fine-tune it on plan + reflect answers, save it to `out`.

    `gen` (torch.Generator) draws the batches; fresh renders and degradations use a numpy
    generator seeded from `s.seed`, so the run is reproducible."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    r = recipe or ReasonerRecipe()
    build_shapes_vlm(out, seed=s.seed, recipe=r)
    processor = AutoProcessor.from_pretrained(out)
    model = Idefics3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    pretrain_vision(
        model, processor, pool, r.scaled(r.vision_steps, s.scale), r.vision_batch, r.vision_lr, r.patch,
        np.random.default_rng(s.seed + 2), gen,
    )  # fmt: skip
    data = RenderedReflectData(processor, pool, s.size, np.random.default_rng(s.seed + 1))
    plans = [plan_example(processor, p, m) for p, m in zip(pool.prompts, pool.metas, strict=True)]
    pad = processor.tokenizer.pad_token_id

    def batches() -> list[tuple[float, dict[str, Any]]]:
        plan_idx = torch.randint(0, len(plans), (r.plan_batch,), generator=gen).tolist()
        return [(r.plan_weight, pad_examples([plans[i] for i in plan_idx], pad)), (1.0, data.batch(r, gen))]

    losses = fit_reasoner(model, batches, r.scaled(r.steps, s.scale), r.lr, "reasoner")
    model.to(getattr(torch, s.storage_dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    return losses


def evaluate_reasoner(path: Path, tasks: list[dict[str, Any]], s: PretrainSettings) -> dict[str, Any]:
    """Greedy answers on held-out prompts: plan format and exactness; reflect stop accuracy (stop
    exactly on correct images) on clean renders and on degraded ones (blur/noise, like generator
    output); on wrong renders, exact fixing instructions and the named kind of mistake."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()  # stored in half
    pool = make_pool(tasks, max(2, s.eval_prompts // 3), seed=s.seed + 20_000, size=s.size)
    rng = np.random.default_rng(s.seed + 20_001)
    correct_deg = degrade_images(pool.correct, rng, 1.0)
    wrong_deg = degrade_images(pool.wrong, rng, 1.0)
    t = Templates()
    answer = greedy_answerer(processor, model)
    torch.manual_seed(s.seed)
    m: dict[str, list[bool]] = {k: [] for k in ("plan_ok", "plan_exact", "stop", "stop_deg", "exact", "caption")}
    for i, p in enumerate(pool.prompts):
        parsed = parse_answer(answer(t.plan_messages(p)))
        m["plan_ok"].append(parsed.well_formed)
        m["plan_exact"].append(parsed.well_formed and parsed.answer == p)
        good, bad = (parse_answer(answer(t.reflect_messages(p, im))) for im in (pool.correct[i], pool.wrong[i]))
        m["stop"] += [is_stop(good.answer), not is_stop(bad.answer)]
        m["exact"].append(bad.answer == pool.instructions[i])
        m["caption"] += [
            good.think == describe_scene(pool.correct_scenes[i], pool.metas[i]),
            bad.think == describe_scene(pool.wrong_scenes[i], pool.metas[i]),
        ]
        good, bad = (parse_answer(answer(t.reflect_messages(p, im))) for im in (correct_deg[i], wrong_deg[i]))
        m["stop_deg"] += [is_stop(good.answer), not is_stop(bad.answer)]
    return {
        "plan_well_formed": float(np.mean(m["plan_ok"])),
        "plan_exact": float(np.mean(m["plan_exact"])),
        "reflect_stop_accuracy": float(np.mean(m["stop"])),
        "reflect_stop_accuracy_degraded": float(np.mean(m["stop_deg"])),
        "reflect_instruction_exact": float(np.mean(m["exact"])),
        "reflect_caption_exact": float(np.mean(m["caption"])),
        "n": len(pool.prompts),
    }


def balanced_reflect_batch(n_prompts: int, batch: int, gen) -> tuple[list[int], list[bool]]:
    """`batch` (even) reflect examples as `batch / 2` prompts each shown once with a correct and
    once with a wrong image: prompt indices and whether each image is the correct one. Paired,
    the prompt alone says nothing about "stop", so the decision token learns from the image."""
    import torch

    if batch < 2 or batch % 2:
        raise ValueError(f"reflect batch={batch}; allowed: an even number >= 2")
    idx = torch.randint(0, n_prompts, (batch // 2,), generator=gen).tolist()
    return idx + idx, [True] * (batch // 2) + [False] * (batch // 2)


class RenderedReflectData:
    """Balanced reflect batches: pool images or fresh renders of the pool's prompts, a share of
    them degraded; prompt ids cached per prompt (they do not depend on the image's content)."""

    def __init__(self, processor, pool: RenderedPool, size: int, rng: np.random.Generator) -> None:
        self.processor, self.pool, self.size, self.rng = processor, pool, size, rng
        self.templates = Templates()
        self._ids: dict[int, list[int]] = {}

    def batch(self, r: ReasonerRecipe, gen) -> dict[str, Any]:
        from examples.shapesworld.render import render_correct, render_wrong

        pool, rng = self.pool, self.rng
        idx, correct = balanced_reflect_batch(len(pool.prompts), r.reflect_batch, gen)
        images, answers = [], []
        for i, ok in zip(idx, correct, strict=True):
            if rng.random() < r.fresh_fraction:
                made = (render_correct if ok else render_wrong)(pool.metas[i], rng, size=self.size)
                image, scene, instruction = made.image, made.scene, made.instruction
            elif ok:
                image, scene, instruction = pool.correct[i], pool.correct_scenes[i], None
            else:
                image, scene, instruction = pool.wrong[i], pool.wrong_scenes[i], pool.instructions[i]
            images.append(image)
            answers.append(reflect_answer(describe_scene(scene, pool.metas[i]), instruction))
        images = degrade_images(np.stack(images), rng, r.degrade_fraction)
        examples = [
            answer_example(self.processor, self._prompt_ids(i, im), a, r.decision_weight)
            for i, im, a in zip(idx, images, answers, strict=True)
        ]
        batch = pad_examples(examples, self.processor.tokenizer.pad_token_id)
        batch["pixel_values"], batch["pixel_attention_mask"] = image_pixels(self.processor, list(images))
        return batch

    def _prompt_ids(self, i: int, image: np.ndarray) -> list[int]:
        if i not in self._ids:
            self._ids[i] = prompt_ids(self.processor, self.templates.reflect_messages(self.pool.prompts[i], image))
        return self._ids[i]


def plan_example(processor, prompt: str, meta: dict[str, Any]):
    return answer_example(processor, prompt_ids(processor, Templates().plan_messages(prompt)), plan_answer(meta))

