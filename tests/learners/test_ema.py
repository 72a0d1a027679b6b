"""EMA and parameter snapshots (learners.ema) on a small module, with hand-computed values."""

import pytest
import torch

from learners.ema import ParameterShadow, check_supported, ema_update, warmed_up_decay


def _module() -> torch.nn.Module:
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.bias.copy_(torch.tensor([4.0]))
    return m


def test_ema_update_hand_values():
    avg = torch.tensor([1.0, 2.0])
    ema_update(avg, torch.tensor([3.0, 6.0]), 0.75)  # 0.75·[1,2] + 0.25·[3,6] = [1.5, 3]
    assert avg.tolist() == [1.5, 3.0]
    ema_update(avg, torch.tensor([3.0, 6.0]), 0.0)
    assert avg.tolist() == [3.0, 6.0]
    with pytest.raises(ValueError, match="decay"):
        ema_update(avg, avg, 1.0)


def test_warmed_up_decay_hand_values():
    assert warmed_up_decay(0.99, 0) == pytest.approx(1 / 10)  # the first update mostly copies the weights
    assert warmed_up_decay(0.99, 8) == pytest.approx(9 / 18)
    assert warmed_up_decay(0.5, 8) == 0.5 and warmed_up_decay(0.0, 3) == 0.0  # never above the configured decay
    assert warmed_up_decay(0.99, 890) == pytest.approx(891 / 900) and warmed_up_decay(0.99, 891) == 0.99
    with pytest.raises(ValueError, match="updates_done must be >= 0, got -1"):
        warmed_up_decay(0.9, -1)
    with pytest.raises(ValueError, match="decay must be in"):
        warmed_up_decay(1.0, 0)


def test_shadow_tracks_two_updates_and_swaps_exactly():
    m = _module()
    ema = ParameterShadow(m)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[3.0, 2.0]]))
    ema.ema_step(m, 0.5)  # weight [2, 2], bias 4
    with torch.no_grad():
        m.bias.copy_(torch.tensor([8.0]))
    ema.ema_step(m, 0.5)  # weight [2.5, 2], bias 6
    assert ema.tensors["weight"].tolist() == [[2.5, 2.0]]
    assert ema.tensors["bias"].tolist() == [6.0]
    live = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.swapped_in(m):
        assert m.weight.tolist() == [[2.5, 2.0]] and m.bias.tolist() == [6.0]
        assert float(m(torch.tensor([[1.0, 1.0]])).detach()) == 2.5 + 2.0 + 6.0
    for k, v in m.state_dict().items():
        assert torch.equal(v, live[k])
    with pytest.raises(RuntimeError, match="not swapped in"):
        ema.swap_out(m)


def test_only_trained_parameters_and_state_round_trip():
    m = _module()
    m.bias.requires_grad_(False)  # e.g. a frozen base under LoRA
    shadow = ParameterShadow(m)
    assert list(shadow.tensors) == ["weight"]
    saved = shadow.state_dict()
    with torch.no_grad():
        m.weight.add_(1.0)
    shadow.copy_from(m)
    assert shadow.tensors["weight"].tolist() == [[2.0, 3.0]]
    shadow.load_state_dict(saved)
    assert shadow.tensors["weight"].tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="missing"):
        shadow.load_state_dict({})


def test_zero3_refused():
    check_supported(2, "the EMA")
    with pytest.raises(ValueError, match="zero_stage 0, 1 or 2"):
        check_supported(3, "the EMA")
