"""Pure logic of the worker pools: even shards and request splitting (no Ray)."""

import pytest

from cluster.pools import shard_evenly, split_requests
from rollout.interfaces import ChatMessage, TextRequest


def test_shard_evenly_covers_everything_once():
    assert shard_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError, match="parts"):
        shard_evenly(3, 0)


def _req(n, seed):
    return TextRequest((ChatMessage("user", "x"),), n=n, seed=seed)


def test_split_requests_spreads_samples_over_workers_and_keeps_totals():
    reqs = [_req(4, 10), _req(4, None)]
    parts = split_requests(reqs, 3)
    assert len(parts) == 4  # 2 requests x 2 parts: enough for 3 workers
    assert [(i, p.n, p.seed) for i, p in parts] == [(0, 2, 10), (0, 2, 10 + 7919), (1, 2, None), (1, 2, None)]
    assert split_requests(reqs, 2) == list(enumerate(reqs))  # enough requests: unchanged
    assert [p.n for _, p in split_requests([_req(1, 5)], 4)] == [1]  # cannot split one sample
