"""Weights from learners to rollout workers, driver side: bucketed broadcast or Ray object store.

Design: docs/design.md#weight-sync.

`WeightSync` coordinators, picked by the config string through `make_weight_sync`, used by the
driver with Ray actor handles: `setup(learners, workers)`, `sync(learners, workers, version)`,
`resync(learners, worker, version)`, `shutdown()`. They call the sender methods of
`learners.weight_sender.WeightSenderMixin` on every learner rank (ZeRO-3 gathers are collective)
and the receiver methods of `actors.weight_receiver` on every worker; when `sync` returns, every
worker holds the pushed version.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from learners.weight_sender import TRANSFER_MODES
from rollout.sync_ranks import sync_world_size, worker_first_ranks
from rollout.weight_buckets import dtype_from_name

__all__ = [
    "WeightSync",
    "BroadcastWeightSync",
    "ObjectStoreWeightSync",
    "SyncReport",
    "make_weight_sync",
    "WEIGHT_SYNCS",
]

logger = logging.getLogger(__name__)


# ---- coordinators (driver side) -----------------------------------------------------------------
@dataclass(frozen=True)
class SyncReport:
    """What one sync did: the version every worker now holds, wall seconds, bytes, buckets."""

    version: int
    seconds: float
    bytes: int
    buckets: int
    workers: int
    sender: dict[str, float] | None = None  # rank 0's `broadcast_weights` stats (broadcast only)


class WeightSync(ABC):
    """Pushes learner weights into every rollout worker of one model.

    Lifecycle: `sync` after each update (the first call sets up whatever transport it needs) ->
    `resync(worker)` for a worker that joined late or was restarted, before it serves ->
    `shutdown()`. Invariant: when `sync` returns, every worker reports `version`.
    `learners` are all learner ranks of the model (a list of Ray actor handles, one handle, or an
    object with `.actors`); every rank is called because ZeRO-3 gathers are collective.

    Raises:
        RuntimeError: a worker reports a version other than the one pushed.
    """

    def __init__(self, *, bucket_mb: float = 50.0, backend: str = "gloo", wire_dtype: str = "float32") -> None:
        if bucket_mb <= 0:
            raise ValueError(f"weight_sync bucket_mb must be > 0, got {bucket_mb}")
        dtype_from_name(wire_dtype)  # refuses a name that is no dtype
        self.wire_dtype = wire_dtype  # the workers' dtype (models.*.dtype): what travels and what they hold
        self.bucket_mb = float(bucket_mb)
        self.backend = backend
        self._learners: list[Any] = []
        self._version: int | None = None

    @abstractmethod
    def sync(self, learners: Any, workers: Sequence[Any], version: int) -> SyncReport: ...

    def resync(self, worker: Any, version: int | None = None) -> int:
        """Give one (new or restarted) worker the current weights through the object store.

        Uses the learners of the last `sync`; the broadcast group is rebuilt at the next `sync`
        because its member list changed. Returns the version the worker now holds.
        """
        import ray

        if not self._learners:
            raise ValueError("resync before any sync: no learners known yet")
        version = self._version if version is None else int(version)
        refs = [learner.export_weights_bytes.remote(self.wire_dtype) for learner in self._learners]
        got = ray.get(worker.load_weights_bytes.remote(version, refs[0]))
        ray.get(refs)
        _check_versions([got], version)
        return got

    def shutdown(self) -> None:
        self._learners = []


class BroadcastWeightSync(WeightSync):
    """Bucketed broadcast over a standalone `torch.distributed` group (learner rank 0 = rank 0).

    The group is (re)built whenever the worker list changes (first sync, after a restart)."""

    def __init__(self, *, bucket_mb: float = 50.0, backend: str = "gloo", mode: str = "bucketed",
                 wire_dtype: str = "float32", group_timeout_s: float = 300.0) -> None:
        super().__init__(bucket_mb=bucket_mb, backend=backend, wire_dtype=wire_dtype)
        if group_timeout_s <= 0:
            raise ValueError(f"weight-sync group_timeout_s must be > 0, got {group_timeout_s}")
        self.group_timeout_s = float(group_timeout_s)
        if mode not in TRANSFER_MODES:
            raise ValueError(f"unknown weight transfer mode {mode!r}; known: {list(TRANSFER_MODES)}")
        self.mode = mode
        self._members: tuple[Any, ...] | None = None
        self._meta: list[dict[str, Any]] | None = None
        self._changed_meta: list[dict[str, Any]] | None = None  # after the group's first (full) sync

    def setup(self, learners: Any, workers: Sequence[Any]) -> None:
        """Form the group: learner rank 0 plus every process of every worker (a vLLM worker at
        tensor_parallel_size tp joins with tp ranks; rollout.sync_ranks), concurrently (a rendezvous)."""
        import ray

        self._learners = _as_actor_list(learners)
        sender = self._learners[0]
        addr, port = ray.get(sender.weight_group_address.remote())
        sizes = ray.get([w.weight_group_size.remote() for w in workers])  # tensor-parallel vLLM: tp ranks
        world, firsts = sync_world_size(sizes), worker_first_ranks(sizes)
        ray.get([sender.init_weight_group.remote(addr, port, world, self.backend, self.group_timeout_s)]
                + [w.join_weight_group.remote(addr, port, first, world, self.backend, self.group_timeout_s)
                   for w, first in zip(workers, firsts, strict=True)])
        self._members = _actor_keys(workers)
        self._meta = ray.get(sender.weight_bucket_meta.remote(self.bucket_mb, self.wire_dtype))
        self._changed_meta = None  # the new group's first sync sends everything
        logger.info("weight group ready: %d workers (%d receiving processes), %d buckets of <= %.0f MB at %s:%d",
                    len(workers), world - 1, len(self._meta), self.bucket_mb, addr, port)

    def sync(self, learners: Any, workers: Sequence[Any], version: int) -> SyncReport:
        import ray

        if self._members != _actor_keys(workers) or self._learners != _as_actor_list(learners):
            self.setup(learners, workers)
        start = time.perf_counter()
        changed_only = self._changed_meta is not None  # every worker holds the rest since the first sync
        meta = self._changed_meta if changed_only else self._meta
        send = [learner.broadcast_weights.remote(version, self.bucket_mb, self.mode, self.wire_dtype,
                                                 changed_only=changed_only)
                for learner in self._learners]
        recv = [w.receive_weights.remote(version, meta, self.mode) for w in workers]
        versions = ray.get(recv)
        stats = ray.get(send)[0]
        _check_versions(versions, version)
        self._version = int(version)
        if not changed_only:
            self._changed_meta = ray.get(self._learners[0].weight_bucket_meta.remote(
                self.bucket_mb, self.wire_dtype, changed_only=True))
        return SyncReport(version=int(version), seconds=time.perf_counter() - start, bytes=int(stats["bytes"]),
                          buckets=int(stats["buckets"]), workers=len(workers), sender=stats)

    def shutdown(self) -> None:
        self._members, self._meta, self._changed_meta = None, None, None
        super().shutdown()


class ObjectStoreWeightSync(WeightSync):
    """Fallback: rank 0 puts one safetensors blob in the Ray object store; every worker loads it.

    As the broadcast, it sends everything the first time for a set of learners and workers, then only
    what an update can change (a LoRA learner's adapted layers, learners.lora)."""

    _synced: tuple[Any, ...] | None = None  # the learners and workers of the last full sync

    def sync(self, learners: Any, workers: Sequence[Any], version: int) -> SyncReport:
        import ray

        self._learners = _as_actor_list(learners)
        members = (_actor_keys(self._learners), _actor_keys(workers))
        changed_only = self._synced == members
        start = time.perf_counter()
        refs = [learner.export_weights_bytes.remote(self.wire_dtype, changed_only) for learner in self._learners]
        versions = ray.get([w.load_weights_bytes.remote(version, refs[0], changed_only) for w in workers])
        ray.get(refs[1:])
        _check_versions(versions, version)
        self._version, self._synced = int(version), members
        nbytes = len(ray.get(refs[0]))
        return SyncReport(version=int(version), seconds=time.perf_counter() - start, bytes=nbytes, buckets=1,
                          workers=len(workers))

    def shutdown(self) -> None:
        self._synced = None
        super().shutdown()


WEIGHT_SYNCS: dict[str, type[WeightSync]] = {"broadcast": BroadcastWeightSync, "object_store": ObjectStoreWeightSync}


def make_weight_sync(kind: str, *, bucket_mb: float = 50.0, backend: str = "gloo",
                     wire_dtype: str = "float32", group_timeout_s: float = 300.0) -> WeightSync:
    """Factory keyed by the config string (`sync.method`: 'broadcast' | 'object_store').

    wire_dtype: the dtype the workers hold (`models.*.dtype`); weights travel in it, so bf16
    workers receive half the bytes of fp32 and exactly a bf16 learner's weights.
    group_timeout_s: how long a broadcast group's members wait for each other (broadcast only)."""
    if kind not in WEIGHT_SYNCS:
        raise ValueError(f"unknown weight sync {kind!r} (config key sync.method); known: {sorted(WEIGHT_SYNCS)}")
    if kind == "broadcast":
        return BroadcastWeightSync(bucket_mb=bucket_mb, backend=backend, wire_dtype=wire_dtype,
                                   group_timeout_s=group_timeout_s)
    return WEIGHT_SYNCS[kind](bucket_mb=bucket_mb, backend=backend, wire_dtype=wire_dtype)


def _as_actor_list(learners: Any) -> list[Any]:
    if hasattr(learners, "actors"):
        learners = learners.actors
    if isinstance(learners, (list, tuple)):
        if not learners:
            raise ValueError("weight sync needs at least one learner actor, got an empty list")
        return list(learners)
    return [learners]


def _actor_keys(actors: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(getattr(a, "_actor_id", id(a)) for a in actors)


def _check_versions(versions: Sequence[int], version: int) -> None:
    bad = [(i, v) for i, v in enumerate(versions) if int(v) != int(version)]
    if bad:
        raise RuntimeError(f"weight sync to version {version}: workers (index, version) {bad} hold another version")
