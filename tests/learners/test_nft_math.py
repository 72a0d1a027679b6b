"""DiffusionNFT's loss against hand-computed values (learners.nft_math)."""

import pytest
import torch

from learners.nft_math import (
    implicit_policies,
    nft_loss_terms,
    noised_latents,
    optimality_probability,
)

# One sample of two elements: x0 = [1, 2], ε = [3, 0], t = 0.5 -> x_t = [2, 1], target ε − x0 = [2, −2].
X0 = torch.tensor([[1.0, 2.0]])
EPS = torch.tensor([[3.0, 0.0]])
T = torch.tensor([0.5])
V_OLD = torch.tensor([[1.0, 0.0]])
V_THETA = torch.tensor([[3.0, 0.0]])


def test_forward_process_and_target():
    x_t, target = noised_latents(X0, EPS, T)
    assert x_t.tolist() == [[2.0, 1.0]]
    assert target.tolist() == [[2.0, -2.0]]


def test_optimality_probability_clips_to_unit_interval():
    r = optimality_probability(torch.tensor([2.5, -10.0, 0.0, 5.0]), 5.0)
    assert r.tolist() == [0.75, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="scale"):
        optimality_probability(torch.zeros(1), 0.0)


def test_implicit_policies_hand_values():
    pos, neg = implicit_policies(V_THETA, V_OLD, 0.5)  # (1−β)·v_old + β·v, (1+β)·v_old − β·v
    assert pos.tolist() == [[2.0, 0.0]]
    assert neg.tolist() == [[0.0, 0.0]]


def test_velocity_weighting_hand_value():
    # ℓ⁺ = mean(([2,0] − [2,−2])²) = 2, ℓ⁻ = mean(([0,0] − [2,−2])²) = 4, r = 0.75 (A = 2.5, Z = 5)
    # loss = (5 / 0.5)·(0.75·2 + 0.25·4) = 25
    terms = nft_loss_terms(V_THETA, V_OLD, X0, EPS, T, torch.tensor([2.5]), 0.5, 5.0, "velocity")
    assert terms.positive_loss.tolist() == [2.0]
    assert terms.negative_loss.tolist() == [4.0]
    assert terms.loss.tolist() == [25.0]
    assert terms.old_deviate.tolist() == [2.0]  # mean(([3,0] − [1,0])²)


def test_adaptive_weighting_hand_value():
    # x̂0⁺ = x_t − t·v⁺ = [1, 1]: diff [0, −1], mean sq 0.5 / mean abs 0.5 = 1
    # x̂0⁻ = x_t − t·v⁻ = [2, 1]: diff [1, −1], mean sq 1 / mean abs 1 = 1 -> loss = 10·(0.75 + 0.25) = 10
    terms = nft_loss_terms(V_THETA, V_OLD, X0, EPS, T, torch.tensor([2.5]), 0.5, 5.0, "adaptive")
    assert terms.positive_loss.tolist() == [1.0]
    assert terms.negative_loss.tolist() == [1.0]
    assert terms.loss.tolist() == [10.0]


def test_at_the_old_policy_loss_ignores_r_and_gradient_follows_it():
    """v_θ = v_old: v⁺ = v⁻, so the loss is the same for every r and old_deviate is 0; the gradient is
    2β(2r − 1)(v_old − v)/n·(adv_clip/β) per element (velocity weighting): towards the target for r > ½."""
    losses = []
    for adv in (-5.0, 0.0, 5.0):
        v = V_OLD.clone().requires_grad_(True)
        terms = nft_loss_terms(v, V_OLD, X0, EPS, T, torch.tensor([adv]), 0.5, 5.0, "velocity")
        terms.loss.sum().backward()
        losses.append(float(terms.loss.detach()))
        assert terms.old_deviate.tolist() == [0.0]
        r = (adv / 5.0) / 2 + 0.5
        # (v_old − target) = [1 − 2, 0 + 2] = [−1, 2]; n = 2; scale adv_clip/β = 10
        expected = [10 * 2 * 0.5 * (2 * r - 1) * d / 2 for d in (-1.0, 2.0)]
        assert v.grad.tolist() == [pytest.approx(expected)]
    assert losses == [losses[0]] * 3
    assert losses[0] == pytest.approx(10 * 2.5)  # (adv_clip/β)·mean([1, 4])


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        nft_loss_terms(V_THETA, V_OLD[:, :1], X0, EPS, T, torch.zeros(1), 0.5, 5.0)
    with pytest.raises(ValueError, match="weighting"):
        nft_loss_terms(V_THETA, V_OLD, X0, EPS, T, torch.zeros(1), 0.5, 5.0, "other")
    with pytest.raises(ValueError, match="beta"):
        implicit_policies(V_THETA, V_OLD, 0.0)
    with pytest.raises(ValueError, match=r"t must be \(B,\)"):
        noised_latents(X0, EPS, torch.tensor([0.5, 0.5]))
