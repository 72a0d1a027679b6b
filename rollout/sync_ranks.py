"""Rank arithmetic of the weight-sync group: who is which rank, and how big the group is.

Design: docs/design.md#weight-sync.

The broadcast group of one model holds the sender (learner rank 0, group rank 0) and every
*process* that holds a copy of the weights. A diffusers worker is one process. A vLLM worker with
tensor parallelism `tp` and pipeline parallelism `pp` is `tp * pp` processes (vLLM's own workers),
and every one of them must receive the full tensors: vLLM's `load_weights` takes each rank's shard
itself. So the group's world size is `1 + sum(processes per worker)`, and process `r` of worker `i`
(its rank inside that engine, `0 <= r < tp * pp`) is group rank `first_rank(i) + r`, where worker
`i`'s first rank is 1 plus the processes of the workers before it. With every worker the same
size this is the familiar `1 + i * tp + r`.

Workers may differ in size (a worker added later with another parallel layout): the layout is
computed from the list of sizes, in the order the coordinator lists the workers. The learner side
uses `sync_world_size` and `worker_first_ranks`; each engine process uses `process_rank`.
`sync_backend` picks the group's transport. Pure functions, no torch or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SENDER_RANK", "SYNC_BACKENDS", "sync_world_size", "worker_first_ranks", "process_rank",
           "uniform_process_rank", "sync_backend"]

SENDER_RANK = 0  # learner rank 0 broadcasts; every other rank receives
SYNC_BACKENDS = ("auto", "nccl", "gloo")


def _check_sizes(processes_per_worker: Sequence[int]) -> None:
    bad = [(i, n) for i, n in enumerate(processes_per_worker) if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ValueError(f"processes per worker must be integers >= 1 (tensor_parallel_size x pipeline stages); "
                         f"got (worker, value) {bad}")


def sync_world_size(processes_per_worker: Sequence[int]) -> int:
    """1 (the sender) + every receiving process: `1 + sum(processes_per_worker)`.

    Args:
        processes_per_worker: one entry per worker, e.g. `[2, 2, 2]` for three vLLM workers at
            tensor_parallel_size 2, `[1, 1]` for two diffusers workers.
    """
    _check_sizes(processes_per_worker)
    return 1 + sum(processes_per_worker)


def worker_first_ranks(processes_per_worker: Sequence[int]) -> list[int]:
    """Group rank of process 0 of each worker: 1 + the processes of the workers before it.

    `[2, 2, 2]` -> `[1, 3, 5]`; `[1, 4, 2]` -> `[1, 2, 6]`. Together with `sync_world_size` every
    rank in `[1, world)` belongs to exactly one process.
    """
    _check_sizes(processes_per_worker)
    firsts, next_rank = [], SENDER_RANK + 1
    for count in processes_per_worker:
        firsts.append(next_rank)
        next_rank += count
    return firsts


def process_rank(first_rank: int, engine_rank: int, engine_world_size: int) -> int:
    """Group rank of one engine process: its worker's first rank + its rank inside the engine.

    Args:
        first_rank: the worker's entry of `worker_first_ranks` (>= 1).
        engine_rank: the process's rank in its engine's own world (vLLM worker `rank`: the
            tensor-parallel rank, plus `tp * stage` under pipeline parallelism).
        engine_world_size: processes of that engine (`tp * pp`).

    Raises:
        ValueError: first_rank < 1 (rank 0 is the sender) or engine_rank outside [0, engine_world_size).
    """
    if first_rank <= SENDER_RANK:
        raise ValueError(f"worker first rank {first_rank}: ranks of rollout workers start at {SENDER_RANK + 1} "
                         f"(rank {SENDER_RANK} is learner rank 0, the sender)")
    if engine_world_size < 1 or not 0 <= engine_rank < engine_world_size:
        raise ValueError(f"engine rank {engine_rank} outside [0, {engine_world_size}) (the engine's processes)")
    return first_rank + engine_rank


def uniform_process_rank(worker_index: int, local_rank: int, processes_per_worker: int) -> int:
    """`1 + worker_index * processes_per_worker + local_rank`: the rank when every worker has the
    same size (what `worker_first_ranks` + `process_rank` give in that case)."""
    if worker_index < 0:
        raise ValueError(f"worker_index {worker_index} must be >= 0")
    first = worker_first_ranks([processes_per_worker] * (worker_index + 1))[-1]
    return process_rank(first, local_rank, processes_per_worker)


def sync_backend(requested: str, learner_gpus: float, worker_gpus: float) -> str:
    """The group's backend: `requested` unless it is "auto".

    auto: "nccl" when learner rank 0 and every worker process hold whole GPUs (`num_gpus` >= 1 per
    process), else "gloo". NCCL refuses two ranks on one device ("Duplicate GPU detected"), and
    roles with fractional GPUs may be packed onto the same one; gloo also moves CUDA tensors (through
    host memory), so a shared GPU still syncs, only slower. CPU roles (0 GPUs) need gloo.

    Args:
        requested: "auto" | "nccl" | "gloo" (config `sync.backend`).
        learner_gpus: GPUs of the learner rank (`cluster.*_learners.num_gpus`).
        worker_gpus: GPUs of one worker process (`cluster.*_workers.num_gpus`; for vLLM per TP rank).
    """
    if requested not in SYNC_BACKENDS:
        raise ValueError(f"sync.backend={requested!r}; allowed: {list(SYNC_BACKENDS)}")
    if requested != "auto":
        return requested
    return "nccl" if learner_gpus >= 1 and worker_gpus >= 1 else "gloo"
