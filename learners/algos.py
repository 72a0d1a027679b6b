"""The RL objectives of R3RL in one place: advantages, GRPO (text), FlowGRPO (image), KL.

Pure torch (no Ray, DeepSpeed, vLLM or diffusers). docs/design.md gives the formulas
(docs/design.md#the-r3-algorithm, docs/design.md#grpo-for-the-reasoner,
docs/design.md#flowgrpo-for-the-generator); the names and argument meanings of `group_advantages`,
`kl_estimate`, `grpo_loss` and `flow_grpo_loss` are the stable public API of
docs/design.md#stable-math-api. Tensors are batch-first. Variants are chosen by string
through two small registries (`AGG_MODES`, `KL_KINDS`): an unknown name raises `ValueError`
listing the known ones, and registering a taken name raises. The log-probs these objectives take
come from `learners.logprobs` (the sampler's distribution, replayed).

Conventions:
  * ratio = exp(logprobs − old_logprobs), computed in fp32;
  * PPO-clip surrogate per element: max(−A·ratio, −A·clip(ratio, 1 − clip_low, 1 + clip_high));
  * std of rewards is the population std (divide by N, as Flow-GRPO's numpy code does), so a
    group of size 1 has std 0 rather than NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AggFn",
    "KlFn",
    "AGG_MODES",
    "KL_KINDS",
    "register_agg",
    "register_kl",
    "get_agg",
    "get_kl",
    "ZeroVarianceGroups",
    "GrpoTerms",
    "FlowGrpoTerms",
    "group_advantages",
    "clip_advantages",
    "zero_variance_groups",
    "ZERO_VARIANCE_POLICIES",
    "zero_variance_keep_mask",
    "kl_estimate",
    "aggregate",
    "agg_normalizer",
    "grpo_loss",
    "grpo_loss_terms",
    "flow_grpo_loss",
    "flow_grpo_loss_terms",
    "flow_kl",
    "velocity_kl",
]

# (loss_mat [B, T], mask [B, T], max_len, normalizer) -> scalar
AggFn = Callable[[Tensor, Tensor, int, "float | Tensor | None"], Tensor]
# (log_r [...]) -> kl [...], with log_r = ref_logprobs − logprobs
KlFn = Callable[[Tensor], Tensor]

AGG_MODES: dict[str, AggFn] = {}
KL_KINDS: dict[str, KlFn] = {}
# What each aggregation mode divides by, so data-parallel shards can share one global count.
_AGG_UNITS: dict[str, str] = {}


def register_agg(name: str, unit: str) -> Callable[[AggFn], AggFn]:
    """Register a loss aggregation mode. `unit` is "tokens" or "seqs": what its normalizer counts."""
    if unit not in ("tokens", "seqs"):
        raise ValueError(f"unit must be 'tokens' or 'seqs', got {unit!r}")

    def deco(fn: AggFn) -> AggFn:
        if name in AGG_MODES:
            raise ValueError(f"aggregation mode {name!r} is already registered")
        AGG_MODES[name] = fn
        _AGG_UNITS[name] = unit
        return fn

    return deco


def register_kl(name: str) -> Callable[[KlFn], KlFn]:
    """Register a KL estimator taking log r = ref_logprobs − logprobs."""

    def deco(fn: KlFn) -> KlFn:
        if name in KL_KINDS:
            raise ValueError(f"KL kind {name!r} is already registered")
        KL_KINDS[name] = fn
        return fn

    return deco


def get_agg(name: str) -> AggFn:
    if name not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {name!r}; known: {sorted(AGG_MODES)}")
    return AGG_MODES[name]


def get_kl(name: str) -> KlFn:
    if name not in KL_KINDS:
        raise ValueError(f"unknown KL kind {name!r}; known: {sorted(KL_KINDS)}")
    return KL_KINDS[name]


class ZeroVarianceGroups(NamedTuple):
    """Groups whose rewards are all equal: their advantages are zero, they carry no signal.

    group_mask: (N // G,) bool, True for a zero-variance group; sample_mask: (N,) the same per
    sample; count: number of such groups; fraction: count / number of groups.
    """

    group_mask: Tensor
    sample_mask: Tensor
    count: int
    fraction: float


class GrpoTerms(NamedTuple):
    """GRPO loss plus the statistics a learner reports (all over unmasked tokens)."""

    loss: Tensor
    clip_frac_low: Tensor  # fraction of tokens where A < 0 and ratio < 1 − clip_low (clipped)
    clip_frac_high: Tensor  # fraction of tokens where A > 0 and ratio > 1 + clip_high (clipped)
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor


class FlowGrpoTerms(NamedTuple):
    """FlowGRPO per-step loss plus statistics (over the batch)."""

    loss: Tensor
    clip_frac: Tensor  # fraction of samples where the clipped branch is active
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor


# ------------------------------------------------------------------------------ registries


@register_agg("token-mean", unit="tokens")
def _agg_token_mean(loss_mat: Tensor, mask: Tensor, max_len: int, normalizer=None) -> Tensor:
    """Σ_{b,t} loss·mask / Σ mask (every answer token weighs the same)."""
    denom = mask.sum() if normalizer is None else normalizer
    return (loss_mat * mask).sum() / _at_least_one(denom)


@register_agg("seq-mean-token-mean", unit="seqs")
def _agg_seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, max_len: int, normalizer=None) -> Tensor:
    """Mean over sequences of each sequence's token mean (GRPO paper, Shao et al. 2024 eq. 3)."""
    seq = (loss_mat * mask).sum(-1) / _at_least_one(mask.sum(-1))  # (B,)
    denom = seq.new_tensor(float(seq.shape[0])) if normalizer is None else normalizer
    return seq.sum() / _at_least_one(denom)


@register_agg("seq-mean-token-sum-norm", unit="seqs")
def _agg_seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, max_len: int, normalizer=None) -> Tensor:
    """Mean over sequences of token sum / max_len (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783)."""
    seq = (loss_mat * mask).sum(-1) / float(max_len)  # (B,)
    denom = seq.new_tensor(float(seq.shape[0])) if normalizer is None else normalizer
    return seq.sum() / _at_least_one(denom)


