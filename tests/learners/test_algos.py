"""Every formula of learners/algos.py against values computed by hand on 2×3 tensors."""

import math

import pytest
import torch

from learners import algos, logprobs
from learners.algos import (
    agg_normalizer,
    aggregate,
    clip_advantages,
    flow_grpo_loss,
    flow_grpo_loss_terms,
    flow_kl,
    group_advantages,
    grpo_loss,
    grpo_loss_terms,
    kl_estimate,
    velocity_kl,
    zero_variance_groups,
)
from learners.logprobs import token_logprobs

REWARDS = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two groups of 3


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),
                               torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------ advantages


def test_group_advantages_no_std():
    # group means 3 and 1
    close(group_advantages(REWARDS, 3), [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])


def test_group_advantages_group_std():
    s1, s2 = math.sqrt(14 / 3), math.sqrt(2.0)  # population stds of (1,2,6) and (0,0,3)
    close(group_advantages(REWARDS, 3, std="group", eps=0.0),
          [-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2])


def test_group_advantages_global_std():
    s = math.sqrt(26 / 6)  # population std of all six rewards (mean 2)
    close(group_advantages(REWARDS, 3, std="global", eps=0.0),
          [-2 / s, -1 / s, 3 / s, -1 / s, -1 / s, 2 / s])


def test_group_advantages_eps_keeps_constant_group_finite():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]), 3, std="group")
    close(adv[:3], [0.0, 0.0, 0.0])
    assert torch.isfinite(adv).all()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match="known"):
        group_advantages(REWARDS, 3, std="batch")


def test_clip_advantages():
    close(clip_advantages(torch.tensor([-7.0, 2.0, 6.0]), 5.0), [-5.0, 2.0, 5.0])
    with pytest.raises(ValueError):
        clip_advantages(torch.tensor([1.0]), 0.0)


def test_zero_variance_groups():
    z = zero_variance_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), 3)
    assert z.group_mask.tolist() == [True, False]
    assert z.sample_mask.tolist() == [True] * 3 + [False] * 3
    assert z.count == 1 and z.fraction == 0.5
    assert zero_variance_groups(REWARDS, 3).count == 0


# ------------------------------------------------------------------ KL

LP = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -2.0, -2.5]])  # log r = [[-.5, 1, 0], [-.2, 1, -1]]


def test_kl_k1():
    close(kl_estimate(LP, REF, "k1"), [[0.5, -1.0, 0.0], [0.2, -1.0, 1.0]])


def test_kl_k2():
    close(kl_estimate(LP, REF, "k2"), [[0.125, 0.5, 0.0], [0.02, 0.5, 0.5]])


def test_kl_k3():
    close(kl_estimate(LP, REF, "k3"),
          [[0.10653066, 0.71828183, 0.0], [0.01873075, 0.71828183, 0.36787944]])


def test_kl_is_zero_at_reference():
    for kind in ("k1", "k2", "k3"):
        close(kl_estimate(LP, LP, kind), torch.zeros(2, 3))


# ------------------------------------------------------------------ GRPO

RATIO = torch.tensor([[1.0, 1.5, 0.5], [0.7, 1.1, 2.0]])
OLD = torch.zeros(2, 3)
NEW = RATIO.log()
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
# per-token surrogate with clip 0.2: row 0 (A=1): -1, -1.2, [masked]; row 1 (A=-2): 1.6, 2.2, 4.0


def test_grpo_token_mean():
    close(grpo_loss(NEW, OLD, ADV, MASK), (-1 - 1.2 + 1.6 + 2.2 + 4.0) / 5)


def test_grpo_seq_mean_token_mean():
    close(grpo_loss(NEW, OLD, ADV, MASK, agg="seq-mean-token-mean"), (-2.2 / 2 + 7.8 / 3) / 2)


def test_grpo_seq_mean_token_sum_norm():
    close(grpo_loss(NEW, OLD, ADV, MASK, agg="seq-mean-token-sum-norm"), (-2.2 / 3 + 7.8 / 3) / 2)
    close(grpo_loss(NEW, OLD, ADV, MASK, agg="seq-mean-token-sum-norm", max_len=4), (-2.2 / 4 + 7.8 / 4) / 2)


def test_grpo_separate_clip_low_high():
    # clip_low 0.1, clip_high 0.6: row 0: -1, -1.5; row 1: 2*max(.7,.9)=1.8, 2.2, 2*max(2,1.6)=4
    close(grpo_loss(NEW, OLD, ADV, MASK, clip_low=0.1, clip_high=0.6), (-1 - 1.5 + 1.8 + 2.2 + 4.0) / 5)


