"""Supervised warm start of the reasoner (tiny Idefics3 VLM) on ShapesWorld.

Plan: the user prompt (the worker's plan template) -> `<think>checklist</think>` + the prompt.
Reflect: the prompt and an image -> `<think>…</think>no further edit needed` for a correct render,
`<think>…</think>` + the fixing instruction for a wrong one. Chats are rendered exactly as
`actors.text_worker` renders them (images first, then the text; the processor's chat template),
and the loss covers the answer tokens plus the end-of-utterance token only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rollout.parsing import STOP_PHRASE, is_stop, parse_answer
from rollout.templates import Templates

if TYPE_CHECKING:
    from cluster.shapes_pretrain import PretrainSettings, RenderedPool

__all__ = ["plan_answer", "reflect_answer", "train_reasoner", "evaluate_reasoner", "warmup_cosine"]

logger = logging.getLogger(__name__)


def plan_answer(meta: dict[str, Any]) -> str:
    """`<think>` a compact checklist `</think>` + the prompt itself (already an exact description)."""
    parts = []
    for r in meta["include"]:
        item = f"{r['count']} {r.get('color', '') + ' ' if 'color' in r else ''}{r['class']}"
        if "position" in r:
            item += f" {r['position'][0]} {meta['include'][int(r['position'][1])]['class']}"
        parts.append(item)
    return f"<think>{'; '.join(parts)}</think>{meta['prompt']}"


def reflect_answer(kind: str, instruction: str | None) -> str:
    if instruction is None:
        return f"<think>the image matches.</think>{STOP_PHRASE}"
    return f"<think>wrong {kind}.</think>{instruction}"


def _chat(messages) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.images]
        parts.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": parts})
    return out


def _encode(processor, messages, answer: str | None) -> dict[str, Any]:
    """Prompt ids (+ answer ids + end of utterance when `answer` is given), pixel tensors."""
    from PIL import Image

    text = processor.apply_chat_template(_chat(messages), tokenize=False, add_generation_prompt=True)
    images = [Image.fromarray(im) for m in messages for im in m.images]
    enc = processor(
        text=text, images=[images] if images else None, return_tensors="pt", add_special_tokens=False
    )
    ids = enc["input_ids"][0].tolist()
    labels = [-100] * len(ids)
    if answer is not None:
        tok = processor.tokenizer
        ans = tok(answer, add_special_tokens=False)["input_ids"] + [
            tok.convert_tokens_to_ids("<end_of_utterance>")
        ]
        ids, labels = ids + ans, labels + ans
    out = {"input_ids": ids, "labels": labels}
    if images:
        out["pixel_values"] = enc["pixel_values"]
        out["pixel_attention_mask"] = enc["pixel_attention_mask"]
    return out


def _collate(examples: list[dict[str, Any]], pad_id: int):
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
        batch["pixel_attention_mask"] = torch.cat([e["pixel_attention_mask"] for e in examples])
    return batch


def train_reasoner(out: Path, pool: RenderedPool, s: PretrainSettings, gen) -> list[float]:
    """Build the tiny VLM (seeded), fine-tune it on plan + reflect answers, save it to `out`."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from actors.models import build_tiny_vlm

    build_tiny_vlm(out, seed=s.seed)
    processor = AutoProcessor.from_pretrained(out)
    model = Idefics3ForConditionalGeneration.from_pretrained(out)
    t = Templates()
    n = len(pool.prompts)
    plans = [
        _encode(processor, t.plan_messages(p), plan_answer(m))
        for p, m in zip(pool.prompts, pool.metas, strict=True)
    ]
    reflects = []
    for i in range(n):
        reflects.append(
            _encode(processor, t.reflect_messages(pool.prompts[i], pool.correct[i]), reflect_answer("", None))
        )
        reflects.append(
            _encode(
                processor,
                t.reflect_messages(pool.prompts[i], pool.wrong[i]),
                reflect_answer(pool.kinds[i], pool.instructions[i]),
            )
        )
    steps = s.steps("reasoner_steps")
    opt = torch.optim.AdamW(model.parameters(), lr=s.reasoner_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    pad = processor.tokenizer.pad_token_id
    model.train()
    losses = []
    for _ in range(steps):
        plan_idx = torch.randint(0, len(plans), (s.reasoner_batch // 4,), generator=gen).tolist()
        refl_idx = torch.randint(0, len(reflects), (s.reasoner_batch,), generator=gen).tolist()
        loss = model(**_collate([plans[i] for i in plan_idx], pad)).loss
        loss = 0.25 * loss + model(**_collate([reflects[i] for i in refl_idx], pad)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % max(1, steps // 10) == 0:
            logger.info("reasoner step %d/%d loss %.4f", len(losses), steps, float(np.mean(losses[-10:])))
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return losses


def evaluate_reasoner(path: Path, tasks: list[dict[str, Any]], s: PretrainSettings) -> dict[str, Any]:
    """Greedy answers on held-out prompts: plan format and exactness; reflect stop accuracy
    (stop exactly on correct renders) and exact fixing instructions on wrong ones."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from cluster.shapes_pretrain import make_pool

    processor = AutoProcessor.from_pretrained(path)
    model = Idefics3ForConditionalGeneration.from_pretrained(path).eval()
    eou = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pool = make_pool(tasks, max(2, s.eval_prompts // 3), seed=s.seed + 20_000, size=s.size)
    t = Templates()

    def answer(messages) -> str:
        enc = _encode(processor, messages, None)
        batch = {k: v for k, v in _collate([enc], processor.tokenizer.pad_token_id).items() if k != "labels"}
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=[eou],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    torch.manual_seed(s.seed)
    plan_ok, plan_exact, stop_ok, instr_exact = [], [], [], []
    for i, p in enumerate(pool.prompts):
        parsed = parse_answer(answer(t.plan_messages(p)))
        plan_ok.append(parsed.well_formed)
        plan_exact.append(parsed.well_formed and parsed.answer == p)
        good = parse_answer(answer(t.reflect_messages(p, pool.correct[i])))
        bad = parse_answer(answer(t.reflect_messages(p, pool.wrong[i])))
        stop_ok += [is_stop(good.answer), not is_stop(bad.answer)]
        instr_exact.append(bad.answer == pool.instructions[i])
    return {
        "plan_well_formed": float(np.mean(plan_ok)),
        "plan_exact": float(np.mean(plan_exact)),
        "reflect_stop_accuracy": float(np.mean(stop_ok)),
        "reflect_instruction_exact": float(np.mean(instr_exact)),
        "n": len(pool.prompts),
    }


def warmup_cosine(steps: int):
    """LR multiplier: linear warm-up over 5 % of `steps`, then cosine to 0."""
    warm = max(1, steps // 20)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return f
