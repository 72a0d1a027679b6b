"""Pickle-free checkpoint trees round-trip exactly, including optimizer states and RNG."""

import random

import numpy as np
import pytest
import torch

from rollout.state_io import load_tree, rng_state, save_tree, set_rng_state


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_tree({"opt": opt.state_dict(), "step": 3, "name": "x", "t": (1, 2.5), "arr": np.arange(4)}, tmp_path)
    back = load_tree(tmp_path)
    assert back["step"] == 3 and back["t"] == (1, 2.5) and back["name"] == "x"
    np.testing.assert_array_equal(back["arr"], np.arange(4))
    state = opt.state_dict()
    assert set(back["opt"]["state"]) == set(state["state"])  # int keys survive
    for k, v in state["state"].items():
        for name, t in v.items():
            assert torch.equal(back["opt"]["state"][k][name], t)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])
    assert opt2.state_dict()["param_groups"] == state["param_groups"]


def test_rng_state_restores_all_three(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_tree(rng_state(), tmp_path, "rng")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_tree(tmp_path, "rng"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_refuses_objects_that_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        save_tree({"f": object()}, tmp_path)
