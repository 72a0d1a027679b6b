"""Sender mixin -> torch receiver over a real localhost gloo group, in one process (threads).

No Ray, no DeepSpeed engine: a plain module stands in for `engine.module` (the ZeRO-3 path runs
in tests/learners/test_weight_sync.py). Seconds to run.
"""

from __future__ import annotations

import pytest
import torch

from learners.weight_sync import _check_versions as check_versions
from learners.weight_sync import make_weight_sync
from tests.learners.sync_doubles import Receiver, Sender, run_together


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)], torch.nn.LayerNorm(16))


@pytest.mark.parametrize("mode", ["bucketed", "per_param"])
def test_broadcast_reaches_every_receiver(mode, free_port):
    sender = Sender(_net(0))
    receivers = [Receiver(_net(1)), Receiver(_net(2))]
    port = free_port()
    run_together(lambda: sender.init_weight_group("127.0.0.1", port, 3),
             *[lambda r=r, i=i: r.join_weight_group("127.0.0.1", port, i + 1, 3) for i, r in enumerate(receivers)])
    bucket_mb = 2 * 16 * 17 * 4 / 2**20  # two Linear layers per bucket
    meta = sender.weight_bucket_meta(bucket_mb)
    assert len(meta) == 4  # 6 linears in pairs + the LayerNorm
    want = sender.weights_checksum()
    assert all(r.weights_checksum() != want for r in receivers)
    stats, *versions = run_together(lambda: sender.broadcast_weights(7, bucket_mb, mode),
                                *[lambda r=r: r.receive_weights(7, meta, mode) for r in receivers])
    assert versions == [7, 7] and stats["buckets"] == 4
    assert stats["bytes"] == 4 * sum(p.numel() for p in sender.engine.module.parameters())
    for r in receivers:
        assert r.weights_checksum() == pytest.approx(want, rel=1e-12)
        for (n, p), (_, q) in zip(sender.engine.module.named_parameters(), r.transformer.named_parameters(),
                                  strict=True):
            assert torch.equal(p, q), n


def test_object_store_bytes_round_trip():
    sender, receiver = Sender(_net(0)), Receiver(_net(3))
    assert receiver.load_weights_bytes(4, sender.export_weights_bytes()) == 4
    assert receiver.weights_checksum() == pytest.approx(sender.weights_checksum(), rel=1e-12)


def test_receiver_refuses_a_module_it_cannot_fully_update():
    sender, receiver = Sender(torch.nn.Linear(4, 4)), Receiver(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="does not have"):
        receiver.load_weights_bytes(1, sender.export_weights_bytes())


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="object_store"):
        make_weight_sync("nccl-ipc")
    with pytest.raises(ValueError, match="bucket_mb"):
        make_weight_sync("broadcast", bucket_mb=0)
    with pytest.raises(ValueError, match="mode"):
        Sender(_net(0)).broadcast_weights(1, mode="whole")
    with pytest.raises(ValueError, match="init_weight_group"):
        Sender(_net(0)).broadcast_weights(1)
    with pytest.raises(ValueError, match="join_weight_group"):
        Receiver(_net(0)).receive_weights(1, [])
    with pytest.raises(RuntimeError, match=r"\(1, 3\)"):
        check_versions([5, 3], 5)


def test_receiver_counts_its_own_load_seconds_also_when_a_load_fails():
    sender, receiver = Sender(_net(0)), Receiver(_net(3))
    assert receiver.weight_load_seconds() == 0.0
    receiver.load_weights_bytes(1, sender.export_weights_bytes())
    after_one = receiver.weight_load_seconds()
    assert after_one > 0.0
    with pytest.raises(ValueError, match="does not have"):
        receiver.load_weights_bytes(2, Sender(torch.nn.Linear(3, 3)).export_weights_bytes())
    assert receiver.weight_load_seconds() > after_one