def test_grpo_clip_fractions_and_ratio_stats():
    t = grpo_loss_terms(NEW, OLD, ADV, MASK)
    close(t.clip_frac_low, 1 / 5)  # row 1, ratio 0.7 < 0.8 with A < 0
    close(t.clip_frac_high, 1 / 5)  # row 0, ratio 1.5 > 1.2 with A > 0 (the masked 0.5 ignored)
    close(t.ratio_mean, (1 + 1.5 + 0.7 + 1.1 + 2.0) / 5)
    close(t.ratio_min, 0.7)
    close(t.ratio_max, 2.0)


def test_grpo_masked_tokens_do_not_matter():
    noisy_new, noisy_old = NEW.clone(), OLD.clone()
    noisy_new[0, 2], noisy_old[0, 2] = 5.0, -9.0
    for agg in algos.AGG_MODES:
        close(grpo_loss(noisy_new, noisy_old, ADV, MASK, agg=agg), grpo_loss(NEW, OLD, ADV, MASK, agg=agg))
        lp = noisy_new.clone().requires_grad_(True)
        grpo_loss(lp, noisy_old, ADV, MASK, agg=agg).backward()
        assert lp.grad[0, 2] == 0.0


def test_grpo_gradient_sign_raises_logprob_of_good_answers():
    lp = torch.zeros(2, 3, requires_grad=True)
    grpo_loss(lp, torch.zeros(2, 3), ADV, MASK).backward()
    assert (lp.grad[0, :2] < 0).all() and (lp.grad[1] > 0).all()  # descent raises row 0, lowers row 1


def test_grpo_shards_with_global_normalizer_sum_to_full_batch():
    for agg in algos.AGG_MODES:
        full = grpo_loss(NEW, OLD, ADV, MASK, agg=agg)
        norm = agg_normalizer(MASK, agg)
        parts = [grpo_loss(NEW[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], agg=agg,
                           max_len=3, normalizer=norm) for i in range(2)]
        close(sum(parts), full)


def test_grpo_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(NEW, OLD, torch.ones(3), MASK)
    with pytest.raises(ValueError, match="shapes"):
        grpo_loss(NEW, OLD[:, :2], ADV, MASK)


def test_token_logprobs_applies_temperature():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    out = token_logprobs(logits, torch.tensor([[0, 2]]), temperature=2.0)
    close(out, [[1.0 - math.log(math.e + 2.0), -math.log(3.0)]])
    with pytest.raises(ValueError):
        token_logprobs(logits, torch.tensor([[0, 2]]), temperature=0.0)


PROBS = [0.5, 0.3, 0.15, 0.05]  # ascending cumulative sums 0.05, 0.2, 0.5, 1: no cut sits on a sum


@pytest.mark.parametrize("top_p, kept", [(0.75, 2), (0.9, 3), (1.0, 4)])
def test_token_logprobs_top_p_keeps_nucleus_and_renormalises(top_p, kept):
    logits = torch.tensor(PROBS).log().expand(1, 4, 4)  # the same distribution at 4 positions
    out = token_logprobs(logits, torch.arange(4).view(1, 4), top_p=top_p)[0]  # each token once
    mass = sum(PROBS[:kept])
    close(out[:kept], [math.log(p / mass) for p in PROBS[:kept]])
    assert torch.isneginf(out[kept:]).all()
    torch.testing.assert_close(token_logprobs(2 * logits, torch.arange(4).view(1, 4), 2.0, top_p)[0], out)


def test_token_logprobs_applies_temperature_before_the_cut():
    # at T=2 the probabilities are ∝ sqrt(PROBS) ≈ .379 .294 .207 .120: top-p 0.75 keeps three, not two
    out = token_logprobs(torch.tensor(PROBS).log().expand(1, 4, 4), torch.arange(4).view(1, 4), 2.0, 0.75)[0]
    tempered = torch.tensor(PROBS).sqrt()
    close(out[:3], (tempered[:3] / tempered[:3].sum()).log())
    assert torch.isneginf(out[3])


def test_token_logprobs_top_p_always_keeps_the_largest():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 0.0, 0.0001]]])
    # p so small that 1 − p rounds to 1 in fp32: the cumulative sum never exceeds it, yet one survives
    out = token_logprobs(logits, torch.tensor([[0, 2]]), top_p=1e-9)
    close(out, [[0.0, 0.0]])
    assert torch.isneginf(token_logprobs(logits, torch.tensor([[1, 0]]), top_p=1e-9)).all()


