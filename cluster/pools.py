"""Ray-backed implementations of the rollout protocols: a role's workers as one `Reasoner`/`Generator`.

A pool spreads each batch over all live workers of its role (contiguous shards, so results come
back in request order), waits with a timeout, and when a worker dies it is replaced by a fresh
one, which receives the current weights before it serves (the `on_replace` hook), and the lost
shard is redone. Bounded retries: a batch that fails more than `retries` times raises
`WorkerReplacementError`. Every other call to the workers goes through the pool too (`call_each`,
`call_one`, `ensure_alive`, `resize`), so a worker found dead during a version query, a weight sync,
a resize or an evaluation is replaced the same way; a replacement that itself dies while being
brought up to date is tried again, at most `retries` times.

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

__all__ = ["WorkerPool", "PoolReasoner", "PoolGenerator", "WorkerReplacementError", "shard_evenly", "split_requests"]

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


class WorkerReplacementError(RuntimeError):
    """Workers of a pool kept failing (dead, unresponsive, or their replacements died while being
    synced) more than `train.retries` times in one call. `role` and `indices` say which."""

    def __init__(self, role: str, indices: list[int], what: str, retries: int, cause: str):
        self.role, self.indices = role, sorted(indices)
        super().__init__(f"{role}: worker(s) {self.indices} still failing in {what} after {retries} replacements "
                         f"(train.retries={retries}; last error: {cause})")


def _dead_or_stuck() -> tuple[type[BaseException], ...]:
    import ray

    return (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)


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
                    last = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            pending = set(failed)
            if pending:
                attempt += 1
                if attempt > self.retries:
                    raise WorkerReplacementError(self.role, list(pending), f"{method!r} (its shards)", self.retries,
                                                 last)
                for i in pending:
                    self.replace(i)
        return [x for shard in results if shard is not None for x in shard]

    def replace(self, index: int) -> None:
        """Kill worker `index` (if alive) and start a fresh one in its slot, brought up to date by
        `on_replace` before it serves; a fresh one that dies meanwhile is started again (at most
        `retries` more times, then `WorkerReplacementError`)."""
        import ray

        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already dead: nothing to kill
            pass
        self.actors[index] = self._spawn_synced(index, "replacing a dead worker")
        self.replacements += 1

    def ensure_alive(self, timeout_s: float | None = None) -> list[int]:
        """Ping every worker; replace the ones that are dead or do not answer within `timeout_s` (default
        the pool's timeout). Call it between steps, when the workers are idle. Returns the replaced slots."""
        import ray

        refs = [a.__ray_ready__.remote() for a in self.actors]
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        replaced = []
        for i, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except _dead_or_stuck() as e:
                log.warning("%s worker %d is gone (%s); replacing it", self.role, i, type(e).__name__)
                self.replace(i)
                replaced.append(i)
        return replaced

    def slots_named_by(self, error: BaseException) -> list[int]:
        """The slots whose actor a `RayActorError` is about (empty: the error is about another actor)."""
        actor_id = getattr(error, "actor_id", None)
        return [i for i, a in enumerate(self.actors) if actor_id is not None and a._actor_id.hex() == actor_id]

    def call_each(self, method: str, *args: Any) -> list[Any]:
        """`actor.method(*args)` on every worker, in slot order; a dead or unresponsive worker is
        replaced (and re-synced) and asked again, at most `retries` times."""
        return self._call_slots(list(range(len(self.actors))), method, *args)

    def call_one(self, index: int, method: str, *args: Any) -> Any:
        """`actor.method(*args)` on worker `index`, replacing it if it is dead (as `call_each`)."""
        return self._call_slots([index], method, *args)[0]

    def _call_slots(self, slots: list[int], method: str, *args: Any) -> list[Any]:
        import ray

        results: dict[int, Any] = {}
        pending, attempt = list(slots), 0
        while pending:
            refs = {i: getattr(self.actors[i], method).remote(*args) for i in pending}
            deadline = time.monotonic() + self.timeout_s
            failed, last = [], ""
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except _dead_or_stuck() as e:
                    log.warning("%s worker %d failed in %r (%s); replacing it", self.role, i, method, type(e).__name__)
                    failed.append(i)
                    last = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if failed:
                attempt += 1
                if attempt > self.retries:
                    raise WorkerReplacementError(self.role, failed, repr(method), self.retries, last)
                for i in failed:
                    self.replace(i)
            pending = failed
        return [results[i] for i in slots]

    def _spawn_synced(self, index: int, what: str) -> Any:
        """A new actor for slot `index`, given the current weights by `on_replace`; retried if it dies."""
        import ray

        from cluster.failures import bounded

        for attempt in range(self.retries + 1):
            actor = self._spawn(index)  # same bundle: Ray starts it once the killed actor has freed it
            try:
                if self.on_replace is not None:
                    bounded(lambda a=actor: self.on_replace(index, a), self.timeout_s, f"{self.role} worker {index} sync")
                return actor
            except (ray.exceptions.RayActorError, TimeoutError) as e:
                log.warning("%s: new worker %d died while %s (attempt %d of %d): %s", self.role, index, what,
                            attempt + 1, self.retries + 1, type(e).__name__)
                last = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already dead
                    pass
        raise WorkerReplacementError(self.role, [index], what, self.retries, last)

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
            actor = self._spawn_synced(index, "adding a worker")
            self.actors.append(actor)
            self.calls_per_worker.append(0)
            new.append(index)
        return new

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`actor.method(...)` on every worker, no replacement (for shutdown; use `call_each` otherwise)."""
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
        return min(self.pool.call_each("version"))


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
        return min(self.pool.call_each("version"))
