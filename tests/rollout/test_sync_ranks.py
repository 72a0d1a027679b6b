"""Rank layout of the weight-sync group (rollout.sync_ranks) against hand-computed values."""

from __future__ import annotations

import pytest

from rollout.sync_ranks import (
    process_rank,
    sync_backend,
    sync_world_size,
    uniform_process_rank,
    worker_first_ranks,
)


@pytest.mark.parametrize(
    ("sizes", "world", "firsts"),
    [
        ([1], 2, [1]),                      # one diffusers worker
        ([1, 1, 1], 4, [1, 2, 3]),          # three single-process workers: ranks 1, 2, 3
        ([2], 3, [1]),                      # one vLLM worker at TP 2: ranks 1, 2
        ([2, 2, 2], 7, [1, 3, 5]),          # three at TP 2: (1,2) (3,4) (5,6)
        ([4, 4], 9, [1, 5]),                # two at TP 4: 1..4, 5..8
        ([8, 8, 8, 8], 33, [1, 9, 17, 25]),  # four at TP 8
        ([2, 2, 1], 6, [1, 3, 5]),          # a TP-1 worker added after two TP-2 workers
        ([1, 4, 2], 8, [1, 2, 6]),          # mixed sizes: 1 | 2..5 | 6..7
    ],
)
def test_world_size_and_first_ranks(sizes, world, firsts):
    assert sync_world_size(sizes) == world
    assert worker_first_ranks(sizes) == firsts


@pytest.mark.parametrize("sizes", [[1], [2, 2, 2], [1, 4, 2], [3, 1, 1, 5], [8] * 5])
def test_every_receiving_rank_belongs_to_exactly_one_process(sizes):
    ranks = [process_rank(first, r, n) for first, n in zip(worker_first_ranks(sizes), sizes, strict=True)
             for r in range(n)]
    assert sorted(ranks) == list(range(1, sync_world_size(sizes)))


@pytest.mark.parametrize(
    ("worker_index", "local_rank", "tp", "rank"),
    [(0, 0, 1, 1), (3, 0, 1, 4), (0, 1, 2, 2), (1, 0, 2, 3), (1, 1, 2, 4), (2, 3, 4, 12), (3, 7, 8, 32)],
)
def test_uniform_rank_is_one_plus_index_times_tp_plus_local(worker_index, local_rank, tp, rank):
    assert uniform_process_rank(worker_index, local_rank, tp) == rank


def test_elastic_addition_keeps_the_ranks_of_the_workers_before_it():
    before, after = worker_first_ranks([2, 2]), worker_first_ranks([2, 2, 2])
    assert after[:2] == before and after[2] == 5 and sync_world_size([2, 2, 2]) == 7


def test_mistakes_are_refused_with_the_bad_value():
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        sync_world_size([2, 0])
    with pytest.raises(ValueError, match="integers >= 1"):
        worker_first_ranks([True])
    with pytest.raises(ValueError, match="rank 0 is learner rank 0"):
        process_rank(0, 0, 1)
    with pytest.raises(ValueError, match=r"engine rank 2 outside \[0, 2\)"):
        process_rank(1, 2, 2)
    with pytest.raises(ValueError, match="worker_index -1"):
        uniform_process_rank(-1, 0, 2)


@pytest.mark.parametrize(
    ("requested", "learner_gpus", "worker_gpus", "backend"),
    [
        ("auto", 0, 0, "gloo"),      # CPU run
        ("auto", 1, 1, "nccl"),      # whole GPUs each
        ("auto", 2, 1, "nccl"),
        ("auto", 0.2, 0.2, "gloo"),  # fractions: may share one GPU, which NCCL refuses
        ("auto", 1, 0.5, "gloo"),
        ("auto", 1, 0, "gloo"),      # CPU workers
        ("nccl", 0.2, 0.2, "nccl"),  # explicit choices are kept
        ("gloo", 1, 1, "gloo"),
    ],
)
def test_sync_backend(requested, learner_gpus, worker_gpus, backend):
    assert sync_backend(requested, learner_gpus, worker_gpus) == backend


def test_unknown_sync_backend_is_named():
    with pytest.raises(ValueError, match="sync.backend='mpi'"):
        sync_backend("mpi", 1, 1)
