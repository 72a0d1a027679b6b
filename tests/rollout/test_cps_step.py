"""Coefficients-preserving step (CPS): hand-computed values, ODE limit, marginals, scoring.

Design: docs/design.md#sde-step.
"""

import math

import pytest
import torch

from rollout.flow_sde import SDE_KINDS, cps_step, get_sde_step, sde_step

# sigma .5 -> .25 for x = [1, 2], v = [.5, -1]: x0_hat = x − .5·v = [.75, 2.5],
# eps_hat = x + .5·v = [1.25, 1.5]; (1 − σ')·x0_hat = [.5625, 1.875].
X = torch.tensor([[1.0, 2.0]])
V = torch.tensor([[0.5, -1.0]])


def test_cps_full_noise_matches_hand_computed_values():
    # eta = 1: cos = 0, sin = 1: mean = .75·x0_hat = [.5625, 1.875], std = σ' = .25
    prev = torch.tensor([[0.5625 + 0.25, 1.875]])  # one std above the mean, then the mean
    out = cps_step(V, 0.5, 0.25, X, 1.0, prev_sample=prev)
    torch.testing.assert_close(out.mean, torch.tensor([[0.5625, 1.875]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.std, torch.tensor([[0.25]]), rtol=0, atol=1e-7)
    expected = -0.25 + math.log(4.0) - 0.5 * math.log(2 * math.pi)  # mean of (−½ − log .25, −log .25) − ½ log 2π
    assert out.log_prob.shape == (1,)
    assert abs(out.log_prob.item() - expected) < 1e-6
    assert torch.equal(out.prev_sample, prev)


def test_cps_partial_noise_matches_hand_computed_values():
    # eta = 1/3: angle π/6, sin = .5, cos = √3/2: std = .125,
    # mean = [.5625 + .25·(√3/2)·1.25, 1.875 + .25·(√3/2)·1.5]
    half_sqrt3 = math.sqrt(3) / 2
    hand_mean = torch.tensor([[0.5625 + 0.25 * half_sqrt3 * 1.25, 1.875 + 0.25 * half_sqrt3 * 1.5]])
    out = cps_step(V, 0.5, 0.25, X, 1 / 3, prev_sample=hand_mean)
    torch.testing.assert_close(out.mean, hand_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.std, torch.tensor([[0.125]]), rtol=0, atol=1e-7)
    expected = math.log(8.0) - 0.5 * math.log(2 * math.pi)  # at the mean: −log .125 − ½ log 2π
    assert abs(out.log_prob.item() - expected) < 1e-5


def test_cps_at_sigma_one_has_no_singularity():
    # sigma 1 -> .75, eta = 1: x0_hat = x − v, mean = .25·(x − v), std = .75
    x, v = torch.tensor([[2.0, -4.0]]), torch.tensor([[1.0, 3.0]])
    out = cps_step(v, 1.0, 0.75, x, 1.0, prev_sample=x)
    torch.testing.assert_close(out.mean, torch.tensor([[0.25, -1.75]]))
    torch.testing.assert_close(out.std, torch.tensor([[0.75]]))
    assert torch.isfinite(out.log_prob).all()


def test_cps_noise_level_zero_is_the_ode_step_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 16, 64, generator=gen), torch.randn(3, 16, 64, generator=gen)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.55)
    out = cps_step(v, sigma, sigma_next, x, 0.0)
    assert torch.equal(out.prev_sample, x + v * (sigma_next - sigma))
    assert torch.equal(out.prev_sample, sde_step(v, sigma, sigma_next, x, 0.0).prev_sample)
    assert torch.equal(out.log_prob, torch.zeros(3))
    # a tiny level gives the same mean up to rounding: the two forms of the mean agree
    torch.testing.assert_close(cps_step(v, sigma, sigma_next, x, 1e-8).mean, out.mean, rtol=0, atol=1e-5)


