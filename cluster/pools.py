"""Ray-backed implementations of the rollout protocols: a role's workers as one `Reasoner`/`Generator`.

A pool spreads each batch over all live workers of its role (contiguous shards, so results come
back in request order), waits with a timeout, and when a worker dies it is replaced by a fresh
one, which receives the current weights before it serves (the `on_replace` hook), and the lost
shard is redone. Bounded retries: a batch that fails more than `retries` times raises.

With a `RolePlacement`, worker i always runs in bundle i of its role's placement group (a
replacement reuses the bundle); workers added beyond the group get one-bundle groups of their own,
given back when the pool shrinks (see `cluster.placement`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from rollout.interfaces import ImageRequest, SamplerSettings, TextRequest
from rollout.trajectory import ImageSample, TextSample

__all__ = ["WorkerPool", "PoolReasoner", "PoolGenerator", "shard_evenly", "split_requests"]

log = logging.getLogger(__name__)


def shard_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges splitting n items over `parts` workers, sizes differing by at most one."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


class WorkerPool:
    """The live actors of one role plus how to make a new one.

    `factory(index, scheduling_strategy)` creates (and names) the actor for slot `index`, scheduled
    with that strategy (None without a placement); `on_replace(index, actor)` brings a new actor up to
    date (weights, version) before it serves. `placement` (a `cluster.placement.RolePlacement`, or
    None for plain resource requests) says where slot `index` runs.
    """

    def __init__(
        self,
        role: str,
        factory: Callable[[int, Any], Any],
        count: int,
        *,
        timeout_s: float,
        retries: int,
        on_replace: Callable[[int, Any], None] | None = None,
        placement: Any = None,
    ):
        if count < 1:
            raise ValueError(f"{role}: count must be >= 1, got {count}")
        self.role = role
        self.factory = factory
        self.timeout_s = timeout_s
        self.retries = retries
        self.on_replace = on_replace
        self.placement = placement
        self.actors: list[Any] = [self._spawn(i) for i in range(count)]
        self.replacements = 0
        self.calls_per_worker: list[int] = [0] * count

    def __len__(self) -> int:
        return len(self.actors)

    def map_shards(self, method: str, items: list[Any], *args: Any) -> list[Any]:
        """Call `actor.method(shard, *args)` on every worker with a non-empty shard; concatenate results."""
        import ray

        results: list[list[Any] | None] = [None] * len(self.actors)
        shards = shard_evenly(len(items), len(self.actors))
        pending = {i for i, (a, b) in enumerate(shards) if b > a}
        attempt = 0
        while pending:
            refs = {}
            for i in pending:
                a, b = shards[i]
                refs[i] = getattr(self.actors[i], method).remote(items[a:b], *args)
                self.calls_per_worker[i] += 1
            failed = []
            deadline = time.monotonic() + self.timeout_s
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                    log.warning("%s worker %d failed (%s); replacing it and redoing its shard", self.role, i, type(e).__name__)
                    failed.append(i)
            pending = set(failed)
            if pending:
                attempt += 1
                if attempt > self.retries:
                    raise RuntimeError(
                        f"{self.role}: shards {sorted(pending)} still failing after {self.retries} retries "
                        f"(raise train.retries or check the workers' logs)"
                    )
                for i in pending:
                    self.replace(i)
        return [x for shard in results if shard is not None for x in shard]

    def replace(self, index: int) -> None:
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already dead: nothing to kill
            pass
        actor = self._spawn(index)  # same bundle: Ray starts it once the killed actor has freed it
        if self.on_replace is not None:
            self.on_replace(index, actor)
        self.actors[index] = actor
        self.replacements += 1

    def resize(self, count: int) -> list[int]:
        """Grow or shrink the pool between steps; returns the indices of new actors (to be synced).

        Shrinking kills the highest indices and gives back their extra placement groups.
        """
        import ray

        if count < 1:
            raise ValueError(f"{self.role}: count must be >= 1, got {count}")
        new = []
        while len(self.actors) > count:
            ray.kill(self.actors.pop(), no_restart=True)
            self.calls_per_worker.pop()
            if self.placement is not None:
                self.placement.release(len(self.actors))
        while len(self.actors) < count:
            index = len(self.actors)
            actor = self._spawn(index)
            if self.on_replace is not None:
                self.on_replace(index, actor)
            self.actors.append(actor)
            self.calls_per_worker.append(0)
            new.append(index)
        return new

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], timeout=self.timeout_s)

    def _spawn(self, index: int) -> Any:
        strategy = self.placement.scheduling_strategy(index) if self.placement is not None else None
        return self.factory(index, strategy)


class PoolReasoner:
    """`Reasoner` over a pool of TextWorkers.

    With fewer requests than workers, requests with n > 1 are split into parts (part j > 0 gets
    seed + j·7919), so every worker gets work; the samples are regrouped per request.
    """

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def generate(self, requests: list[TextRequest]) -> list[list[TextSample]]:
        parts = split_requests(requests, len(self.pool))
        flat = self.pool.map_shards("generate", [part for _, part in parts])
        out: list[list[TextSample]] = [[] for _ in requests]
        for (owner, _), samples in zip(parts, flat, strict=True):
            out[owner].extend(samples)
        return out

    def version(self) -> int:
        return min(self.pool.call_all("version"))


def split_requests(requests: list[TextRequest], workers: int) -> list[tuple[int, TextRequest]]:
    """(owning request index, part) pairs; at least `workers` parts when the samples allow it."""
    from dataclasses import replace

    if not requests or len(requests) >= workers:
        return list(enumerate(requests))
    per_request = -(-workers // len(requests))  # ceil
    out = []
    for i, r in enumerate(requests):
        sizes = [b - a for a, b in shard_evenly(r.n, min(per_request, r.n))]
        for j, n in enumerate(sizes):
            seed = r.seed if r.seed is None or j == 0 else r.seed + 7919 * j
            out.append((i, replace(r, n=n, seed=seed)))
    return out


class PoolGenerator:
    """`Generator` over a pool of DiffusionWorkers."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def sample(self, requests: list[ImageRequest], settings: SamplerSettings) -> list[ImageSample]:
        return self.pool.map_shards("sample", requests, settings)

    def version(self) -> int:
        return min(self.pool.call_all("version"))