def test_token_logprobs_top_p_tie_at_the_cut_keeps_exactly_one():
    # vLLM settles equal logits at the cut by sort position, not by value: one of the pair survives
    out = token_logprobs(torch.tensor([[[1.0, 1.0, 0.0]]]).expand(1, 3, 3), torch.tensor([[0, 1, 2]]), top_p=0.3)[0]
    assert sorted(out[:2].tolist()) == [float("-inf"), 0.0]
    assert torch.isneginf(out[2])


def test_token_logprobs_top_p_gradient_is_that_of_the_truncated_softmax():
    logits = torch.tensor(PROBS).log().view(1, 1, 4).requires_grad_()
    token_logprobs(logits, torch.tensor([[0]]), top_p=0.9).sum().backward()
    kept = torch.tensor(PROBS[:3]) / sum(PROBS[:3])
    close(logits.grad[0, 0], torch.cat([torch.tensor([1.0, 0.0, 0.0]) - kept, torch.zeros(1)]))
    assert logits.grad[0, 0, 3] == 0  # removed token: no gradient


def test_token_logprobs_top_p_chunked_mask_equals_one_pass(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 16, generator=gen) * 2).round()  # rounding makes ties
    targets = torch.randint(0, 16, (3, 5), generator=gen)
    whole = token_logprobs(logits, targets, temperature=0.7, top_p=0.8)
    monkeypatch.setattr(logprobs, "_NUCLEUS_CHUNK_ELEMENTS", 16 * 4)  # 4 rows per chunk, ragged tail
    torch.testing.assert_close(token_logprobs(logits, targets, temperature=0.7, top_p=0.8), whole, atol=0, rtol=0)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_token_logprobs_rejects_top_p_outside_unit_interval(top_p):
    with pytest.raises(ValueError, match="top_p"):
        token_logprobs(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), top_p=top_p)


# ------------------------------------------------------------------ FlowGRPO


def test_flow_grpo_loss():
    old = torch.zeros(3)
    new = torch.tensor([1.0, 1.5, 1.5]).log()
    adv = torch.tensor([2.0, -7.0, 1.0])  # clipped to [2, -5, 1]
    # per sample: max(-2, -2) = -2; max(7.5, 6.0) = 7.5; max(-1.5, -1.2) = -1.2
    close(flow_grpo_loss(new, old, adv, clip_range=0.2), (-2 + 7.5 - 1.2) / 3)
    t = flow_grpo_loss_terms(new, old, adv, clip_range=0.2)
    close(t.clip_frac, 1 / 3)
    close(t.ratio_max, 1.5)
    # without advantage clipping the middle sample weighs 7 instead of 5
    close(flow_grpo_loss(new, old, adv, 0.2, adv_clip=10.0), (-2 + 10.5 - 1.2) / 3)


def test_flow_grpo_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([0.5, -1.0, 2.0])
    close(flow_grpo_loss(torch.full((3,), -4.0), torch.full((3,), -4.0), adv, 1e-4), -adv.mean())


def test_flow_kl_per_sample():
    mean = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    close(flow_kl(mean, ref, torch.tensor([0.5, 2.0])), [(5 / 3) / 0.5, (14 / 3) / 8])
    close(flow_kl(mean, ref, 1.0), [5 / 6, 14 / 6])
    close(velocity_kl(mean, ref), [5 / 3, 14 / 3])
    with pytest.raises(ValueError, match="std"):
        flow_kl(mean, ref, torch.ones(3))


# ------------------------------------------------------------------ registries


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        algos.register_agg("token-mean", unit="tokens")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        algos.register_kl("k3")(lambda x: x)


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match=r"known: \['k1', 'k2', 'k3'\]"):
        kl_estimate(LP, REF, "k4")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregate(NEW, MASK, "sum")


def test_new_registration_is_usable(monkeypatch):
    monkeypatch.setattr(algos, "AGG_MODES", dict(algos.AGG_MODES))
    monkeypatch.setattr(algos, "_AGG_UNITS", dict(algos._AGG_UNITS))
    algos.register_agg("token-sum", unit="tokens")(lambda m, k, L, n=None: (m * k).sum())
    close(aggregate(torch.ones(2, 3), MASK, "token-sum"), 5.0)
