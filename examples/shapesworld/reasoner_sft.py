"""Supervised fine-tuning pieces of the ShapesWorld reasoner: chats rendered as the workers render
them, answers labelled and weighted, batches padded, the weighted loss, the AdamW loop and a greedy
answerer for measurements. `examples.shapesworld.reasoner` (rendered data) and
`examples.shapesworld.own_images` (the generator's own images) both train through these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from examples.shapesworld.recipe import warmup_cosine

__all__ = [
    "fit_reasoner",
    "chat_dicts",
    "prompt_ids",
    "answer_example",
    "pad_examples",
    "weighted_loss",
    "shared_prefix_len",
    "greedy_answerer",
]

logger = logging.getLogger(__name__)


def fit_reasoner(model, batches: Callable[[], list[tuple[float, dict[str, Any]]]], steps: int, lr: float, name: str):
    """`steps` AdamW steps (warm-up + cosine, gradients clipped to 1) on the weighted sum of the
    `weighted_loss` of each (weight, batch) that `batches()` draws; the losses per step. Leaves
    the model in eval mode."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    model.train()
    losses: list[float] = []
    for _ in range(steps):
        weighted = batches()
        loss = sum(w * weighted_loss(model, b) for w, b in weighted)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) % max(1, steps // 10) == 0:
            logger.info("%s step %d/%d loss %.4f", name, len(losses), steps, float(np.mean(losses[-10:])))
    model.eval()
    return losses


def chat_dicts(messages) -> list[dict[str, Any]]:
    """ChatMessages -> the chat dicts `actors.text_worker` renders (images first, then the text)."""
    out = []
    for m in messages:
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.images]
        parts.append({"type": "text", "text": m.text})
        out.append({"role": m.role, "content": parts})
    return out


def prompt_ids(processor, messages) -> list[int]:
    """Token ids of the rendered chat up to `Assistant:`, image placeholders expanded."""
    from PIL import Image

    text = processor.apply_chat_template(chat_dicts(messages), tokenize=False, add_generation_prompt=True)
    images = [Image.fromarray(im) for m in messages for im in m.images]
    enc = processor(text=text, images=[images] if images else None, add_special_tokens=False)
    return list(enc["input_ids"][0])


def answer_example(processor, prompt: list[int], answer: str, decision_weight: float = 1.0):
    """(ids, labels, weights): the answer tokens + `<end_of_utterance>` carry the loss; the
    first token after `</think>` (the reflect decision: stop phrase or instruction) carries
    `decision_weight`."""
    tok = processor.tokenizer
    head = answer[: answer.index("</think>") + len("</think>")]
    ans = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<end_of_utterance>")]
    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
    if ans[:n_head] != tok(head, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"the think of {answer!r} does not tokenize apart from its answer")
    weights = [0.0] * len(prompt) + [1.0] * len(ans)
    weights[len(prompt) + n_head] = decision_weight
    return prompt + ans, [-100] * len(prompt) + ans, weights


def pad_examples(examples, pad_id: int) -> dict[str, Any]:
    """Right-padded (B, T) input_ids, attention_mask, labels (-100 on prompt and padding) and
    loss weights."""
    import torch

    n = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    weights = torch.zeros((len(examples), n))
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for b, (i, lab, w) in enumerate(examples):
        ids[b, : len(i)], labels[b, : len(i)] = torch.tensor(i), torch.tensor(lab)
        weights[b, : len(i)], mask[b, : len(i)] = torch.tensor(w), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights}


def weighted_loss(model, batch: dict[str, Any], share_prefix: bool = True):
    """Weighted next-token cross-entropy, summed over answer tokens / their number.

    With `share_prefix`, the token prefix that every row shares (system message and template
    text, up to the first image token) runs once and its key/value cache is repeated over the
    batch: the same loss and gradients (autograd flows through the cache) for ~40 % less compute."""
    import torch

    labels, weights = batch["labels"], batch["weights"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "weights")}
    k = shared_prefix_len(inputs["input_ids"], model.config.image_token_id) if share_prefix else 0
    if k > 0:
        ids = inputs["input_ids"]
        cache = model(input_ids=ids[:1, :k], use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        inputs.update(input_ids=ids[:, k:], past_key_values=cache)
    logits = model(**inputs).logits  # (B, T - k, V)
    labels, weights = labels[:, k:], weights[:, k:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    )  # (B * (T - k - 1),)
    return (ce * weights[:, 1:].flatten()).sum() / (labels[:, 1:] != -100).sum().clamp(min=1)


def shared_prefix_len(ids, image_token_id: int) -> int:
    """Length of the id prefix common to every row of `ids` (B, T), stopped before the first
    image token (image embeddings differ per row) and at least one token short of the end."""
    same = (ids == ids[:1]).all(0) & (ids[0] != image_token_id)  # (T,)
    k = int(same.long().cumprod(0).sum())
    return min(k, ids.shape[1] - 2)


def greedy_answerer(processor, model, max_new_tokens: int = 40):
    """messages -> the greedy answer text (the RL run's answer budget: grpo.max_tokens 40)."""
    import torch
    from PIL import Image

    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")

    def answer(messages) -> str:
        text = processor.apply_chat_template(chat_dicts(messages), tokenize=False, add_generation_prompt=True)
        images = [Image.fromarray(im) for m in messages for im in m.images]
        enc = processor(text=text, images=[images] if images else None, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[eou], pad_token_id=tok.pad_token_id
            )
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer
