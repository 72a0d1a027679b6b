"""Log-probs under the distribution the text sampler drew from: temperature, then vLLM's top-p cut.

Why a module of its own: the learner's ratio exp(logπθ − logπold) starts at 1 only if the learner
replays the sampler's distribution exactly — softmax(logits / T) cut to the top-p nucleus and
renormalised, as vLLM reports it with `logprobs_mode="processed_logprobs"`
(docs/design.md#behaviour-log-probs). `token_logprobs` is what `learners.text_learner` trains on;
`sampling_logprobs` is the same rule over the whole vocabulary, which `actors.hf_text_worker` draws
from (docs/design.md#transformers-rollout-backend). Pure torch (no Ray, DeepSpeed, vLLM or diffusers);
logits are (..., V), results fp32 with −inf outside the nucleus.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs", "sampling_logprobs"]


def token_logprobs(logits: Tensor, target_ids: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Log-probs of `target_ids` under the distribution the sampler drew from, in fp32.

    That distribution is softmax(logits / T) cut to the top-p nucleus and renormalised, exactly as
    vLLM's sampler builds it and reports it with `logprobs_mode="processed_logprobs"`; with top-p
    the first update's ratio is 1 only if the learner replays the cut too. A target outside the
    nucleus gets −inf (probability 0 under the truncated policy). Gradients flow through the
    renormalisation; the logits of removed tokens get zero gradient.

    logits: (B, T, V) (any logit bias already added, as vLLM adds it before the temperature);
    target_ids: (B, T); temperature > 0; top_p in (0, 1], 1 = no cut (and no sort). -> (B, T).
    """
    logp = sampling_logprobs(logits, temperature, top_p)  # (B, T, V)
    return logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)


def sampling_logprobs(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Log-probs of every token under the sampling distribution of `token_logprobs` (the one rule
    both the learner and a transformers sampler use): log-softmax of logits / T after the top-p cut.

    logits: (..., V); returns (..., V) fp32, −inf outside the nucleus.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p}")
    z = logits.float() / temperature  # (..., V), a new tensor: safe to fill in place
    if top_p < 1.0:
        z.masked_fill_(_outside_nucleus(z.detach(), top_p), float("-inf"))
    return torch.log_softmax(z, dim=-1)


# Rows of the nucleus mask computed at once: bounds the sort's scratch (values, int64 indices,
# probabilities) to a few hundred MB whatever the batch and vocabulary.
_NUCLEUS_CHUNK_ELEMENTS = 1 << 25


@torch.no_grad()
def _outside_nucleus(z: Tensor, top_p: float) -> Tensor:
    """(..., V) bool, True where top-p removes the token — vLLM's rule, step for step.

    Mirrors `apply_top_k_top_p_pytorch` in vllm/v1/sample/ops/topk_topp_sampler.py (0.32): sort the
    tempered logits ascending, softmax the sorted row, cumulative sum, remove where the sum is
    ≤ 1 − p (1 − p taken in fp32 as vLLM holds p), never the last (largest) token. Ties at the cut
    are settled by position in the same `sort` call, as in vLLM, so equal logits can fall on either
    side of it.
    """
    vocab = z.shape[-1]
    rows = z.reshape(-1, vocab)  # (N, V)
    out = torch.empty(rows.shape, dtype=torch.bool, device=z.device)
    cut = 1.0 - torch.tensor(top_p, dtype=torch.float32, device=z.device)
    step = max(1, _NUCLEUS_CHUNK_ELEMENTS // vocab)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        z_sorted, order = chunk.sort(dim=-1, descending=False)  # (n, V) each
        cum = z_sorted.softmax(dim=-1)
        del z_sorted
        torch.cumsum(cum, dim=-1, out=cum)
        remove = cum <= cut  # (n, V), in sorted order
        remove[:, -1] = False  # at least one token survives
        out[start : start + step].scatter_(-1, order, remove)
    return out.view(z.shape)