def test_cps_per_row_noise_levels_and_the_last_step():
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    out = cps_step(v, 0.6, 0.4, x, torch.tensor([0.0, 0.7]), generator=gen)
    assert torch.equal(out.prev_sample[0], x[0] + v[0] * (torch.tensor(0.4) - torch.tensor(0.6)))
    assert not torch.allclose(out.prev_sample[1], out.mean[1])
    assert out.log_prob[0] == 0 and out.log_prob[1] != 0
    last = cps_step(v, 0.2, 0.0, x, 1.0, generator=gen)  # σ' = 0: the x0 prediction, no density
    torch.testing.assert_close(last.prev_sample, x - 0.2 * v)
    assert torch.equal(last.log_prob, torch.zeros(2))


def test_cps_keeps_the_marginal_std_where_flow_grpo_does_not():
    """A known x0 (a point mass, so the velocity v = (x − x0)/σ is exact): x_σ' must have std σ'.
    CPS with η = 1 keeps it; FlowGRPO's step with a = 1.5 (η = 1 ↔ a = 1.5 in the ShapesWorld runs)
    overshoots by far. 20000 draws per element: the std's sampling error is ~0.5 %."""
    gen = torch.Generator().manual_seed(2)
    n, x0 = 20000, 0.3
    for sigma, sigma_next in ((1.0, 0.8), (0.9, 0.7), (0.6, 0.4)):
        eps = torch.randn(n, 4, generator=gen)
        x = (1 - sigma) * x0 + sigma * eps
        v = eps - x0
        cps = cps_step(v, sigma, sigma_next, x, 1.0, generator=gen).prev_sample
        fg = sde_step(v, sigma, sigma_next, x, 1.5, generator=gen).prev_sample
        cps_std, fg_std = cps.std(dim=0), fg.std(dim=0)
        assert ((cps_std - sigma_next).abs() / sigma_next).max() < 0.03, (sigma, cps_std)
        assert ((cps.mean(dim=0) - (1 - sigma_next) * x0).abs()).max() < 0.03
        assert (fg_std / sigma_next).min() > 1.5, (sigma, fg_std)  # measured 1.9–3.6x


def test_cps_sample_then_score_round_trips():
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 3, 5, generator=gen), torch.randn(4, 3, 5, generator=gen)
    sampled = cps_step(v, 0.9, 0.8, x, 0.7, generator=gen)
    rescored = cps_step(v.clone(), 0.9, 0.8, x.clone(), 0.7, prev_sample=sampled.prev_sample.clone())
    torch.testing.assert_close(rescored.log_prob, sampled.log_prob, rtol=0, atol=0)
    noise = torch.randn(4, 3, 5, generator=gen)
    given = cps_step(v, 0.9, 0.8, x, 0.7, noise=noise)
    torch.testing.assert_close(given.prev_sample, given.mean + given.std * noise)


def test_cps_log_prob_has_a_gradient_through_the_velocity():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, generator=gen)
    v = torch.randn(2, 6, generator=gen, requires_grad=True)
    prev = cps_step(v.detach(), 0.5, 0.4, x, 0.8, generator=gen).prev_sample
    cps_step(v, 0.5, 0.4, x, 0.8, prev_sample=prev).log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_cps_rejects_bad_noise_levels_shapes_and_sigmas():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cps_step(x, 0.5, 0.4, x, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cps_step(x, 0.5, 0.4, x, torch.tensor([0.2, -0.1]))
    with pytest.raises(ValueError, match="velocity shape"):
        cps_step(torch.zeros(2, 4), 0.5, 0.4, x, 0.7)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        cps_step(x, 0.4, 0.5, x, 0.7)


def test_get_sde_step_by_name():
    assert SDE_KINDS == ("flow_grpo", "cps")
    assert get_sde_step("flow_grpo") is sde_step and get_sde_step("cps") is cps_step
    with pytest.raises(ValueError, match="unknown SDE kind 'ddim'"):
        get_sde_step("ddim")