@register_kl("k1")
def _kl_k1(log_r: Tensor) -> Tensor:
    """k1 = −log r = logπθ − logπref (unbiased, high variance; Schulman 2020)."""
    return -log_r


@register_kl("k2")
def _kl_k2(log_r: Tensor) -> Tensor:
    """k2 = ½ (log r)²."""
    return 0.5 * log_r.square()


@register_kl("k3")
def _kl_k3(log_r: Tensor) -> Tensor:
    """k3 = r − 1 − log r (unbiased, non-negative)."""
    return torch.expm1(log_r) - log_r


# ------------------------------------------------------------------------------ advantages


def group_advantages(rewards: Tensor, group_size: int, std: str = "none", eps: float = 1e-6) -> Tensor:
    """Group-mean baseline A = R − mean_group(R), optionally divided by a std.

    rewards: (N,) laid out group after group (N divisible by `group_size`).
    std: "none" (R3 paper), "group" (divide by the group's std + eps, GRPO) or "global"
    (divide by the std of all N rewards + eps, Flow-GRPO's global option).
    Returns (N,) float32.
    """
    r = _as_groups(rewards, group_size)  # (N/G, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if std == "none":
        pass
    elif std == "group":
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    elif std == "global":
        adv = adv / (r.std(unbiased=False) + eps)
    else:
        raise ValueError(f"unknown advantage std normalisation {std!r}; known: ['global', 'group', 'none']")
    return adv.reshape(-1)


def clip_advantages(advantages: Tensor, limit: float) -> Tensor:
    """Clamp advantages to [−limit, limit] (FlowGRPO uses 5)."""
    if limit <= 0:
        raise ValueError(f"advantage clip limit must be > 0, got {limit}")
    return advantages.clamp(-limit, limit)


ZERO_VARIANCE_POLICIES = ("keep", "drop")


def zero_variance_keep_mask(rewards: Tensor, group_size: int, policy: str = "keep", tol: float = 0.0) -> Tensor:
    """Which samples enter the learner batch: all of them ("keep"), or those of groups whose rewards
    span more than `tol` ("drop"). A kept zero-variance group adds nothing to the policy gradient
    but counts in the mean loss (and adds its KL), so "drop" is a larger effective step.

    rewards: (N,) laid out group after group. Returns (N,) bool, True = train on the sample.
    """
    if policy == "keep":
        return torch.ones(_as_groups(rewards, group_size).numel(), dtype=torch.bool, device=rewards.device)
    if policy == "drop":
        return ~zero_variance_groups(rewards, group_size, tol).sample_mask
    raise ValueError(f"unknown zero-variance policy {policy!r}; known: {list(ZERO_VARIANCE_POLICIES)}")


def zero_variance_groups(rewards: Tensor, group_size: int, tol: float = 0.0) -> ZeroVarianceGroups:
    """Detect groups whose rewards span at most `tol` (max − min): they give zero advantage."""
    r = _as_groups(rewards, group_size)
    group_mask = (r.max(dim=1).values - r.min(dim=1).values) <= tol
    count = int(group_mask.sum())
    return ZeroVarianceGroups(
        group_mask=group_mask,
        sample_mask=group_mask.repeat_interleave(group_size),
        count=count,
        fraction=count / r.shape[0],
    )


# ------------------------------------------------------------------------------ text (GRPO)


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Elementwise KL(πθ‖πref) estimate from log-probs of the sampled tokens.

    With log r = ref_logprobs − logprobs: k1 = −log r, k2 = ½(log r)², k3 = exp(log r) − 1 − log r.
    Shapes: any, equal; returns the same shape (fp32).
    """
    fn = get_kl(kind)
    return fn(ref_logprobs.float() - logprobs.float())


def aggregate(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean", max_len: int | None = None,
              normalizer: float | Tensor | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar with mode `agg` over `mask` (B, T).

    `normalizer` replaces the local token or sequence count (see `agg_normalizer`) so that
    data-parallel shards and micro-batches can divide by the global count.
    """
    fn = get_agg(agg)
    return fn(loss_mat, mask.to(loss_mat.dtype), loss_mat.shape[-1] if max_len is None else max_len, normalizer)


