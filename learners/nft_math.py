"""DiffusionNFT's objective as pure tensor functions (Zheng et al. 2025, arXiv 2509.16117).

DiffusionNFT trains on the forward process: only the final clean latents x0 of the rollouts and
their rewards are needed, never the sampler's steps or log-probs, so any solver (our ODE) works and
no CFG is used in training. With x_t = (1 − t)·x0 + t·ε and the flow-matching target
v = ε − x0, the paper's loss is

    L(θ) = E_{c, x0 ~ π_old, t} [ r·‖v⁺_θ(x_t) − v‖² + (1 − r)·‖v⁻_θ(x_t) − v‖² ]

with the implicit positive and negative policies

    v⁺_θ = (1 − β)·v_old + β·v_θ,        v⁻_θ = (1 + β)·v_old − β·v_θ,

and the optimality probability r = ½ + ½·clip((R − E_old R) / Z, −1, 1). Its minimiser is
v* = v_old + (2/β)·Δ with Δ the direction from the old policy towards the positive samples.
v_old is the policy that drew the rollouts (held frozen, no gradient).

The official implementation (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py) writes the same loss in
x0-prediction form with a per-sample adaptive weight, and scales it by adv_clip/β:

    x̂0± = x_t − t·v±,   ℓ± = mean((x̂0± − x0)²) / sg(max(mean|x̂0± − x0|, 1e-5)),
    loss = (adv_clip / β)·[r·ℓ⁺ + (1 − r)·ℓ⁻],   r = clamp(clip(A, ±adv_clip)/adv_clip/2 + ½, 0, 1).

Since x̂0 − x0 = t·(v − (ε − x0)), the plain weighting ("velocity") is the paper's formula scaled
the same way: ℓ± = mean((v± − v)²). Both are here (`weighting`); "adaptive" is the default, as in
the official code. At v_θ = v_old both branches coincide (v⁺ = v⁻ = v_old), so the first update's
loss does not depend on r and `old_deviate` = mean((v_θ − v_old)²) is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["NFT_WEIGHTINGS", "NftTerms", "noised_latents", "nft_loss_terms", "optimality_probability",
           "implicit_policies"]

NFT_WEIGHTINGS = ("adaptive", "velocity")
_MIN_WEIGHT = 1e-5  # floor of the adaptive weight (official code)


class NftTerms(NamedTuple):
    """Per-sample DiffusionNFT loss plus statistics (all (B,) or scalars)."""

    loss: Tensor  # (B,) (adv_clip/β)·[r·ℓ⁺ + (1 − r)·ℓ⁻], with gradient
    positive_loss: Tensor  # (B,) ℓ⁺, detached
    negative_loss: Tensor  # (B,) ℓ⁻, detached
    old_deviate: Tensor  # (B,) mean((v_θ − v_old)²), detached: 0 before the first update
    optimality: Tensor  # (B,) r


def optimality_probability(advantages: Tensor, scale: float) -> Tensor:
    """r = ½ + ½·clip(A / Z, −1, 1) ∈ [0, 1]: the paper's optimality probability from normalised
    rewards (A = R − group mean, possibly / std, as the driver computes it), Z = `scale` (the
    official code's adv_clip_max). (B,) -> (B,) fp32."""
    if scale <= 0:
        raise ValueError(f"the optimality scale Z must be > 0, got {scale}")
    return 0.5 + 0.5 * (advantages.float() / scale).clamp(-1.0, 1.0)


def implicit_policies(v_theta: Tensor, v_old: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(v⁺, v⁻) = ((1 − β)·v_old + β·v_θ, (1 + β)·v_old − β·v_θ); v_old is detached. Same shapes."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    old = v_old.detach().float()
    v = v_theta.float()
    return (1.0 - beta) * old + beta * v, (1.0 + beta) * old - beta * v


def noised_latents(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Forward process of rectified flow: x_t = (1 − t)·x0 + t·ε and target v = ε − x0.

    x0, noise: (B, ...); t: (B,) in [0, 1]. Returns (x_t, v_target), fp32, shaped like x0.
    """
    tb = _per_sample(t, x0)
    x0f, eps = x0.float(), noise.float()
    return (1.0 - tb) * x0f + tb * eps, eps - x0f


def nft_loss_terms(v_theta: Tensor, v_old: Tensor, x0: Tensor, noise: Tensor, t: Tensor, advantages: Tensor,
                   beta: float, adv_clip: float, weighting: str = "adaptive") -> NftTerms:
    """DiffusionNFT loss of a batch of (image, t) items, per item (see the module docstring).

    v_theta: (B, ...) the trained model's velocity at x_t = `noised_latents(x0, noise, t)[0]`
    (with gradient); v_old: (B, ...) the rollout policy's there; x0, noise: (B, ...); t: (B,);
    advantages: (B,) (clipped to ±adv_clip inside r). weighting: "adaptive" (official code) or
    "velocity" (plain ‖v± − (ε − x0)‖²). Returns `NftTerms`.
    """
    if weighting not in NFT_WEIGHTINGS:
        raise ValueError(f"unknown NFT weighting {weighting!r}; known: {list(NFT_WEIGHTINGS)}")
    if not (v_theta.shape == v_old.shape == x0.shape == noise.shape):
        raise ValueError(f"shapes differ: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, "
                         f"x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}")
    r = optimality_probability(advantages, adv_clip).to(v_theta.device)
    v_pos, v_neg = implicit_policies(v_theta, v_old, beta)
    x_t, target = noised_latents(x0, noise, t)
    if weighting == "adaptive":
        tb = _per_sample(t, x0)
        pos = _adaptive_mse(x_t - tb * v_pos, x0.float())
        neg = _adaptive_mse(x_t - tb * v_neg, x0.float())
    else:
        pos = (v_pos - target).square().flatten(1).mean(1)
        neg = (v_neg - target).square().flatten(1).mean(1)
    loss = (adv_clip / beta) * (r * pos + (1.0 - r) * neg)
    with torch.no_grad():
        deviate = (v_theta.float() - v_old.float()).square().flatten(1).mean(1)
    return NftTerms(loss, pos.detach(), neg.detach(), deviate, r)


def _adaptive_mse(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """mean((x̂0 − x0)²) / sg(max(mean|x̂0 − x0|, 1e-5)) per sample. (B, ...) -> (B,)."""
    diff = x0_pred - x0
    with torch.no_grad():
        weight = diff.double().abs().flatten(1).mean(1).clamp(min=_MIN_WEIGHT).to(diff.dtype)
    return diff.square().flatten(1).mean(1) / weight


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like` (B, ...), fp32."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be (B,)=({like.shape[0]},), got shape {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.dim() - 1)))
