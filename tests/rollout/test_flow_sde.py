"""FlowGRPO SDE step: hand-computed values, ODE limit, sampling statistics, scoring.

Design: docs/design.md#sde-step.
"""

import math

import pytest
import torch

from rollout.flow_sde import (
    calculate_shift,
    sde_step,
    sigma_schedule,
    stochastic_step_indices,
)


def test_sde_step_matches_hand_computed_values():
    # sigma .5 -> .25, a = .5: s_t = .5, dt = -.25, coef_x = .9375, coef_v·dt = -.28125, std = .25
    x = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[0.5, -1.0]])
    prev = torch.tensor([[0.796875 + 0.25, 2.15625]])  # one std above the mean, then the mean
    out = sde_step(v, 0.5, 0.25, x, 0.5, prev_sample=prev)
    torch.testing.assert_close(out.mean, torch.tensor([[0.796875, 2.15625]]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out.std, torch.tensor([[0.25]]), rtol=0, atol=1e-7)
    expected = -0.25 + math.log(4.0) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.shape == (1,)
    assert abs(out.log_prob.item() - expected) < 1e-6
    assert torch.equal(out.prev_sample, prev)


def test_sde_step_at_sigma_one_uses_next_sigma_in_denominator():
    # sigma 1 -> .75, a = 1: s_t = sqrt(1 / (1 - .75)) = 2, coef_x = .5, coef_v = 1, std = 1
    x = torch.tensor([[2.0, -4.0]])
    v = torch.tensor([[1.0, 3.0]])
    out = sde_step(v, 1.0, 0.75, x, 1.0, prev_sample=x)
    torch.testing.assert_close(out.mean, torch.tensor([[1.0 - 0.25, -2.0 - 0.75]]))
    torch.testing.assert_close(out.std, torch.tensor([[1.0]]))
    assert torch.isfinite(out.log_prob).all()


def test_noise_level_zero_is_the_ode_step():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 64, generator=gen)
    v = torch.randn(3, 16, 64, generator=gen)
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.55)
    out = sde_step(v, sigma, sigma_next, x, 0.0)
    assert torch.equal(out.prev_sample, x + v * (sigma_next - sigma))
    assert torch.equal(out.prev_sample, out.mean)
    assert torch.equal(out.log_prob, torch.zeros(3))


def test_per_row_noise_level_mixes_ode_and_sde_rows():
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    out = sde_step(v, 0.6, 0.4, x, torch.tensor([0.0, 0.7]), generator=gen)
    assert torch.equal(out.prev_sample[0], x[0] + v[0] * (torch.tensor(0.4) - torch.tensor(0.6)))
    assert not torch.allclose(out.prev_sample[1], out.mean[1])
    assert out.log_prob[0] == 0 and out.log_prob[1] != 0


def test_batched_sigmas_equal_row_by_row_steps():
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    prev = torch.randn(3, 5, 4, generator=gen)
    sigmas, sigmas_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.0])
    batched = sde_step(v, sigmas, sigmas_next, x, 0.7, prev_sample=prev)
    for i in range(3):
        row = sde_step(
            v[i : i + 1], float(sigmas[i]), float(sigmas_next[i]), x[i : i + 1], 0.7, prev[i : i + 1]
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], row.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], row.mean)


def test_log_prob_recomputed_from_stored_latents_equals_sampled():
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 16, 64, generator=gen), torch.randn(4, 16, 64, generator=gen)
    sampled = sde_step(v, 0.9, 0.8, x, 0.7, generator=gen)
    rescored = sde_step(v.clone(), 0.9, 0.8, x.clone(), 0.7, prev_sample=sampled.prev_sample.clone())
    assert (sampled.log_prob - rescored.log_prob).abs().max() < 1e-6
    normal = torch.distributions.Normal(sampled.mean, sampled.std.expand_as(sampled.mean))
    reference = normal.log_prob(sampled.prev_sample).mean(dim=(1, 2))
    assert (reference - sampled.log_prob).abs().max() < 1e-5


def test_log_prob_is_differentiable_in_the_velocity():
    gen = torch.Generator().manual_seed(4)
    x, v = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    prev = sde_step(v.detach(), 0.5, 0.4, x, 1.0, generator=gen).prev_sample
    out = sde_step(v, 0.5, 0.4, x, 1.0, prev_sample=prev)
    out.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_empirical_moments_of_4000_draws_match_the_formula():
    gen = torch.Generator().manual_seed(5)
    x = 1.0 + torch.rand(1, 2, 3, generator=gen)
    v = torch.randn(1, 2, 3, generator=gen)
    n = 4000
    out = sde_step(v.expand(n, 2, 3), 0.7, 0.55, x.expand(n, 2, 3), 0.7, generator=gen)
    mean, std = out.mean[0], out.std[0]
    hand_sigma, dt = 0.7, -0.15
    s2 = 0.49 * hand_sigma / (1 - hand_sigma)
    hand_mean = (
        x[0] * (1 + s2 * dt / (2 * hand_sigma)) + v[0] * (1 + s2 * (1 - hand_sigma) / (2 * hand_sigma)) * dt
    )
    torch.testing.assert_close(mean, hand_mean)
    assert abs(std.item() - math.sqrt(s2 * 0.15)) < 1e-6
    emp_mean, emp_std = out.prev_sample.mean(dim=0), out.prev_sample.std(dim=0)
    assert ((emp_mean - mean).abs() / mean.abs()).max() < 0.03
    assert ((emp_std - std).abs() / std).max() < 0.03


def test_sde_step_rejects_bad_shapes_and_sigmas():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="velocity shape"):
        sde_step(torch.zeros(2, 4), 0.5, 0.4, x, 0.7)
    with pytest.raises(ValueError, match="sigma_next must be < sigma"):
        sde_step(x, 0.4, 0.5, x, 0.7)
    with pytest.raises(ValueError, match="shape \\[2\\]"):
        sde_step(x, torch.tensor([0.5, 0.5, 0.5]), 0.4, x, 0.7)


def test_calculate_shift_endpoints():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx(0.825)


def test_sigma_schedule_hand_values():
    torch.testing.assert_close(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(sigma_schedule(4, shift=3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(sigma_schedule(4, mu=0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(sigma_schedule(2, mu=math.log(2.0)), torch.tensor([1.0, 2.0 / 3.0, 0.0]))
    assert sigma_schedule(1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)


def test_stochastic_step_indices_modes():
    assert stochastic_step_indices("all", 6) == [0, 1, 2, 3, 4]
    assert stochastic_step_indices("none", 6) == []
    picks = {stochastic_step_indices("one", 8, 2, 5, torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert picks == {2, 3, 4}
    same = [stochastic_step_indices("one", 8, 0, 8, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same[0] == same[1]


@pytest.mark.parametrize("lo,hi", [(-1, 2), (3, 3), (0, 9)])
def test_stochastic_step_indices_rejects_bad_windows(lo, hi):
    with pytest.raises(ValueError, match="window"):
        stochastic_step_indices("one", 8, lo, hi)


def test_stochastic_step_indices_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown stochastic mode 'some'"):
        stochastic_step_indices("some", 8)
