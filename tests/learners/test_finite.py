"""The pure finiteness checks of `learners.finite` (hand-computed values on small tensors), and the
checkpoint refusals built on them (plain torch modules, no DeepSpeed)."""

import math

import pytest
import torch

from learners.finite import (
    NonFiniteError,
    check_finite_tensors,
    count_nonfinite,
    nonfinite_tensors,
    poison_nonfinite,
)


def test_count_nonfinite_on_tensors_and_sequences():
    t = torch.tensor([[1.0, math.nan, 2.0], [math.inf, -math.inf, 0.0]])  # 2x3
    assert count_nonfinite(t) == 3
    assert count_nonfinite(torch.tensor([1, 2, 3])) == 0  # integer tensors are finite
    assert count_nonfinite([0.5, math.nan, 1e308, -math.inf]) == 2
    assert count_nonfinite([]) == 0
    assert count_nonfinite(torch.tensor(math.nan)) == 1


def test_nonfinite_tensors_and_the_message_name_the_tensor():
    named = {"a.weight": torch.ones(2, 3), "b.bias": torch.tensor([math.nan, 1.0, math.inf]),
             "c.weight": torch.tensor([[0.0, -math.inf]]), "steps": torch.tensor([3])}
    assert nonfinite_tensors(named) == [("b.bias", 2), ("c.weight", 1)]
    with pytest.raises(NonFiniteError) as e:
        check_finite_tensors(named, "refusing to save weights to /x")
    assert str(e.value) == ("refusing to save weights to /x: tensor 'b.bias' has 2 of 3 entries NaN or ±inf "
                            "(2 tensors in all: ['b.bias', 'c.weight'])")
    assert isinstance(e.value, ValueError)
    check_finite_tensors({"a.weight": torch.ones(2, 3)}, "fine")  # no error


def test_poison_leaves_a_finite_loss_alone_and_makes_every_reached_gradient_nan():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = (w * torch.tensor([1.0, 0.0, 2.0])).sum()  # d/dw = [1, 0, 2]
    assert poison_nonfinite(loss) is loss
    poison_nonfinite(loss).backward()
    assert w.grad.tolist() == [1.0, 0.0, 2.0]
    w.grad = None
    x = torch.tensor([1.0, 0.0, 2.0])
    bad = (w * x).sum() + torch.log(torch.tensor(0.0))  # -inf loss: its gradient alone would be finite
    assert math.isinf(bad.item())
    poisoned = poison_nonfinite(bad)
    poisoned.backward()
    assert math.isnan(poisoned.item()) and all(math.isnan(g) for g in w.grad.tolist())  # also where x = 0
    with pytest.raises(ValueError, match="scalar loss"):
        poison_nonfinite(torch.zeros(2))


def test_save_hf_module_refuses_non_finite_weights_naming_the_tensor(tmp_path):
    from learners.ds_engine import save_hf_module

    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.bias[1] = math.nan
    with pytest.raises(NonFiniteError, match=r"refusing to save weights to .*: tensor 'bias' has 1 of 2 entries"):
        save_hf_module(module, tmp_path / "w", rank=1)  # every rank checks before any write
    assert not (tmp_path / "w").exists()


def test_checkpoint_weights_with_nan_or_inf_are_never_loaded(tmp_path):
    from safetensors.torch import save_file

    from learners.checkpointing import _load_module_weights

    module = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    good = {k: torch.zeros_like(v) for k, v in before.items()}
    save_file({**good, "weight": torch.full((2, 3), math.inf)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(NonFiniteError) as e:
        _load_module_weights(module, tmp_path)
    assert f"refusing to load checkpoint weights {tmp_path / 'model.safetensors'}: tensor 'weight' has 6 of 6" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing was copied
    save_file(good, str(tmp_path / "model.safetensors"))
    _load_module_weights(module, tmp_path)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in module.state_dict().values())