def agg_normalizer(mask: Tensor, agg: str) -> float:
    """The count `agg` divides by for this (B, T) mask: answer tokens or sequences."""
    get_agg(agg)
    return float(mask.sum()) if _AGG_UNITS[agg] == "tokens" else float(mask.shape[0])


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
              max_len: int | None = None, normalizer: float | Tensor | None = None) -> Tensor:
    """PPO-clip surrogate over answer tokens, negated for minimisation (docs/design.md#text-objective).

    logprobs, old_logprobs, mask: (B, T); advantages: (B,). `max_len` is the divisor of
    `seq-mean-token-sum-norm` (default T). Returns a scalar.
    """
    return grpo_loss_terms(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg,
                           max_len, normalizer).loss


def grpo_loss_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
                    max_len: int | None = None, normalizer: float | Tensor | None = None) -> GrpoTerms:
    """`grpo_loss` plus clip fractions and ratio statistics (see `GrpoTerms`)."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: logprobs {tuple(logprobs.shape)}, old "
                         f"{tuple(old_logprobs.shape)}, mask {tuple(mask.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,)={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    mask_f = mask.float()
    ratio = torch.exp(logprobs.float() - old_logprobs.float())  # (B, T)
    adv = advantages.float().unsqueeze(-1)  # (B, 1)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(-adv * ratio, -adv * clipped)
    loss = aggregate(loss_mat, mask_f, agg, max_len, normalizer)
    with torch.no_grad():
        low = ((adv < 0) & (ratio < 1.0 - clip_low)).float()
        high = ((adv > 0) & (ratio > 1.0 + clip_high)).float()
        stats = _masked_ratio_stats(ratio, mask_f)
        n = _at_least_one(mask_f.sum())
        return GrpoTerms(loss, (low * mask_f).sum() / n, (high * mask_f).sum() / n, *stats)


# ------------------------------------------------------------------------------ image (FlowGRPO)


def flow_grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                   adv_clip: float = 5.0) -> Tensor:
    """Clipped FlowGRPO surrogate of one trained step, averaged over the batch.

    Formula: docs/design.md#image-objective.
    log_prob, old_log_prob, advantages: (B,). Advantages are clipped to ±adv_clip first.
    The KL term is added by the caller with its own coefficient.
    """
    return flow_grpo_loss_terms(log_prob, old_log_prob, advantages, clip_range, adv_clip).loss


def flow_grpo_loss_terms(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                         adv_clip: float = 5.0) -> FlowGrpoTerms:
    """`flow_grpo_loss` plus clip fraction and ratio statistics."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.dim() != 1:
        raise ValueError(f"expected equal (B,) shapes, got {tuple(log_prob.shape)}, "
                         f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}")
    adv = clip_advantages(advantages.float(), adv_clip)
    ratio = torch.exp(log_prob.float() - old_log_prob.float())
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clip_frac = (clipped > unclipped).float().mean()
        return FlowGrpoTerms(loss, clip_frac, ratio.mean(), ratio.min(), ratio.max())


def flow_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample KL between the policy's and the reference's SDE step Gaussians (same std).

    mean((μθ − μref)²) / (2·std²) with the mean over all non-batch elements.
    mean, ref_mean: (B, ...); std: float, (B,) or broadcastable to mean. Returns (B,) fp32.
    """
    sq = (mean.float() - ref_mean.float()).square().flatten(1).mean(1)  # (B,)
    return sq / (2.0 * _per_sample(std, sq).square())


def velocity_kl(velocity: Tensor, ref_velocity: Tensor) -> Tensor:
    """Per-sample mean((vθ − vref)²): the KL proxy of the no-CFG variant. (B, ...) -> (B,)."""
    return (velocity.float() - ref_velocity.float()).square().flatten(1).mean(1)


# ------------------------------------------------------------------------------ helpers


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size {group_size} must be >= 1 and divide N={rewards.shape[0]}")
    return rewards.float().reshape(-1, group_size)


def _at_least_one(x: float | Tensor) -> float | Tensor:
    return x.clamp(min=1.0) if isinstance(x, Tensor) else max(float(x), 1.0)


def _per_sample(std: Tensor | float, like: Tensor) -> Tensor:
    std_t = torch.as_tensor(std, dtype=torch.float32, device=like.device)
    if std_t.numel() == 1:
        return std_t.reshape(())
    if std_t.numel() == like.shape[0]:
        return std_t.reshape(-1)
    raise ValueError(f"std must be a scalar or hold one value per sample ({like.shape[0]}), "
                     f"got shape {tuple(std_t.shape)}")


def _masked_ratio_stats(ratio: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    sel = ratio[mask > 0]
    if sel.numel() == 0:
        one = ratio.new_tensor(1.0)
        return one, one, one
    return sel.mean(), sel.min(), sel.max()
