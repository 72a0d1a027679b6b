"""Concurrent requests share the rollout workers: their reasoner and generator calls are batched by Serve.

Every request runs its own R3 chain (`cluster.policy_session.PolicySession.run`) in a thread of the
replica, so each request keeps its own seeds and stop decisions. The chain talks to a `Reasoner` and
a `Generator` proxy; each proxy call hops onto the replica's event loop and joins a `@serve.batch`
queue, which merges the calls that arrive within `serve.batch_wait_s` (at most `serve.max_batch_size`)
into one call of the worker pool, run in a separate thread. Results are split back per call, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

__all__ = ["RoleBatcher", "split_by_counts"]


def split_by_counts(flat: list[Any], counts: list[int]) -> list[list[Any]]:
    """[a, b, c, d], [1, 3] -> [[a], [b, c, d]]: a merged call's results handed back to its callers."""
    if sum(counts) != len(flat):
        raise ValueError(f"{len(flat)} results for calls of sizes {counts}")
    out, start = [], 0
    for n in counts:
        out.append(flat[start:start + n])
        start += n
    return out


class RoleBatcher:
    """Merges concurrent `generate` / `sample` calls into one pool call per batch (per sampler settings).

    Args:
        reasoner: the pool's `Reasoner` (`cluster.pools.PoolReasoner`).
        generator: the pool's `Generator` (`cluster.pools.PoolGenerator`).
        max_batch_size: most calls merged into one.
        batch_wait_s: how long a partial batch waits for more calls.
    """

    def __init__(self, reasoner: Any, generator: Any, *, max_batch_size: int, batch_wait_s: float):
        self._reasoner, self._generator = reasoner, generator
        self._pool_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="r3-pool")  # one per role
        self._loop: asyncio.AbstractEventLoop | None = None
        for method in (self._text_batch, self._image_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_s)
        self.calls = {"reasoner": 0, "generator": 0}  # pool calls made, per role
        self.largest_batch = {"reasoner": 0, "generator": 0}  # most requests' calls merged into one

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The replica's event loop, where the batch queues live (call from a request handler)."""
        self._loop = loop

    def reasoner(self) -> Any:
        """A `Reasoner` for a chain running in a worker thread."""
        return _ReasonerProxy(self._submit, self._text_batch)

    def generator(self) -> Any:
        """A `Generator` for a chain running in a worker thread."""
        return _GeneratorProxy(self._submit, self._image_batch)

    def shutdown(self) -> None:
        self._pool_threads.shutdown(wait=False, cancel_futures=True)

    def _submit(self, coroutine: Any) -> Any:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("RoleBatcher used before bind_loop()")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _text_batch(self, calls: list[list[Any]]) -> list[list[Any]]:
        """calls[i] = one chain's TextRequests -> its samples; one pool call for all of them."""
        flat = [r for call in calls for r in call]
        out = await self._in_pool_thread(lambda: self._reasoner.generate(flat))
        self._count("reasoner", len(calls))
        return split_by_counts(out, [len(c) for c in calls])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _image_batch(self, calls: list[tuple[list[Any], Any]]) -> list[list[Any]]:
        """calls[i] = (one chain's ImageRequests, SamplerSettings) -> its images; one pool call per settings."""
        results: list[list[Any] | None] = [None] * len(calls)
        by_settings: dict[Any, list[int]] = {}
        for i, (_, settings) in enumerate(calls):
            by_settings.setdefault(settings, []).append(i)
        for settings, members in by_settings.items():
            flat = [r for i in members for r in calls[i][0]]
            out = await self._in_pool_thread(lambda f=flat, s=settings: self._generator.sample(f, s))
            self._count("generator", len(members))
            for i, part in zip(members, split_by_counts(out, [len(calls[i][0]) for i in members]), strict=True):
                results[i] = part
        return results

    async def _in_pool_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool_threads, fn)

    def _count(self, role: str, merged: int) -> None:
        self.calls[role] += 1
        self.largest_batch[role] = max(self.largest_batch[role], merged)


class _ReasonerProxy:
    def __init__(self, submit: Callable[[Any], Any], batch: Any):
        self._submit, self._batch = submit, batch

    def generate(self, requests: list[Any]) -> list[list[Any]]:
        return self._submit(self._batch(list(requests)))

    def version(self) -> int:
        raise NotImplementedError("the serving chain never asks for versions")


class _GeneratorProxy:
    def __init__(self, submit: Callable[[Any], Any], batch: Any):
        self._submit, self._batch = submit, batch

    def sample(self, requests: list[Any], settings: Any) -> list[Any]:
        return self._submit(self._batch((list(requests), settings)))

    def version(self) -> int:
        raise NotImplementedError("the serving chain never asks for versions")
